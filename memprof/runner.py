"""Run a suite's cells through an executor, writing each result as it arrives, with a progress bar."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memprof import env as env_mod
from memprof.cell import Cell
from memprof.executor import LocalExecutor
from memprof.record import Status
from memprof.results import RunWriter, new_run_dir
from memprof.suite import Suite
from memprof.views import results_table

EXIT_INTERRUPTED = 130


def run_suite(suite: Suite, cells: list[Cell], out_root: Path, sample_interval_s: float, console: Console,
              out: Console, compare: Callable[[Path], int] | None = None) -> int:
    """Run every cell; return the process exit code (0, or 130 when interrupted).

    Faults inside cells are results and do not change the exit code. Ctrl-C or SIGTERM interrupts the running
    cell (recorded as ``interrupted``), keeps every finished cell, and stops. ``compare``, called with the run
    folder after a run that was not interrupted, gives the exit code instead (``--compare-to``).
    """
    run_dir = new_run_dir(out_root, suite.name)
    executor = LocalExecutor(run_dir / "logs", sample_interval_s)
    writer = RunWriter(run_dir, suite.text,
                       {"suite": suite.name, "suite_digest": suite.digest, "cell_keys": [c.key for c in cells]},
                       env_mod.capture())
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        executor.interrupt()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[last]}"), console=console,
                      transient=False) as progress:
            task = progress.add_task(f"{suite.name}: starting workers", total=len(cells), last="")
            executor.wait_ready()
            for cell in cells:
                if stopping:
                    break
                progress.update(task, description=f"{suite.name}: {cell.key}")
                result = executor.run(cell)
                writer.append(result)
                r = result.record
                progress.update(task, advance=1, last=f"last: {r.optimizer} {r.status.value}")
    finally:
        executor.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    out.print(results_table(writer.records, title=f"{suite.name} — {run_dir}"))
    interrupted = stopping or any(r.status is Status.INTERRUPTED for r in writer.records)
    console.print(f"results: {run_dir}" + (" [yellow](interrupted)[/]" if interrupted else ""))
    if interrupted:
        return EXIT_INTERRUPTED
    return compare(run_dir) if compare is not None else 0
