"""Run a suite's cells through a pool of executors, writing each result as it arrives. Enters: a validated
``Suite`` and its cells; leaves: the results folder and a ``RunOutcome``. What a person sees meanwhile is the
``Observer``'s business (``memprof.views.progress``): this module prints nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from memprof.config.spec import CellConfig
from memprof.errors import UserError
from memprof.results import env as env_mod
from memprof.results.record import CellResult, Record, Status
from memprof.results.store import RunWriter, new_run_dir, prepare_resume
from memprof.run.executor import LocalPool, Pool, PreflightFailed
from memprof.run.messages import StepDone
from memprof.run.processes import Interrupts
from memprof.suite import Suite


class Observer(Protocol):
    """What a run tells whoever watches it, in order: ``checking`` (a block while the workers start and the models
    are checked), ``start``, then ``step`` and ``done`` as they happen (``step`` from the pool's threads)."""

    def checking(self) -> AbstractContextManager[None]: ...

    def start(self, cells: list[CellConfig], finished: list[Record]) -> None: ...

    def step(self, message: StepDone) -> None: ...

    def done(self, result: CellResult) -> None: ...


@dataclass(frozen=True)
class RunOutcome:
    """Where the results went (None: interrupted before anything was written), every record of the folder, and
    whether the run was interrupted (``memprof run --resume run_dir`` finishes it)."""

    run_dir: Path | None
    records: list[Record]
    interrupted: bool


def run_suite(suite: Suite, cells: list[CellConfig], out_root: Path, sample_interval_s: float | None, observer: Observer,
              resume: Path | None = None, jobs: int = 1, executor: str = "local",
              address: str | None = None) -> RunOutcome:
    """Run every cell (``resume``: an earlier run folder of the same suite and cells, which gets only the cells it
    lacks; interrupted ones run again).

    Faults inside cells are results. Ctrl-C or SIGTERM interrupts the running cell (recorded as ``interrupted``),
    keeps every finished cell, and stops. No results folder is created before the suite's models passed the checks
    that need the libraries (``memprof.run.preflight``). ``executor`` is ``local`` (``jobs`` processes) or ``ray``
    (tasks on the Ray cluster at ``address``, see ``memprof.run.ray_pool``).

    Raises:
        UserError: a model or adapter the checks refuse, or a folder that cannot be resumed.
    """
    manifest = {"suite": suite.name, "suite_digest": suite.digest, "cell_keys": [c.key for c in cells],
                "config_hashes": [c.config_hash for c in cells], "suite_folder": str(suite.folder)}
    if resume is not None:
        prepare_resume(resume, manifest)  # before the zygote starts: the wrong folder fails at once
    pool = make_pool(executor, jobs, address, sample_interval_s)
    with Interrupts(pool.interrupt) as interrupts:
        try:
            with observer.checking():
                try:
                    problems = pool.preflight(suite.preflight_pairs())
                except PreflightFailed as err:
                    if not interrupts.came:
                        raise UserError(str(suite.path), f"checking the models failed: {err}") from None
                    problems = []
            if interrupts.came:
                return RunOutcome(None, [], True)
            if problems:
                p = problems[0]
                raise suite.preflight_error(p.model, p.adapter, p.field, p.error)
            run_dir = resume or new_run_dir(out_root, suite.name)
            pool.log_to(run_dir / "logs")
            writer = RunWriter(run_dir, suite.text, manifest, env_mod.capture())
            finished = {r.config.index for r in writer.records}
            observer.start(cells, list(writer.records))
            pending = [c for c in cells if c.index not in finished]
            for result in pool.run_all(pending, lambda: interrupts.came, observer.step):
                writer.append(result)
                observer.done(result)
        finally:
            pool.close()
    interrupted = interrupts.came or any(r.status is Status.INTERRUPTED for r in writer.records)
    return RunOutcome(run_dir, writer.records, interrupted)


def make_pool(executor: str, jobs: int, address: str | None, sample_interval_s: float | None) -> Pool:
    """``LocalPool`` (``jobs`` local processes) or, for ``executor == "ray"``, a ``RayPool`` on ``address``."""
    if executor == "ray":
        from memprof.run.ray_pool import RayPool

        return RayPool(address, sample_interval_s=sample_interval_s)
    return LocalPool(jobs, sample_interval_s=sample_interval_s)

