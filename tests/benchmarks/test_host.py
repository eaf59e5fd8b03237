"""The benchmarks' record of the machine: its CPU, and the CPU time a hypervisor took meanwhile."""

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


def _cpuinfo(path, name: str, flags: str) -> None:
    block = f"processor\t: {{n}}\nvendor_id\t: x\ncpu family\t: 6\nmodel\t\t: 143\nmodel name\t: {name}\nflags\t\t: {flags}\n\n"
    path.write_text(block.format(n=0) + block.format(n=1).replace(name, "another"), encoding="utf-8")


@pytest.mark.parametrize(
    ("flags", "unit"),
    [
        ("fpu avx avx2 avx512f amx_bf16 amx_tile", "AMX"),
        ("avx2 avx512f avx512_bf16", "AVX-512"),
        ("avx avx2", "AVX2"),
        ("sse4_2", "no AVX2"),
    ],
)
def test_the_cpu_is_named_with_its_widest_vector_unit(tmp_path, monkeypatch, flags, unit):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(host, "_CPUINFO", info)
    _cpuinfo(info, "Intel(R) Xeon(R) Platinum 8480C", flags)
    assert host.cpu() == f"Intel(R) Xeon(R) Platinum 8480C (family 6, model 143), {unit}"  # the first processor's block
    assert host.machine().endswith(f" CPUs: {host.cpu()}")


def test_a_machine_without_cpuinfo_is_named_by_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(host.platform, "processor", lambda: "arm")
    assert host.cpu() == "arm"
    monkeypatch.setattr(host.platform, "processor", lambda: "")  # platform knows nothing either
    assert host.cpu() == "unknown CPU"
