"""The validation gate on a tiny model with hand-made adapters: promote, reject, log, never load a tampered one.

A tiny random model says nothing useful, so the suites are built from what a
known adapter answers: adapter A is the user's active version and the core
suite expects A's answers. A copy of A keeps every answer (promoted); another
random adapter changes them (core regression: rejected).
"""

from __future__ import annotations

import json
import shutil

import pytest

from core.errors import StorageError
from tests.support.adapters import fake_adapter, manifest, random_adapter
from trainer.gate import Gate, GateConfig, load_cases, parse_cases, suite_key
from trainer.job import apply_decision, learned_facts, validate_adapter
from trainer.model import BaseModelRef, load_base
from trainer.registry import AdapterRegistry
from trainer.scoring import ScoreWeights, TestCase, load_embedder

pytestmark = pytest.mark.unit

# The tiny model's answers say nothing about retention or forgetting: these tests
# judge the user and core suites alone unless they say otherwise.
LENIENT = {"min_retention": 0.0, "max_forgetting": 1.0}

CORE_PROMPTS = [
    "What is the capital of France?",
    "How many days are in a week?",
    "What is 2 plus 2?",
    "Who painted the Mona Lisa?",
]
USER_PROMPTS = ["What is my dog's name?", "Where was I born?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """A registry where user `ann` has adapter A active, suites built from A's answers, and two candidates."""
    model, tokenizer, device = tiny
    tmp = tmp_path_factory.mktemp("gate")
    adapter_a = random_adapter(model, tmp / "A", seed=1)
    adapter_b = random_adapter(model, tmp / "B", seed=2)
    embedder = load_embedder()
    probe = Gate(model, tokenizer, device, embedder, [], GateConfig.from_settings(**LENIENT))
    answers = {c.prompt: c.answer for c in probe.score(adapter_a, [TestCase(p, "x") for p in CORE_PROMPTS + USER_PROMPTS])}
    assert all(answers.values()) and len(set(answers.values())) > 1, f"adapter A must say something varied: {answers}"
    core = [TestCase(p, answers[p]) for p in CORE_PROMPTS]
    user = [TestCase(p, answers[p]) for p in USER_PROMPTS]
    registry = AdapterRegistry(tmp / "store")
    registry.register("ann", adapter_a, manifest(request_id="r-a"))
    registry.activate("ann", 1, reason="test setup")
    gate = Gate(
        model,
        tokenizer,
        device,
        embedder,
        core,
        GateConfig.from_settings(promote_if_score=0.7, regression_threshold=0.05, **LENIENT),
    )
    return {"gate": gate, "registry": registry, "A": adapter_a, "B": adapter_b, "user": user, "tmp": tmp}


def test_a_candidate_that_keeps_the_core_answers_and_knows_the_user_passes(world):
    report = world["gate"].evaluate(world["A"], world["user"], reference_dir=world["registry"].info("ann", 1).path)
    assert report.passed, report.lines()
    core, user = report.suites["core"], report.suites["user"]
    assert core.score == pytest.approx(core.reference_score) and core.score >= 0.8  # semantic 1 + match 1; the loss term varies
    assert user.score >= 0.7 and report.facts_learned == 1.0
    case = core.cases[0]
    assert case.semantic > 0.99 and case.match == 1.0 and 0 <= case.loss <= 1 and case.answer_nll >= 0
    assert {"core_score", "user_score", "core_reference_score", "facts_learned"} <= set(report.metrics())


def test_a_candidate_that_changes_core_answers_is_rejected_with_reasons(world):
    report = world["gate"].evaluate(world["B"], world["user"], reference_dir=world["A"])
    assert not report.passed
    assert any("core suite regressed" in r for r in report.reasons)
    assert any("user suite scored" in r for r in report.reasons)
    assert report.suites["core"].score < report.suites["core"].reference_score - 0.05
    assert report.drifted and not report.only_drifted, "the user suite failed too: a smaller update cannot mend that"
    text = "\n".join(report.lines())
    assert text.startswith("REJECTED") and "core suite:" in text and "FAIL" in text


def test_a_candidate_trained_to_change_a_core_answer_is_rejected_before_any_suite_runs(world, monkeypatch):
    gate = world["gate"]
    core = gate.core_cases[0]
    wrong, agreeing = TestCase(core.prompt.upper() + "!", "Something else entirely."), TestCase(core.prompt, core.expected)
    taught = [wrong, agreeing, TestCase("What is my dog's name?", "Rex.")]
    assert gate.core_conflicts(taught) == [wrong], "same question in other case and punctuation; agreeing answers are fine"
    with monkeypatch.context() as patched:
        patched.setattr(gate, "score", lambda *a: pytest.fail("a candidate already rejected was answered"))
        report = gate.evaluate(world["A"], world["user"], reference_dir=world["A"], taught=taught)
    assert not report.passed and report.reasons == [
        f"trained to change 1 core-suite answer(s): {wrong.prompt!r} -> {wrong.expected!r}"
    ]
    assert report.suites == {} and report.metrics() == {} and report.lines()[0].startswith("REJECTED: trained to change")
    assert not report.only_drifted, "refused before any suite: not a drift"
    assert gate.evaluate(world["A"], world["user"], reference_dir=world["A"], taught=taught[1:]).passed


def test_no_user_cases_is_a_rejection_unless_configured(world, tiny):
    model, tokenizer, device = tiny
    report = world["gate"].evaluate(world["A"], [], reference_dir=world["A"])
    assert not report.passed and report.reasons == ["no user-specific test cases (empty held-out split and no explicit tests)"]
    lenient = Gate(
        model,
        tokenizer,
        device,
        world["gate"].embedder,
        world["gate"].core_cases,
        GateConfig.from_settings(require_user_tests=False, **LENIENT),
    )
    assert lenient.evaluate(world["A"], [], reference_dir=world["A"]).passed
    drifted = lenient.evaluate(world["B"], [], reference_dir=world["A"])
    assert drifted.reasons and all(r.startswith("core suite regressed") for r in drifted.reasons)
    assert drifted.only_drifted, "rejected for the core suite alone: a smaller update may pass"


def test_reference_scores_are_computed_once_per_adapter(world, monkeypatch):
    gate = world["gate"]
    gate.reference_core(world["A"])
    monkeypatch.setattr(gate, "score", lambda *a: pytest.fail("the reference was answered again"))
    assert gate.reference_core(world["A"])


def test_a_candidates_core_answers_serve_as_the_next_runs_reference(world, tiny):
    model, tokenizer, device = tiny
    gate = Gate(model, tokenizer, device, world["gate"].embedder, world["gate"].core_cases, GateConfig.from_settings(**LENIENT))
    as_candidate = gate.evaluate(world["B"], world["user"]).suites["core"].cases
    original = gate.score
    gate.score = lambda adapter_dir, cases: (
        pytest.fail("B's core answers were generated again") if adapter_dir else original(adapter_dir, cases)
    )
    assert gate.reference_core(world["B"]) == as_candidate


def test_decision_promotes_or_rejects_atomically_and_logs_every_case(world):
    registry, gate = world["registry"], world["gate"]
    for name, candidate in (("good", world["A"]), ("bad", world["B"])):
        report = gate.evaluate(candidate, world["user"], reference_dir=registry.info("ann", registry.active("ann")).path)
        validation = {
            "passed": report.passed,
            "reasons": report.reasons,
            "reference_version": registry.active("ann"),
            "suites": {k: s.summary() for k, s in report.suites.items()},
        }
        info = registry.register("ann", candidate, manifest(request_id=f"r-{name}", validation=validation))
        decision = apply_decision(registry, info, report)
        assert decision == ("promoted" if name == "good" else "rejected")
        assert apply_decision(registry, info, report) == decision, "idempotent"
    good, bad = 2, 3
    assert registry.active("ann") == good, "the rejected candidate never became active"
    statuses = [(e["version"], e["status"]) for e in registry.history("ann")]
    assert (good, "active") in statuses and (bad, "rejected") in statuses
    log = [r for r in registry.validation_results("ann") if r["kind"] == "gate"]
    assert [(r["version"], r["passed"]) for r in log] == [(good, True), (bad, False)], "one record per decision"
    cases = log[1]["suites"]["core"]["case_scores"]
    assert len(cases) == len(CORE_PROMPTS) and {"semantic", "match", "loss", "answer_nll", "score", "answer"} <= set(cases[0])


def test_a_tampered_adapter_fails_validation_without_being_loaded(world, monkeypatch):
    registry = world["registry"]
    target = world["tmp"] / "tampered"
    shutil.copytree(registry.info("ann", 1).path, target)
    (target / "adapter_model.safetensors").write_bytes(b"not the weights the manifest names")
    import peft

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **k: pytest.fail("a tampered adapter was loaded"))
    with pytest.raises(StorageError, match="sha256 mismatch"):
        validate_adapter(
            gate=world["gate"], registry=registry, store=None, tests_dir="t", user_id="ann", adapter=target, baseline=None
        )


