"""`memprof fit`: the largest batch size (or sequence length) that really trains on this device.

Each trial is a cell run in a fresh process by the local executor, so one trial's allocations never help or hurt
the next. From ``--start`` the search doubles until a trial fails (or, when the first does, halves until one fits),
then bisects between the last success and the first failure (``memprof.plan.predict.largest``): from 1,
``2·floor(log2 n*) + 2`` trials for an answer n* below the search limit, and never a value past ``--max``. A trial
fits when it ends ``ok`` and its peak stays under ``(1 - margin)`` of the limit, and does not when it ends ``oom``
or its peak is over that; any other end (crashed, timed out, diverged...) says nothing about memory and stops the
search without an answer, as Ctrl-C (or SIGTERM) does: it interrupts the running trial and keeps the trials
before. On the CPU the limit is ``--memory-budget``, which also caps the worker's address space (an allocation
beyond it is a real OOM); on CUDA it is the budget or the card's memory, and the peak is NVML's figure for the
process (else the allocator's reserved bytes).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memprof.config.spec import AXIS_BY_NAME, MAX_TIMEOUT_S, MIN_MEMORY_BUDGET, CellConfig
from memprof.errors import UserError
from memprof.plan.predict import largest
from memprof.results.record import Record, Status

AXES = ("batch_size", "seq_len")


@dataclass(frozen=True)
class Trial:
    """One measured attempt."""

    value: int
    status: str
    peak_bytes: int | None
    fits: bool | None  # None: it ended neither ok nor oom, which says nothing about memory
    wall_s: float
    error: str = ""


@dataclass
class Search:
    """The trials of one search and its answer: 0 when even the smallest value does not fit, None when ``failed``
    stopped the search first."""

    axis: str
    limit_bytes: int
    margin: float
    config: str = ""  # the configuration every trial ran, the searched axis aside (its key)
    device: str = "cpu"
    capped_address_space: bool = False  # the CPU's limit: each trial's address space, not its resident memory
    trials: list[Trial] = field(default_factory=list)
    best: int | None = None
    wall_s: float = 0.0
    failed: Trial | None = None  # the trial that stopped the search (the last one): crashed, timed out...
    interrupted: bool = False  # Ctrl-C or SIGTERM stopped the search (``failed``: the trial it cut short, if any)

    @property
    def bounds(self) -> tuple[int | None, int | None]:
        """The largest value that fitted and the smallest that did not, among the trials so far."""
        fitted = [t.value for t in self.trials if t.fits]
        refused = [t.value for t in self.trials if t.fits is False]
        return max(fitted, default=None), min(refused, default=None)


def measured_peak(record: Record) -> int | None:
    """The peak to hold against the limit: the process's device memory on CUDA, RSS growth on the CPU."""
    if record.peak_reserved_bytes is not None:
        return record.nvml_peak_process_used_bytes or record.peak_reserved_bytes
    return record.peak_rss_delta_bytes


def trial_cell(request: CellConfig, axis: str, value: int, index: int, steps: int, device: str,
               budget_bytes: int, timeout_s: float) -> CellConfig:
    """The cell one trial runs: the request with ``axis`` (``batch_size`` or ``seq_len``) set to ``value``, for
    ``steps`` steps (one of them warm-up)."""
    return request.with_values({"suite": "fit", "index": index, f"shape.{axis}": value, "training.steps": steps,
                                "training.warmup_steps": min(1, steps - 1), "training.lr": 1e-4,
                                "budget.device": device, "budget.timeout_s": timeout_s,
                                "budget.memory_budget_bytes": budget_bytes})


class _Stopped(Exception):
    """A trial ended neither ok nor oom: the search cannot go on."""


