"""The machine a benchmark ran on, and what the host took from it while it ran (a VM's stolen CPU time).

    machine()                                # "x86_64, 2 CPUs: AMD EPYC (family 25, model 1), AVX2"
    with StolenCpu() as stolen:
        ...                                  # the measured work
    stolen.share                             # 0.3: the hypervisor ran something else 30% of the CPUs' time

A "2-core VM" is not one machine: this project's sessions have been given
Intel CPUs with AMX, whose bfloat16 products make a training step several
times faster (trainer/precision.py), and AMD EPYC CPUs with AVX2 alone, where
the step multiplies in float32. So every benchmark names the CPU's model and
its widest vector unit, and figures compare only within one kind.

On a shared virtual machine the hypervisor may run other guests on this
machine's cores; Linux counts that time as "steal" (/proc/stat). Wall-clock
figures measured while 30% of the CPUs' time was stolen are that much slower
than the code is, so the benchmarks that report seconds report the share too:
compare figures measured at similar shares, or paired rounds of one run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

_STAT = Path("/proc/stat")
_CPUINFO = Path("/proc/cpuinfo")


def machine() -> str:
    """The architecture, the CPU count and the CPU: what every benchmark's results name (`cpu()`)."""
    return f"{platform.machine()}, {os.cpu_count()} CPUs: {cpu()}"


def cpu() -> str:
    """The CPU's model name, family and model, and its widest vector unit (AMX, AVX-512, AVX2), from
    /proc/cpuinfo; the processor string `platform` knows where that is not there (not Linux)."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    unit = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}), {unit}"


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, all) ticks of every CPU since boot; None where /proc/stat is not there (not Linux)."""
    try:
        fields = _STAT.read_text(encoding="ascii").splitlines()[0].split()
    except (OSError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already counted in user and nice]
    ticks = [int(v) for v in fields[1:9]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


class StolenCpu:
    """The share of the CPUs' time the hypervisor took between entering and leaving (None where not measured)."""

    def __init__(self) -> None:
        self.share: float | None = None
        self._start: tuple[int, int] | None = None

    def __enter__(self) -> StolenCpu:
        self._start = cpu_ticks()
        return self

    def __exit__(self, *_exc) -> None:
        end = cpu_ticks()
        if self._start is not None and end is not None and end[1] > self._start[1]:
            self.share = round((end[0] - self._start[0]) / (end[1] - self._start[1]), 3)
