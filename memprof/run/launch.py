"""One cell in the process the zygote forked for it: on its one device, or on the ranks a sharded cell forks.
Enters: a ``CellConfig``; leaves: its ``CellResult``. This is where the sharded/unsharded decision is made, so the
worker (one device) and the rank launcher (several) never call back into each other."""

from __future__ import annotations

from collections.abc import Callable

from memprof.config.spec import CellConfig
from memprof.results.record import CellResult
from memprof.run.ranks import run_ranks
from memprof.run.worker import measure_cell
from memprof.train.training import resolve_device


def run_cell(cell: CellConfig, sample_interval_s: float | None = None,
             on_step: Callable[[int, float], None] | None = None) -> CellResult:
    """Measure ``cell``; a sharded one on each of its ranks (``memprof.run.ranks`` forks them before anything
    computes). Never raises for a fault inside the cell: those are the Record's ``status``. ``on_step(step,
    loss)`` hears of each finished optimizer step (rank 0's)."""
    if cell.levers.parallel.strategy != "none":
        return run_ranks(cell, sample_interval_s, on_step)
    return measure_cell(cell, resolve_device(cell.budget.device), sample_interval_s, on_step)
