"""What the host took from this machine while a benchmark ran: a virtual machine's stolen CPU time.

    with StolenCpu() as stolen:
        ...                                  # the measured work
    stolen.share                             # 0.3: the hypervisor ran something else 30% of the CPUs' time

On a shared virtual machine the hypervisor may run other guests on this
machine's cores; Linux counts that time as "steal" (/proc/stat). Wall-clock
figures measured while 30% of the CPUs' time was stolen are that much slower
than the code is, so the benchmarks that report seconds report the share too:
compare figures measured at similar shares, or paired rounds of one run.
"""

from __future__ import annotations

from pathlib import Path

_STAT = Path("/proc/stat")


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
