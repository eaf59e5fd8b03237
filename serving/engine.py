"""The generation engine of `adaptloop serve`: continuous batching on one kept base model, a row per request.

    engine = Engine(model, tokenizer, device, max_batch_size=16, window_s=0.005)
    engine.start()
    engine.submit(Job(prompt_ids, adapter, Sampling(max_tokens=64), sink))    # from any thread

One thread runs the loop. Each turn it admits what waits (up to
`max_batch_size` rows in all; the new prompts are prefilled together,
left-padded, each through its own adapter), then runs one decoding step for
every running row: one forward pass, each row through its own user's LoRA
(serving/lora.py), one new token each. A row leaves as soon as it ends (its
end token, a stop sequence, its token limit, or its client gone) and new
requests join between steps, so a long answer never holds short ones back.

The running rows' key/value caches are kept as one left-padded batch; a
joining group is padded to the same length and appended, a leaving row is
cut out, and columns that only hold padding are dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serving.lora import LoraWeights, RowLora

log = logging.getLogger("adaptloop.serving")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy (what `adaptloop ask` and the gate do)
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's: always max_tokens (benchmarks, fixed-length answers)


class Sink(Protocol):
    """Where a request's answer goes, from the engine's thread."""

    cancelled: bool

    def text(self, delta: str) -> None: ...
    def done(self, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...
    def failed(self, error: BaseException) -> None: ...


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: LoraWeights | None
    sampling: Sampling
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)


class TextStream:
    """A row's answer as text, sent as it grows: never a piece that a later token could still change.

    Held back until more arrives: trailing whitespace (the answer is stripped,
    as `adaptloop ask` strips it), a half-decoded character at the end, and a
    tail that may be the start of a stop sequence. So the pieces sent always
    add up to the final answer.

    Decoding is incremental, as vLLM's detokenizer: each token decodes only the
    tokens since the text last ended on a whole character, after the piece
    before them as context (a tokenizer that drops the first token's leading
    space drops the context's, not theirs). So a token costs the same at the
    end of a long answer as at its start (0.05 ms a row at the 8,192nd token on
    a 2-core VM, where decoding the whole answer again took 1.9 ms); the text
    is still what decoding every token at once gives.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._settled = ""  # the text of ids[: self._read]: whole characters
        self._context, self._read = 0, 0  # ids[_context:_read] decode again with the newer tokens, as their context
        self._context_text = ""  # ids[_context:_read] decoded alone
        self._unsettled = ""  # the text of ids[_read:], in context; it may end in a half-decoded character

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _grow(self) -> None:
        window = self._decode(self.ids[self._context :])
        if not window.startswith(self._context_text):  # a tokenizer whose decoding is not local: from the start
            self._settled, self._context, self._read, self._context_text = "", 0, 0, ""
            window = self._decode(self.ids)
        self._unsettled = window[len(self._context_text) :]
        if self._unsettled and not self._unsettled.endswith("\ufffd"):
            self._settled += self._unsettled
            self._context, self._read = self._read, len(self.ids)
            self._context_text, self._unsettled = self._decode(self.ids[self._context : self._read]), ""

    @property
    def text(self) -> str:
        """The answer so far, as decoding all its tokens at once gives it (its end not yet stripped)."""
        return (self._settled + self._unsettled).lstrip()

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be sent now (sets `stopped` when a stop sequence appeared)."""
        self.ids.append(token_id)
        self._grow()
        text = self.text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut].rstrip())
        # A character whose bytes are still arriving decodes as U+FFFD at the end; once a character follows it, it
        # stays as decoded (UTF-8 resynchronises), so a stray byte mid-answer holds back nothing after it.
        safe = text.rstrip().rstrip("\ufffd")
        held = max((n for s in self.stops for n in range(1, len(s)) if safe.endswith(s[:n])), default=0)
        return self._advance(safe[: len(safe) - held].rstrip())

    def final(self) -> tuple[str, str]:
        """(the whole answer, the last piece to send)."""
        text = self.text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=len(text))
        content = text[:cut].strip()
        return content, self._advance(content)

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.sent) or len(upto) <= len(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta


@dataclass
class _Row:
    job: Job
    text: TextStream
    generator: object | None
    generated: int = 0
    last_token: int = -1
    finish: str | None = None


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        device,
        max_batch_size: int = 16,
        window_s: float = 0.005,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch_size, self.window_s = max_batch_size, window_s
        self.on_step = on_step  # called with the batch size of every decoding step (metrics)
        self.lora = RowLora(model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self._queue: queue.Queue[Job] = queue.Queue()
        self._rows: list[_Row] = []
        self._kv: list[tuple[object, object]] = []
        self._mask = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)

    # ---- from any thread ------------------------------------------------------------ #

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # ---- the loop ------------------------------------------------------------------- #

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as exc:  # one bad batch fails its rows, never the server
                    log.exception("generation step failed")
                    for row in self._rows:
                        row.job.sink.failed(exc)
                    self._rows, self._kv, self._mask = [], [], None

    def _admit(self) -> None:
        """Prefill the jobs that wait, as many as there is room for; with nothing running, wait for the first."""
        room = self.max_batch_size - len(self._rows)
        jobs: list[Job] = []
        try:
            if room > 0:
                jobs.append(self._queue.get(timeout=0.2) if not self._rows else self._queue.get_nowait())
        except queue.Empty:
            return
        deadline = time.monotonic() + (self.window_s if len(self._rows) == 0 else 0.0)
        while len(jobs) < room:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        jobs = [job for job in jobs if not job.sink.cancelled]
        if jobs:
            self._prefill(jobs)

    def _prefill(self, jobs: list[Job]) -> None:
        import torch
        from transformers import DynamicCache

        width = max(len(job.prompt_ids) for job in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=self.device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with self.lora.use([job.adapter for job in jobs]):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        rows = [_Row(job, TextStream(self.tokenizer, job.sampling.stops), _generator(job.sampling)) for job in jobs]
        self._join(rows, [(layer.keys, layer.values) for layer in out.past_key_values.layers], mask)
        self._accept(rows, out.logits[:, -1, :])

    def _step(self) -> None:
        import torch
        from transformers import DynamicCache

        rows = self._rows
        ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        positions = self._mask.sum(-1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        cache = DynamicCache(ddp_cache_data=self._kv, config=self.model.config)
        with self.lora.use([row.job.adapter for row in rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        self._kv, self._mask = [(layer.keys, layer.values) for layer in out.past_key_values.layers], mask
        if self.on_step is not None:
            self.on_step(len(rows))
        self._accept(rows, out.logits[:, -1, :])

    # ---- rows --------------------------------------------------------------------- #

    def _accept(self, rows: list[_Row], logits) -> None:
        """Each row's next token: sent as text, or the row ends; ended rows leave the batch."""
        for row, token in zip(rows, _sample(logits, rows)):
            row.last_token, row.generated = token, row.generated + 1
            if row.job.sink.cancelled:
                row.finish = "cancelled"
            elif token in self.eos and not row.job.sampling.ignore_eos:
                row.finish = "stop"
            else:
                delta = row.text.push(token)
                if delta:
                    row.job.sink.text(delta)
                if row.text.stopped:
                    row.finish = "stop"
                elif row.generated >= row.job.sampling.max_tokens:
                    row.finish = "length"
            if row.finish is not None and row.finish != "cancelled":
                content, last = row.text.final()
                if last:
                    row.job.sink.text(last)
                completion = row.generated - (
                    1 if row.finish == "stop" and token in self.eos and not row.job.sampling.ignore_eos else 0
                )
                row.job.sink.done(content, row.finish, len(row.job.prompt_ids), completion)
        if any(row.finish is not None for row in self._rows):
            self._leave([i for i, row in enumerate(self._rows) if row.finish is None])

    def _join(self, rows: list[_Row], kv: list[tuple[object, object]], mask) -> None:
        """Append `rows` (their caches and mask) to the running batch, left-padding the shorter side."""
        import torch.nn.functional as F

        if not self._rows:
            self._rows, self._kv, self._mask = rows, kv, mask
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)

        def left(t, by: int):  # pad the sequence axis (-2 for keys and values, -1 for the mask) on the left
            return t if by == 0 else F.pad(t, (0, 0, by, 0)) if t.dim() == 4 else F.pad(t, (by, 0))

        import torch

        self._kv = [
            (torch.cat([left(k0, width - old), left(k1, width - new)]), torch.cat([left(v0, width - old), left(v1, width - new)]))
            for (k0, v0), (k1, v1) in zip(self._kv, kv)
        ]
        self._mask = torch.cat([left(self._mask, width - old), left(mask, width - new)])
        self._rows = self._rows + rows

    def _leave(self, keep: list[int]) -> None:
        """Cut out the rows that ended; drop the leading columns that are padding in every row left."""
        import torch

        if not keep:
            self._rows, self._kv, self._mask = [], [], None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._kv = [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self._kv]
        self._mask = mask[:, start:]
        self._rows = [self._rows[i] for i in keep]


def _generator(sampling: Sampling):
    if sampling.temperature == 0:
        return None
    import torch

    generator = torch.Generator()
    if sampling.seed is not None:
        generator.manual_seed(sampling.seed)
    else:
        generator.seed()
    return generator


def _sample(logits, rows: list[_Row]) -> list[int]:
    """Greedy for temperature 0 (the argmax, as `generate` does); else temperature and nucleus (top_p) sampling."""
    import torch

    tokens = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        s = row.job.sampling
        if s.temperature == 0:
            continue
        probs = torch.softmax(logits[i].float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            drop = ordered.cumsum(0) - ordered > s.top_p  # keep the smallest set whose mass reaches top_p
            ordered[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, ordered)
        tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=row.generator))
    return tokens
