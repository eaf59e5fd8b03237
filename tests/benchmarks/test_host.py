"""The benchmarks' record of the CPU time a hypervisor took meanwhile."""

from __future__ import annotations

import pytest

import benchmarks.host as host

pytestmark = pytest.mark.unit


def _stat(path, steal: int, busy: int) -> None:
    path.write_text(f"cpu  {busy} 0 0 100 0 0 0 {steal} 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n", encoding="ascii")


def test_the_stolen_share_is_the_steal_ticks_over_all_ticks_meanwhile(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(host, "_STAT", stat)
    _stat(stat, steal=50, busy=1000)
    with host.StolenCpu() as stolen:
        _stat(stat, steal=80, busy=1070)  # 100 more ticks, 30 of them stolen (guest time is inside user's already)
    assert stolen.share == 0.3


def test_no_share_where_the_kernel_does_not_count_it(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_STAT", tmp_path / "missing")
    with host.StolenCpu() as stolen:
        pass
    assert host.cpu_ticks() is None and stolen.share is None
