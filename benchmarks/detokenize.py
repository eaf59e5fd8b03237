"""Streaming detokenization benchmark: a served row's text, token by token, decoded incrementally or all again.

    .venv/bin/python benchmarks/detokenize.py [--lengths 512 2048 8192 --rounds 5]

The default model's tokenizer; an answer of English prose with accented
letters and an emoji, pushed one token at a time through serving/engine.py's
`TextStream` (with two stop sequences, as a request may name them), and
through the same stream decoding the whole answer again at every token (the
`TextStream` before 2026-12-07: the baseline). For each answer length: the
mean time a token costs and the time of the last one, medians of `--rounds`,
and their ratios; both must give the same pieces. Printed and written to
benchmarks/results/detokenize-<date>.json. Record them in
benchmarks/README.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.host import machine  # noqa: E402
from serving.engine import TextStream  # noqa: E402

PROSE = "The quick brown fox jumps over the lazy dog, 12 km from the café; a naïve résumé ☕ of what it saw. "
STOPS = ("STOP", "\n\nUser:")


class WholeDecode(TextStream):
    """The baseline: every token decodes the whole answer again."""

    def _grow(self) -> None:
        self._settled, self._unsettled = "", self._decode(self.ids)


def default_tokenizer():
    """The settings' base model's tokenizer, loaded as `adaptloop serve` loads it."""
    from core.settings import load_settings
    from trainer.model import load_base, resolve_base_model

    settings = load_settings()
    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    return load_base(base, "float32")[1]


def stream_seconds(kind: type[TextStream], tokenizer, ids: list[int]) -> tuple[float, float, list[str]]:
    """(mean seconds a token, seconds of the last token, the pieces sent)."""
    stream = kind(tokenizer, STOPS)
    started = time.perf_counter()
    pieces = [stream.push(token) for token in ids[:-1]]
    before_last = time.perf_counter()
    pieces.append(stream.push(ids[-1]))
    ended = time.perf_counter()
    return (ended - started) / len(ids), ended - before_last, pieces


def measure(tokenizer, length: int, rounds: int) -> dict:
    ids = tokenizer(PROSE * (length // 20 + 1), add_special_tokens=False)["input_ids"][:length]
    runs: dict[str, list] = {"incremental": [], "whole": []}
    for _ in range(rounds):
        for name, kind in (("incremental", TextStream), ("whole", WholeDecode)):
            runs[name].append(stream_seconds(kind, tokenizer, ids))
    if runs["incremental"][0][2] != runs["whole"][0][2]:
        raise SystemExit(f"the two streams sent different pieces at {length} tokens")
    row = {"tokens": length}
    for name, seconds in runs.items():
        row[f"{name}_mean_ms"] = 1000 * statistics.median(s[0] for s in seconds)
        row[f"{name}_last_ms"] = 1000 * statistics.median(s[1] for s in seconds)
    row["mean_speedup"] = row["whole_mean_ms"] / row["incremental_mean_ms"]
    row["last_speedup"] = row["whole_last_ms"] / row["incremental_last_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokenizer = default_tokenizer()
    rows = [measure(tokenizer, length, args.rounds) for length in args.lengths]
    print(
        f"{'tokens':>7} {'whole ms/token':>15} {'incremental':>12} {'x':>6} {'last token: whole':>18} {'incremental':>12} {'x':>6}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['whole_mean_ms']:>15.3f} {r['incremental_mean_ms']:>12.3f} {r['mean_speedup']:>6.1f}"
            f" {r['whole_last_ms']:>18.3f} {r['incremental_last_ms']:>12.3f} {r['last_speedup']:>6.1f}"
        )
    day = datetime.now(UTC).date().isoformat()
    out = REPO / "benchmarks" / "results" / f"detokenize-{day}.json"
    out.write_text(json.dumps({"date": day, "machine": machine(), "rounds": args.rounds, "rows": rows}, indent=2) + "\n")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