def search(request: CellConfig, axis: str, run: Callable[[CellConfig], Record], limit_bytes: int, margin: float,
           steps: int, device: str, cap_address_space: bool, start: int = 1, maximum: int = 1 << 16,
           granularity: int = 1, timeout_s: float = 600.0, on_trial: Callable[[Trial], None] | None = None,
           interrupted: Callable[[], bool] = lambda: False) -> Search:
    """Find the largest ``axis`` value, a multiple of ``granularity`` from ``start`` (rounded down to one, at least
    ``granularity``) to ``maximum`` (rounded down), whose trial fits; stop at the first trial that neither fits nor
    runs out of memory.

    Args:
        run: runs one cell in a fresh process and returns its record (``LocalExecutor.run``).
        cap_address_space: give each trial ``limit_bytes`` as its memory budget (the CPU's hard cap).
        maximum: at least ``start`` and ``granularity`` (``run_search`` checks both).
        interrupted: whether Ctrl-C came; checked before each trial (``run`` ends the running one ``interrupted``).
    """
    out = Search(axis, limit_bytes, margin, request.repeat_key_without(axis), device, cap_address_space)
    t0 = time.perf_counter()

    def fits(n: int) -> bool:
        if interrupted():
            raise _Stopped
        value = n * granularity
        cell = trial_cell(request, axis, value, len(out.trials), steps, device,
                          limit_bytes if cap_address_space else 0, timeout_s)
        t = time.perf_counter()
        record = run(cell)
        peak = measured_peak(record)
        ok: bool | None = None
        if record.status in (Status.OK, Status.OOM):
            ok = record.status is Status.OK and peak is not None and peak <= (1 - margin) * limit_bytes
        trial = Trial(value, record.status.value, peak, ok, time.perf_counter() - t, record.error)
        out.trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if ok is None:
            raise _Stopped
        return ok

    try:
        out.best = largest(fits, maximum // granularity, start=max(1, start // granularity)) * granularity
    except _Stopped:
        out.interrupted = interrupted()
        out.failed = out.trials[-1] if out.trials and out.trials[-1].fits is None else None
    out.wall_s = time.perf_counter() - t0
    return out


def on_cuda(device: str) -> bool:
    """Whether ``device`` (cuda, cpu or auto) runs on a GPU: auto does where one is visible."""
    return device == "cuda" or (device == "auto" and torch.cuda.device_count() > 0)


def run_search(request: CellConfig, axis: str, budget_bytes: int | None, margin: float, steps: int, device: str,
               start: int, maximum: int, granularity: int, timeout_s: float,
               on_trial: Callable[[Trial], None] | None = None) -> Search:
    """``search`` with a local executor, the limit resolved for the device the trials run on.

    Raises:
        UserError: for bad limits, or no memory budget on the CPU (the search would run until the host swaps).
    """
    from memprof.results import env as env_mod
    from memprof.run.executor import LocalExecutor
    from memprof.run.processes import Interrupts

    if axis not in AXES:
        raise UserError("--search", f"must be one of {', '.join(AXES)}")
    if not 0 <= margin < 1:
        raise UserError("--margin", f"must be in [0, 1), got {margin}")
    if steps < 1:
        raise UserError("--steps", f"must be at least 1, got {steps}")
    if granularity < 1:
        raise UserError("--granularity", f"must be positive, got {granularity}")
    if start < 1:
        raise UserError("--start", f"must be positive, got {start}")
    if maximum < granularity:
        raise UserError("--max", f"must be at least the granularity ({granularity}), got {maximum}")
    if start > maximum:
        raise UserError("--start", f"must be at most --max ({maximum}), got {start}")
    least, most = AXIS_BY_NAME[axis].minimum, AXIS_BY_NAME[axis].maximum
    if maximum > most:
        raise UserError("--max", f"{axis} is at most {most:,}, got {maximum:,}")
    if granularity < least:  # the search may come down to one granularity
        raise UserError("--granularity", f"{axis} is at least {least}: search it in multiples of {least} or more, "
                                         f"not {granularity}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise UserError("--timeout", f"must be positive and at most {MAX_TIMEOUT_S:g} s (a week), got {timeout_s}")
    if budget_bytes is not None and budget_bytes < MIN_MEMORY_BUDGET:
        raise UserError("--memory-budget", f"a memory budget must be at least {MIN_MEMORY_BUDGET:,} B (8 MiB), got "
                                           f"{budget_bytes:,}")
    cuda = on_cuda(device)
    limit = budget_bytes
    if limit is None and cuda:
        gpus = env_mod.capture()["gpus"]
        limit = gpus[0]["memory_bytes"] if gpus else None
    if limit is None and cuda:
        raise UserError("--memory-budget", "required where NVML names no GPU to take the limit from (--device "
                        "cuda on a host without one?)")
    if limit is None:
        raise UserError("--memory-budget", "required on the CPU: trials are capped at this many bytes of address "
                        "space (without it the search would run until the host swaps)")
    with tempfile.TemporaryDirectory(prefix="memprof-fit-") as logs:
        executor = LocalExecutor(Path(logs))
        # the zygote passes Ctrl-C on to the running trial, which ends 'interrupted' (so does one whose zygote the
        # signal reached before it could pass it on)
        with Interrupts(executor.interrupt) as interrupts:

            def run(cell: CellConfig) -> Record:
                return executor.run(cell).record

            try:
                executor.ready_unless_interrupted()  # the worker's start is no trial's time
                return search(request, axis, run, limit, margin, steps, "cuda" if cuda else "cpu",
                              cap_address_space=not cuda, start=start, maximum=maximum, granularity=granularity,
                              timeout_s=timeout_s, on_trial=on_trial, interrupted=lambda: interrupts.came)
            finally:
                executor.close()
