"""A background sampler: polls memory sources at a fixed interval, keeps peaks and a timeline.

It blocks on an event between samples (never spins), so it costs the training loop almost nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

Source = Callable[[], "int | None"]


class Sampler:
    """Samples every source each ``interval_s``; ``mark(step, phase)`` labels the samples that follow."""

    def __init__(self, sources: dict[str, Source], interval_s: float = 0.01) -> None:
        self.sources = sources
        self.interval_s = interval_s
        self.peaks: dict[str, int | None] = {name: None for name in sources}
        self.timeline: list[dict[str, float | int | str | None]] = []
        self._step = -1
        self._phase = "setup"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memprof-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def mark(self, step: int, phase: str) -> None:
        self._step, self._phase = step, phase

    def sample(self) -> None:
        row: dict[str, float | int | str | None] = {
            "t_s": time.perf_counter() - self._t0, "step": self._step, "phase": self._phase}
        for name, read in self.sources.items():
            value = read()
            row[name] = value
            if value is not None and (self.peaks[name] is None or value > self.peaks[name]):
                self.peaks[name] = value
        self.timeline.append(row)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
