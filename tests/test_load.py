"""Timings taken on a contended machine are measured (Linux PSI over the training window) and flagged in the run's
table and the report."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from memprof.analysis import report
from memprof.analysis.contention import CONTENDED
from memprof.measure.load import PRESSURE, CpuPressure, cpu_stall_us
from memprof.results.record import Status, StepLog
from memprof.run.launch import run_cell
from memprof.views.tables import results_table
from test_api import quick_lora_cell

needs_psi = pytest.mark.skipif(cpu_stall_us() is None, reason="this kernel has no /proc/pressure/cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_share_is_the_stall_total_grown_over_the_window(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\nfull avg10=0.00 total=0\n")
    with CpuPressure(psi) as pressure:
        time.sleep(0.2)
        psi.write_text("some avg10=9.00 avg60=0.00 avg300=0.00 total=1100000\nfull avg10=0.00 total=0\n")
    assert pressure.share == pytest.approx(0.1 / 0.2, rel=0.1)  # 0.1 s stalled in ~0.2 s
    with CpuPressure(tmp_path / "missing") as none:
        pass
    assert none.share is None


@needs_psi
def test_busy_loops_beyond_the_cores_show_as_pressure_and_the_table_flags_the_cell() -> None:
    # a few steps are enough to be timed under contention (the busy loops slow each step several times)
    cell = quick_lora_cell("adamw_torch").with_values({"training.steps": 4, "training.warmup_steps": 1,
                                                        "training.eval_batches": 0})
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        result = run_cell(cell)
        busy = result.record
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert busy.status is Status.OK and busy.cpu_pressure is not None and busy.cpu_pressure > 0.5
    console = Console(width=200, record=True)
    console.print(results_table([busy], 200))
    text = console.export_text()
    assert f"{busy.tokens_per_s:,.0f} *" in text and "*: timed while other work held the CPUs" in text
    quiet = replace(busy, cpu_pressure=CONTENDED / 2)
    console = Console(width=200, record=True)
    console.print(results_table([quiet], 200))
    assert " *" not in console.export_text()
    table = report.repeats_table(report.Run(Path("."), [busy], {}))
    assert table.rows[0][table.columns.index("tokens/s")].endswith(" *")
    assert any(note.startswith("*: timed while other work") for note in table.notes)
    steps = [StepLog(**{k: v for k, v in row.items() if k not in ("cell_key", "repeat")}) for row in result.steps]
    table = report.target_table(report.Run(Path("."), [busy], {busy.config.index: steps}))
    assert table.rows[0][table.columns.index("s to relative")].endswith(" *")
    # without its steps (a folder copied without cells/) and without a suite target: no time to mark, no table
    assert busy.config.training.target_loss is None and report.target_table(report.Run(Path("."), [busy], {})) is None


@needs_psi
def test_psi_reads_the_machine() -> None:
    first = cpu_stall_us()
    assert first is not None and PRESSURE.exists()
    assert cpu_stall_us() >= first  # a cumulative counter