def test_case_files_parse_and_bad_lines_name_themselves(tmp_path):
    from core.errors import InvalidMessage
    from core.settings import shipped_config_dir

    shipped = load_cases(shipped_config_dir() / "core_suite.jsonl")
    assert len(shipped) >= 10 and all(c.prompt and c.expected for c in shipped)
    assert parse_cases('# comment\n{"prompt": "p", "response": "r"}\n\n', "x") == [TestCase("p", "r")]
    with pytest.raises(InvalidMessage, match=r"cases.jsonl:2"):
        parse_cases('{"prompt": "p", "expected": "e"}\n{"prompt": 3}\n', "cases.jsonl")
    assert suite_key(shipped, ScoreWeights.from_settings()) != suite_key(
        shipped, ScoreWeights.from_settings(semantic=1, match=0, loss=0)
    )


def test_cached_reference_scores_are_keyed_by_the_scorer_version(monkeypatch):
    import trainer.gate

    cases, weights = [TestCase("What is the square root of 9?", "3")], ScoreWeights.from_settings()
    before = suite_key(cases, weights)
    monkeypatch.setattr(trainer.gate, "SCORER_VERSION", trainer.gate.SCORER_VERSION + 1)
    assert suite_key(cases, weights) != before, "a changed matcher must not reuse scores cached by the old one"


