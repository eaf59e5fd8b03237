"""The Kafka jars are fetched once per machine, also when several processes start brokers at once."""

from __future__ import annotations

import multiprocessing
import os
import stat
import sys

import pytest

from core.kafka.broker import ensure_kafka_jars

pytestmark = pytest.mark.unit

# Stands in for Maven: counts its runs and takes a while, so that two unlocked fetches would overlap.
FAKE_MVN = """#!{python}
import pathlib, sys, time
out = pathlib.Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("-DoutputDirectory=")))
with open({runs!r}, "a") as fh:
    fh.write("run\\n")
time.sleep(1.0)
out.mkdir(parents=True, exist_ok=True)
(out / "kafka.jar").write_bytes(b"jar")
"""


def _fetch(cache_dir, barrier, results) -> None:
    barrier.wait()  # both processes ask at once
    results.put(str(ensure_kafka_jars(cache_dir, "9.9.9")))


def test_processes_starting_at_once_fetch_the_jars_once(tmp_path, monkeypatch):
    bin_dir, runs = tmp_path / "bin", tmp_path / "mvn-runs"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(FAKE_MVN.format(python=sys.executable, runs=str(runs)), encoding="utf-8")
    mvn.chmod(mvn.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_fetch, args=(tmp_path / "cache", barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    libs = {results.get(timeout=5) for _ in workers}
    assert len(libs) == 1 and (tmp_path / "cache" / "kafka" / "dist" / "9.9.9" / "libs" / "kafka.jar").is_file()
    assert runs.read_text().count("run") == 1, "one process fetched, the other waited and used its jars"
