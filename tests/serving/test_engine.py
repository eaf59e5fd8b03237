"""The generation engine on the tiny model: answers as `adaptloop ask` gives them, batched rows as alone, streaming."""

from __future__ import annotations

import threading
import time

import pytest

from serving.adapters import AdapterCache
from serving.engine import Engine, Job, Sampling, TextStream
from serving.lora import read_adapter
from tests.support.adapters import manifest, random_adapter
from tests.support.processes import wait_until
from trainer.data import chat_ids
from trainer.generation import generate
from trainer.model import BaseModelRef, load_base
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit

PROMPTS = ["What is my dog's name?", "Where was I born?", "Tell me something about the sea, please.", "Hi"]


class Collect:
    """A sink that keeps what the engine sends and says when the answer is done."""

    def __init__(self) -> None:
        self.cancelled = False
        self.pieces: list[str] = []
        self.result: tuple | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.order: list[str] = []

    def text(self, delta: str) -> None:
        self.pieces.append(delta)

    def done(self, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.result = (content, finish_reason, prompt_tokens, completion_tokens)
        self.finished.set()

    def failed(self, error: BaseException) -> None:
        self.error = error
        self.finished.set()

    def wait(self, timeout: float = 120) -> tuple:
        assert self.finished.wait(timeout), "the engine never finished the answer"
        assert self.error is None, self.error
        return self.result


class StepHold:
    """The engine held after its `at`-th decoding step until released: a state to act in, whatever the machine's speed."""

    def __init__(self, engine: Engine, at: int) -> None:
        self.engine, self.at = engine, at
        self.steps: list[int] = []  # each step's rows
        self._reached, self._go = threading.Event(), threading.Event()

    def __enter__(self) -> StepHold:
        self.engine.on_step = self._on_step
        return self

    def __exit__(self, *_exc) -> None:
        self.engine.on_step = None
        self._go.set()

    def _on_step(self, rows: int) -> None:
        self.steps.append(rows)
        if len(self.steps) == self.at:
            self._reached.set()
            self._go.wait(60)

    def reached(self) -> None:
        assert self._reached.wait(60), f"the engine never reached step {self.at}"

    def release(self) -> None:
        self._go.set()


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    model, tokenizer, device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    tmp = tmp_path_factory.mktemp("engine")
    adapters = [random_adapter(model, tmp / f"a{seed}", seed=seed, scale=0.3) for seed in (1, 2)]
    engine = Engine(model, tokenizer, device, max_batch_size=8, window_s=0.05).start()
    yield {
        "model": model,
        "tokenizer": tokenizer,
        "device": device,
        "engine": engine,
        "adapters": adapters,
        "weights": [read_adapter(a, f"u{i}@v1") for i, a in enumerate(adapters)],
    }
    engine.stop()


def _ask(world, prompt: str, adapter_dir=None) -> str:
    """What `adaptloop ask` answers: `generate` on the base model, or on it with the adapter through PEFT."""
    from peft import PeftModel

    model = world["model"] if adapter_dir is None else PeftModel.from_pretrained(world["model"], str(adapter_dir))
    try:
        return generate(model, world["tokenizer"], world["device"], prompt, max_new_tokens=24)
    finally:
        if adapter_dir is not None:
            model.unload()


def _serve(world, prompt: str, weights=None, **sampling) -> Collect:
    sink = Collect()
    ids = chat_ids(world["tokenizer"], prompt)
    world["engine"].submit(Job(ids, weights, Sampling(**{"max_tokens": 24, **sampling}), sink))
    return sink


def test_a_greedy_answer_is_what_ask_gives_with_and_without_an_adapter(world):
    for prompt in PROMPTS:
        assert _serve(world, prompt).wait()[0] == _ask(world, prompt), prompt
        for adapter, weights in zip(world["adapters"], world["weights"]):
            assert _serve(world, prompt, weights).wait()[0] == _ask(world, prompt, adapter), (prompt, adapter)


def test_rows_batched_together_answer_as_each_would_alone(world):
    cases = [(p, w) for p in PROMPTS for w in (None, *world["weights"])]
    alone = [_serve(world, p, w).wait()[0] for p, w in cases]
    sinks = [_serve(world, p, w) for p, w in cases]  # submitted at once: they share steps
    together = [s.wait()[0] for s in sinks]
    assert together == alone
    assert len(set(alone)) > 3, "the adapters change the answers (else this test would prove little)"


def test_the_pieces_sent_add_up_to_the_answer_and_limits_hold(world):
    sink = _serve(world, PROMPTS[2], world["weights"][0], max_tokens=12)
    content, finish, prompt_tokens, completion_tokens = sink.wait()
    assert "".join(sink.pieces) == content and finish == "length" and completion_tokens == 12
    assert prompt_tokens == len(chat_ids(world["tokenizer"], PROMPTS[2]))
    sampled = [_serve(world, PROMPTS[2], temperature=1.0, top_p=0.9, seed=7, max_tokens=16).wait()[0] for _ in range(2)]
    assert sampled[0] == sampled[1], "a seed makes sampling repeatable"


def test_a_stop_sequence_ends_the_answer_before_it(world):
    full = _serve(world, PROMPTS[1], world["weights"][1], max_tokens=24).wait()[0]
    words = full.split()
    assert len(words) > 2, full
    stop = words[2]
    sink = _serve(world, PROMPTS[1], world["weights"][1], max_tokens=24, stops=(stop,))
    content, finish, *_ = sink.wait()
    assert finish == "stop" and content == full[: full.index(stop)].strip() and stop not in content
    assert "".join(sink.pieces) == content


def test_a_long_answer_does_not_hold_back_a_short_one(world):
    long = _serve(world, PROMPTS[2], max_tokens=400, ignore_eos=True)
    while not long.pieces and not long.finished.is_set():
        time.sleep(0.01)  # the long answer is generating (its first piece is out) before the short one arrives
    short = _serve(world, PROMPTS[0], max_tokens=3)
    short.wait()
    assert not long.finished.is_set(), "the short answer joined between steps and left first"
    _content, finish, _prompt_tokens, completion_tokens = long.wait()
    assert (finish, completion_tokens) == ("length", 400), "ignore_eos: all of max_tokens"


def test_a_cancelled_row_leaves_the_batch(world):
    engine = world["engine"]
    sink = _serve(world, PROMPTS[2], max_tokens=400, ignore_eos=True)
    while not sink.pieces:
        time.sleep(0.01)
    sink.cancelled = True
    deadline = time.monotonic() + 60
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and not sink.finished.is_set(), "dropped, nothing more sent to a client that left"


def test_a_row_in_flight_keeps_its_version_when_a_promotion_drops_it(world, tmp_path):
    """A promotion under a running row, held as a state (the engine waits at a step): the cache drops v1 for v2 and a
    v2 request joins; v1's row goes on with v1's weights to its last token, and v1 leaves when the row's request ends."""
    engine = world["engine"]
    registry = AdapterRegistry(tmp_path / "store")
    for n, adapter in enumerate(world["adapters"], start=1):
        registry.register("ivy", adapter, manifest(request_id=f"ivy{n}"))
    cache = AdapterCache(registry, capacity=4, on_evict=engine.lora.forget)
    alone = [_serve(world, PROMPTS[2], weights, max_tokens=40).wait()[0] for weights in world["weights"]]
    assert alone[0] != alone[1], "the versions answer differently (else this test would prove little)"
    with StepHold(engine, at=3) as hold:
        v1 = cache.acquire("ivy", 1)
        started = _serve(world, PROMPTS[2], v1, max_tokens=40)
        hold.reached()
        cache.drop_user_versions("ivy", keep=2)  # what `serve` does on the lifecycle topic's `promoted`
        assert "ivy@v1" in cache.resident(), "a request in flight holds it"
        v2 = cache.acquire("ivy", 2)
        joined = _serve(world, PROMPTS[2], v2, max_tokens=40)
        hold.release()
        answers = [started.wait()[0], joined.wait()[0]]
    assert answers == alone, "each row answered on its own version to the end"
    assert 2 in hold.steps, "the v2 row joined while v1's row was generating"
    cache.release(v1)
    cache.release(v2)
    assert cache.resident() == ["ivy@v2"], "v1 left once the request holding it ended"


def test_the_metrics_count_requests_running_and_waiting(world, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metrics import ServeMetrics

    engine = world["engine"]
    metrics = ServeMetrics(AdapterCache(AdapterRegistry(tmp_path / "store"), capacity=1), engine)

    def requests() -> dict[str, float]:
        families = text_string_to_metric_families(metrics.render().decode())
        return {
            f.name: f.samples[0].value for f in families if f.name.startswith("adaptloop_serve_requests_") and f.type == "gauge"
        }

    with StepHold(engine, at=2) as hold:
        running = _serve(world, PROMPTS[0], max_tokens=8)
        hold.reached()
        waiting = [_serve(world, prompt, max_tokens=8) for prompt in PROMPTS[1:3]]
        assert requests() == {"adaptloop_serve_requests_running": 1, "adaptloop_serve_requests_waiting": 2}
        hold.release()
        for sink in (running, *waiting):
            sink.wait()
    wait_until(lambda: engine.running == 0, 60, "the rows leaving the batch (just after their answers are sent)", interval=0.01)
    assert requests() == {"adaptloop_serve_requests_running": 0, "adaptloop_serve_requests_waiting": 0}


def test_text_stream_holds_back_what_a_later_token_could_change(world):
    tokenizer = world["tokenizer"]
    stream = TextStream(tokenizer, stops=("STOP",))
    ids = tokenizer("Hello there ST", add_special_tokens=False)["input_ids"]
    sent = "".join(stream.push(i) for i in ids)
    assert sent.endswith("there") and not sent.endswith("ST"), "a possible start of the stop sequence waits"
    for i in tokenizer("OP and more", add_special_tokens=False)["input_ids"]:
        stream.push(i)
    assert stream.stopped and stream.final()[0] == "Hello there"


def test_text_stream_sends_a_character_whole_and_goes_on_past_a_stray_byte(world):
    tokenizer = world["tokenizer"]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    stream = TextStream(tokenizer, stops=())
    pieces = [stream.push(i) for i in ids("Café ☕ ok")]  # "☕" is three bytes over three tokens
    assert "".join(pieces) == "Café ☕ ok" and " ☕" in pieces, "the cup is sent whole, once its last byte arrives"
    stray = TextStream(tokenizer, stops=())
    lead_byte = tokenizer.convert_tokens_to_ids("â")  # byte 0xE2 alone: a three-byte character that never completes
    sent = "".join(stray.push(i) for i in [*ids("Hi"), lead_byte, *ids(" and the rest of the answer")])
    assert sent == stray.final()[0] == "Hi\ufffd and the rest of the answer", "streamed on, not held to the end"


def test_text_stream_decodes_incrementally_as_decoding_every_token_at_once(world):
    """After every token, the stream's text is what decoding all the answer's tokens at once gives: random answers over
    the whole vocabulary (byte pieces, half characters, special tokens), and on a SentencePiece-style tokenizer that
    drops the first token's leading space and spells characters in byte tokens."""
    import random

    rng = random.Random(7)
    for tokenizer in (world["tokenizer"], _sentencepiece_style_tokenizer()):
        specials, answers = tokenizer.all_special_ids, []
        for _answer in range(20):
            stream = TextStream(tokenizer, stops=())
            for _token in range(150):
                stream.push(rng.choice(specials) if rng.random() < 0.05 else rng.randrange(len(tokenizer)))
                assert stream.text == tokenizer.decode(stream.ids, skip_special_tokens=True).lstrip(), stream.ids
            answers.append(stream.text)
        met = "".join(text.strip() for text in answers)
        assert "\ufffd" in met and " " in met, "half characters and spaces were met (else this test would prove little)"


def _sentencepiece_style_tokenizer():
    """Llama's decoding (the "▁" word marker, byte-fallback tokens, the first leading space stripped) on a tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "▁Hello", "▁world", "!", "▁a", "b", "▁", "<0xE2>", "<0x98>", "<0x95>", "<0xC3>", "<0xA9>"]
    model = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>")


def test_stacked_adapters_of_different_shapes_give_each_row_its_own_update(world, tmp_path):
    """Rows of adapters with different ranks and layers, and a base row, in one forward pass: each as PEFT gives it alone."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from serving.lora import RowLora

    model, tokenizer = world["model"], world["tokenizer"]
    shapes = [(4, ["q_proj", "v_proj", "down_proj"]), (8, ["q_proj", "o_proj", "up_proj"])]
    paths = []
    for seed, (rank, modules) in enumerate(shapes):
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules))
        generator = torch.Generator().manual_seed(seed + 10)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        peft_model.save_pretrained(tmp_path / f"s{seed}", safe_serialization=True)
        peft_model.unload()
        paths.append(tmp_path / f"s{seed}")
    ids = torch.tensor([chat_ids(tokenizer, PROMPTS[0])] * 3)
    with torch.inference_mode():
        alone = []
        for path in paths:
            peft_model = PeftModel.from_pretrained(model, str(path))
            alone.append(peft_model(input_ids=ids[:1]).logits[0])
            peft_model.unload()
        alone.append(model(input_ids=ids[:1]).logits[0])
        rows = RowLora(model)
        try:
            with rows.use([read_adapter(paths[0], "a@v1"), read_adapter(paths[1], "b@v1"), None]):
                together = model(input_ids=ids).logits
        finally:
            rows.remove()
    for row in range(3):
        torch.testing.assert_close(together[row], alone[row], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone[0], alone[1], atol=1e-2), "the adapters differ (else this test would prove little)"
