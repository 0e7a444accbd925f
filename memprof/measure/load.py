"""How contended the machine's CPUs were while a cell trained: Linux's pressure stall information (PSI).

``/proc/pressure/cpu``'s ``some total`` counts the microseconds during which at least one runnable task waited for a
CPU, machine-wide (a container sees its cgroup's). Its growth over the training window, over the window's length, is
the share of the training time that something waited: near 0 on a quiet machine, high when other work (another
job, a test run, a build) competes with the cell, whose timings then say as much about the neighbours as about
the optimizer (``memprof.analysis.contention`` flags them)."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType

PRESSURE = Path("/proc/pressure/cpu")


def cpu_stall_us(path: Path = PRESSURE) -> int | None:
    """PSI's ``some total`` for the CPU, in microseconds; None where the kernel has no PSI (macOS, old kernels, or
    PSI turned off)."""
    try:
        first = path.read_text().splitlines()[0]
        return int(first.rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


class CpuPressure:
    """``with CpuPressure() as p: ...`` then ``p.share``: the share of the block's wall time during which a runnable
    task waited for a CPU (None without PSI, or before the block ended)."""

    def __init__(self, path: Path = PRESSURE) -> None:
        self.path = path
        self.share: float | None = None
        self._start: tuple[float, int | None] = (0.0, None)

    def __enter__(self) -> CpuPressure:
        self._start = (time.monotonic(), cpu_stall_us(self.path))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        t0, stall0 = self._start
        stall1, wall = cpu_stall_us(self.path), time.monotonic() - t0
        if stall0 is not None and stall1 is not None and wall > 0:
            self.share = min(max((stall1 - stall0) / 1e6 / wall, 0.0), 1.0)