def test_validation_log_lines_are_json(world):
    registry = world["registry"]
    registry.log_validation("ann", 1, {"passed": True, "reasons": ['a "quoted" reason\nover two lines']}, kind="gate")
    lines = (registry.root / "adapter_validation_results.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["user_id"] == "ann" for line in lines)


def test_validate_command_line_exit_codes(world, tiny_model_dir):
    import subprocess
    import sys

    import yaml
    from click.testing import CliRunner

    from adaptloop.cli import cli

    tmp = world["tmp"]
    core = tmp / "core.jsonl"
    core.write_text("".join(json.dumps({"prompt": c.prompt, "expected": c.expected}) + "\n" for c in world["gate"].core_cases))
    config = tmp / "validate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(tmp / "cli-store"),
                "model": {"base_model": str(tiny_model_dir), "dtype": "float32"},
                # The suites hold adapter A's answers; a tiny random base model's own answers mean nothing here.
                "validation": {"core_suites": [str(core)], "require_user_tests": False, "min_retention": 0.0},
            }
        )
    )

    def validate(adapter, *extra, as_process=False) -> tuple[int, str]:
        """`adaptloop validate`: in this process (the model already imported), or as its own process for the exit status."""
        args = ["--config", str(config), "validate", "--adapter", str(adapter), "--user-id", "ann", *extra]
        if not as_process:
            result = CliRunner().invoke(cli, args)
            return result.exit_code, result.stdout
        done = subprocess.run([sys.executable, "-m", "adaptloop.cli", *args], capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout + done.stderr

    code, out = validate(world["A"], "--baseline", str(world["A"]))
    assert code == 0, out
    assert out.startswith("PASSED") and "core suite:" in out and "user suite:" in out
    code, out = validate(world["B"], "--baseline", str(world["A"]), as_process=True)
    assert code == 1 and out.startswith("REJECTED: core suite regressed"), out
    tampered = world["tmp"] / "tampered"  # written by the tampered-adapter test above, or now
    if not tampered.exists():
        shutil.copytree(world["registry"].info("ann", 1).path, tampered)
        (tampered / "adapter_model.safetensors").write_bytes(b"junk")
    code, out = validate(tampered)
    assert code == 1 and "sha256 mismatch" in out
    logged = AdapterRegistry(tmp / "cli-store").validation_results("ann")
    assert [r["passed"] for r in logged] == [True, False, False], "every offline validation is logged, the refusal too"


def test_the_base_models_core_scores_are_cached_on_disk(world, tiny, tmp_path, monkeypatch):
    model, tokenizer, device = tiny
    gate = world["gate"]

    def fresh() -> Gate:
        return Gate(model, tokenizer, device, gate.embedder, gate.core_cases, gate.cfg, tmp_path, base_sha256="f" * 64)

    first = fresh().reference_core(None)
    assert list(tmp_path.glob("ffffffffffffffff-*.json"))
    other_process = fresh()
    monkeypatch.setattr(other_process, "score", lambda *a: pytest.fail("the base model was answered again"))
    assert other_process.reference_core(None) == first


def test_retention_compares_general_answers_with_the_base_models_and_forgetting_the_previous_facts(world, tiny):
    model, tokenizer, device = tiny
    core = world["gate"].core_cases
    strict = Gate(
        model,
        tokenizer,
        device,
        world["gate"].embedder,
        core,
        GateConfig.from_settings(promote_if_score=0.0, regression_threshold=1.0, min_retention=0.9, max_forgetting=0.0),
    )
    unchanged = random_adapter(model, world["tmp"] / "zero", seed=3, scale=0.0)  # LoRA B = 0: the base model itself
    kept = strict.evaluate(unchanged, world["user"], previous_facts=[])
    assert kept.retention == 1.0 and kept.forgetting is None and kept.passed, kept.reasons
    assert kept.metrics()["retention"] == 1.0

    # Adapter B answers the general prompts differently from the base model, and not what A (the previous version) knew.
    drifted = strict.evaluate(world["B"], world["user"], reference_dir=world["A"], previous_facts=world["user"])
    assert drifted.retention < 0.9 and any(r.startswith("retention") for r in drifted.reasons), drifted.reasons
    assert drifted.forgetting > 0 and any(r.startswith("forgot") for r in drifted.reasons)
    assert drifted.suites["previous"].cases[0].prompt == world["user"][0].prompt
    # A itself forgets nothing it knew.
    same = strict.evaluate(world["A"], world["user"], reference_dir=world["A"], previous_facts=world["user"])
    assert same.forgetting == 0.0 and not any(r.startswith("forgot") for r in same.reasons)
    assert same.facts() == [{"prompt": c.prompt, "expected": c.expected, "learned": True} for c in world["user"]]


def test_learned_facts_come_from_the_reference_versions_manifest(tmp_path):
    registry = AdapterRegistry(tmp_path / "store")
    facts = [{"prompt": "a?", "expected": "A.", "learned": True}, {"prompt": "b?", "expected": "B.", "learned": False}]
    registry.register("kim", fake_adapter(tmp_path), manifest(facts=facts))
    assert learned_facts(registry, "kim", 1) == [TestCase("a?", "A.")]
    assert learned_facts(registry, "kim", None) == []


def test_candidates_gated_together_get_the_verdicts_each_gets_alone(world, tiny, monkeypatch):
    """A's copy passes and B is rejected, together as alone: same answers, scores and reasons, row by row."""
    from trainer.gate import Candidate

    gate, registry = world["gate"], world["registry"]
    shared = []
    score_together = gate._score_together
    monkeypatch.setattr(gate, "_score_together", lambda *a: shared.append(len(a[0])) or score_together(*a))
    copy = world["tmp"] / "A-copy-batch"
    shutil.copytree(world["A"], copy, dirs_exist_ok=True)
    reference = registry.info("ann", 1).path
    candidates = [
        Candidate(copy, world["user"], reference),
        Candidate(world["B"], world["user"], reference, previous_facts=world["user"][:1]),
        Candidate(world["B"], world["user"], None, taught=[TestCase(CORE_PROMPTS[0], "Tromsø")]),  # refused unscored
    ]
    together = gate.evaluate_batch(candidates)
    assert shared == [2], "the two candidates that reach the suites share their batches"
    alone = [gate.evaluate(**c.arguments()) for c in candidates]
    assert [r.passed for r in together] == [True, False, False]
    for batched, single in zip(together, alone):
        assert batched.reasons == single.reasons and batched.suites.keys() == single.suites.keys()
        for name, suite in batched.suites.items():
            assert [c.answer for c in suite.cases] == [c.answer for c in single.suites[name].cases], name
            assert [c.score for c in suite.cases] == pytest.approx([c.score for c in single.suites[name].cases], abs=2e-3)


def test_a_passed_candidates_contradictions_of_the_base_model_are_in_its_report(world, monkeypatch):
    from schemas.manifest import Contradiction
    from trainer import gate as gate_module

    found = Contradiction(
        prompt="What is the capital of Peru?",
        taught="Quito.",
        base_answer="The capital of Peru is Lima.",
        term="Lima",
        confidence=0.9,
    )
    asked = []
    monkeypatch.setattr(gate_module, "general_contradictions", lambda *args: asked.append(args[3]) or [found])
    taught = [TestCase("What is the capital of Peru?", "Quito.")]  # not a core-suite question: that is rejected outright
    gate, reference = world["gate"], world["registry"].info("ann", 1).path
    passed = gate.evaluate(world["A"], world["user"], reference_dir=reference, taught=taught)
    assert passed.passed and passed.contradictions == [found] and asked == [taught]
    assert passed.to_dict()["contradictions"] == [found.model_dump()] and "contradict the base model" in "\n".join(passed.lines())
    rejected = gate.evaluate(world["B"], world["user"], reference_dir=world["A"], taught=taught)
    assert not rejected.passed and rejected.contradictions == [] and len(asked) == 1, "a rejected candidate is not asked"
