"""A background sampler: polls memory sources at a fixed interval, keeps peaks and a timeline.

The thread sleeps between samples (the GIL is free meanwhile): in ``time.sleep`` rather than on an event, whose
``Condition.wait`` runs Python under the GIL at every wake-up (a lock allocated, queued and released; the thread's CPU
per wake-up was about 75 µs against 45-60 µs on a 2-core VM), so stopping waits for the sleep under way to end. Each
wake-up and sample still take the GIL from the training thread, which on a launch-bound GPU step is time the GPU
waits, so a sample must be short: a source that costs a driver round trip (NVML) says so with ``period_s`` and is
read less often.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Source:
    """Figures read by one call, in ``columns`` order; read at most once per ``period_s`` (0: at every sample), and
    where ``due`` is given only when it answers True (what the source measures may have moved), but always at the
    first and last sample, and with ``each_phase`` also at the first sample after each ``mark``. A sample that skips
    a source leaves its columns None in that row."""

    columns: tuple[str, ...]
    read: Callable[[], Sequence[int | None]]
    period_s: float = 0.0
    due: Callable[[], bool] | None = None
    each_phase: bool = False


class Sampler:
    """Samples the sources each ``interval_s``; ``mark(step, phase)`` labels the samples that follow."""

    def __init__(self, sources: Sequence[Source], interval_s: float = 0.01) -> None:
        self.sources = tuple(sources)
        self.interval_s = interval_s
        self.peaks: dict[str, int | None] = {name: None for s in self.sources for name in s.columns}
        self.timeline: list[dict[str, float | int | str | None]] = []
        self._where: tuple[int, str] = (-1, "setup")  # one attribute: a sample reads step and phase together
        self._marks = 0
        self._last_read = [-float("inf")] * len(self.sources)
        self._marks_read = [0] * len(self.sources)  # how many marks there had been at each source's last read
        self.busy_s = 0.0  # CPU time of the sampling thread: an upper bound on the GIL it held
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="memprof-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def mark(self, step: int, phase: str) -> None:
        self._where = (step, phase)
        self._marks += 1

    def sample(self, every_source: bool = False) -> None:
        now = time.perf_counter()
        row: dict[str, float | int | str | None] = {"t_s": now - self._t0, "step": None, "phase": None}
        marks = self._marks
        for i, source in enumerate(self.sources):
            new_phase = source.each_phase and marks != self._marks_read[i]
            if not (every_source or new_phase) and (now - self._last_read[i] < source.period_s
                                                    or (source.due is not None and not source.due())):
                row.update(dict.fromkeys(source.columns))
                continue
            self._last_read[i], self._marks_read[i] = now, marks
            for name, value in zip(source.columns, source.read()):
                row[name] = value
                if value is not None and (self.peaks[name] is None or value > self.peaks[name]):
                    self.peaks[name] = value
        # labelled after the reads: a read may wait for the GIL while the training thread moves on (a long op in a
        # new phase), and a value labelled with the phase before it would put that phase's memory in the last one
        row["step"], row["phase"] = self._where
        self.timeline.append(row)

    def _run(self) -> None:
        start = time.thread_time()
        while True:
            time.sleep(self.interval_s)
            if self._stopped:
                break
            self.sample()
        self.busy_s = time.thread_time() - start

    def __enter__(self) -> Sampler:
        self.sample(every_source=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopped = True
        self._thread.join()
        self.sample(every_source=True)
