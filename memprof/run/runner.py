"""Run a suite's cells through an executor, writing each result as it arrives, with a progress bar."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memprof.results import env as env_mod
from memprof.config.cell import Cell
from memprof.errors import UserError
from memprof.run.executor import LocalPool, Pool, PreflightFailed
from memprof.results.record import Status
from memprof.results.store import RunWriter, new_run_dir, prepare_resume
from memprof.suite.load import Suite
from memprof.views.tables import results_table

EXIT_INTERRUPTED = 130


def run_suite(suite: Suite, cells: list[Cell], out_root: Path, sample_interval_s: float, console: Console,
              out: Console, compare: Callable[[Path], int] | None = None, resume: Path | None = None,
              jobs: int = 1, executor: str = "local", address: str | None = None) -> int:
    """Run every cell; return the process exit code (0, or 130 when interrupted).

    Faults inside cells are results and do not change the exit code. Ctrl-C or SIGTERM interrupts the running
    cell (recorded as ``interrupted``), keeps every finished cell, and stops. ``compare``, called with the run
    folder after a run that was not interrupted, gives the exit code instead (``--compare-to``). ``resume``, an
    earlier run folder of the same suite and cells, gets only the cells it lacks (interrupted ones run again).

    No results folder is created before the suite's models passed the checks that need the libraries
    (``memprof.run.preflight``); a failure there is a UserError. ``executor`` is ``local`` (``jobs`` processes) or
    ``ray`` (tasks on the Ray cluster at ``address``, see ``memprof.run.ray_pool``).
    """
    manifest = {"suite": suite.name, "suite_digest": suite.digest, "cell_keys": [c.key for c in cells],
                "config_hashes": [c.config_hash for c in cells]}
    if resume is not None:
        prepare_resume(resume, manifest)  # before the zygote starts: the wrong folder fails at once
    pool = make_pool(executor, jobs, address, sample_interval_s)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        pool.interrupt()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        problems: list[dict[str, str]] = []
        with console.status(f"{suite.name}: starting workers and checking the models"):
            try:
                problems = pool.preflight(suite.preflight_pairs())
            except PreflightFailed as err:
                if not stopping:
                    raise UserError(str(suite.path), f"checking the models failed: {err}") from None
        if stopping:
            console.print("interrupted before any cell ran; nothing was written")
            return EXIT_INTERRUPTED
        if problems:
            raise suite.preflight_error(problems[0])
        run_dir = resume or new_run_dir(out_root, suite.name)
        pool.log_to(run_dir / "logs")
        writer = RunWriter(run_dir, suite.text, manifest, env_mod.capture())
        finished = {r.cell_index for r in writer.records}
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console,
                      transient=False) as progress:
            jobs_note = " (Ray)" if executor == "ray" else f" ({jobs} jobs)" if jobs > 1 else ""
            task = progress.add_task(suite.name + jobs_note, total=len(cells), completed=len(finished), last="")
            pending = [c for c in cells if c.index not in finished]
            for result in pool.run_all(pending, lambda: stopping):
                writer.append(result)
                r = result.record
                progress.update(task, advance=1, last=f"last: {r.optimizer} {r.status.value}")
    finally:
        pool.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    out.print(results_table(writer.records, title=f"{suite.name} — {run_dir}"))
    interrupted = stopping or any(r.status is Status.INTERRUPTED for r in writer.records)
    where = " --executor ray" + (f" --address {address}" if address else "") if executor == "ray" else \
        f" --jobs {jobs}" if jobs > 1 else ""
    console.print(f"results: {run_dir}" + (f" [yellow](interrupted; finish it with: memprof run --resume {run_dir}"
                                           f"{where})[/]" if interrupted else ""), highlight=False, soft_wrap=True)
    if interrupted:
        return EXIT_INTERRUPTED
    return compare(run_dir) if compare is not None else 0


def make_pool(executor: str, jobs: int, address: str | None, sample_interval_s: float) -> Pool:
    """``LocalPool`` (``jobs`` local processes) or, for ``executor == "ray"``, a ``RayPool`` on ``address``."""
    if executor == "ray":
        from memprof.run.ray_pool import RayPool

        return RayPool(address, sample_interval_s=sample_interval_s)
    return LocalPool(jobs, sample_interval_s=sample_interval_s)
