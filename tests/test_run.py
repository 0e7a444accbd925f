"""`memprof run` end to end: the shipped quick suite in isolated workers, with exact byte counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from memprof import suite
from memprof.train.models import build_model
from memprof.results.record import Status
from memprof.results.store import read_records

BNB_BLOCK = 256
BNB_MIN_8BIT = 4096


@pytest.fixture(scope="module")
def lora_shapes() -> list[torch.Size]:
    cell = next(c for c in suite.load("quick").cells if c.adapter.kind == "lora")
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    return [p.shape for p in model.parameters() if p.requires_grad]


def by_optimizer(run_dir: Path, adapter: str) -> dict:
    return {r.config.optimizer.label: r for r in read_records(run_dir) if r.config.adapter.name == adapter}


def test_every_cell_of_the_quick_suite_ran_and_learned(quick_run: Path) -> None:
    records = read_records(quick_run)
    assert len(records) == 12
    for r in records:
        assert r.status is Status.OK, (r.key, r.error)
        assert r.final_loss_smoothed < r.first_loss - 0.5, r.key
        assert r.tokens_per_s > 0 and r.step_time_median_s > 0 and r.step_time_p95_s >= r.step_time_median_s
        assert r.peak_rss_delta_bytes > 0 and r.device == "cpu" and r.peak_allocated_bytes is None


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_adamw_state_is_8_bytes_per_trainable_element_plus_a_step_scalar(
        quick_run: Path, lora_shapes: list[torch.Size], adapter: str) -> None:
    r = by_optimizer(quick_run, adapter)["adamw_torch"]
    elements = sum(s.numel() for s in lora_shapes)
    assert r.trainable_params == elements
    assert r.optimizer_state_bytes == 8 * elements + 4 * len(lora_shapes)
    assert r.gradient_bytes == 4 * elements
    assert r.trainable_weight_bytes == 4 * elements


@pytest.mark.parametrize("optimizer", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_bnb_8bit_state_follows_the_blockwise_layout(quick_run: Path, lora_shapes: list[torch.Size],
                                                     optimizer: str) -> None:
    r = by_optimizer(quick_run, "lora")[optimizer]
    big = [s.numel() for s in lora_shapes if s.numel() >= BNB_MIN_8BIT]
    small = [s.numel() for s in lora_shapes if s.numel() < BNB_MIN_8BIT]
    assert big, "the quick suite must exercise 8-bit state"
    uint8 = 2 * sum(big)
    absmax = 2 * 4 * sum(math.ceil(n / BNB_BLOCK) for n in big)
    qmaps = 2 * 256 * 4  # one signed and one unsigned dynamic map, shared by every parameter
    assert r.optimizer_state_bytes_by_dtype["uint8"] == uint8
    assert r.optimizer_state_bytes_by_dtype["float32"] == absmax + qmaps + 2 * 4 * sum(small)
    assert r.optimizer_state_bytes == uint8 + absmax + qmaps + 2 * 4 * sum(small)
    assert r.optimizer_state_paged_bytes == 0  # paged buffers need CUDA managed memory; the CPU has none


def test_qlora_freezes_4bit_weights_with_their_quant_state(quick_run: Path) -> None:
    lora, qlora = by_optimizer(quick_run, "lora")["adamw_torch"], by_optimizer(quick_run, "qlora")["adamw_torch"]
    assert qlora.total_params == lora.total_params
    assert qlora.frozen_weight_bytes < lora.frozen_weight_bytes / 2


def test_results_folder_has_records_csv_steps_and_env(quick_run: Path) -> None:
    cells = pd.read_csv(quick_run / "cells.csv")
    assert len(cells) == 12
    for column in ("optimizer_state_bytes", "peak_rss_bytes", "step_time_median_s", "tokens_per_s",
                   "optimizer_state_bytes.uint8"):
        assert column in cells.columns
    assert cells["optimizer_state_bytes"].dtype.kind == "i"
    dtypes = [i for i, c in enumerate(cells.columns) if c.startswith("optimizer_state_bytes.")]
    assert dtypes == list(range(dtypes[0], dtypes[0] + len(dtypes)))  # together, though the first cell has no uint8
    steps = pd.read_csv(quick_run / "cells" / "0000" / "steps.csv")
    assert list(steps["step"]) == list(range(12)) and steps["loss"].notna().all()
    timeline = pd.read_csv(quick_run / "cells" / "0000" / "timeline.csv")
    assert {"t_s", "step", "phase", "rss_bytes"} <= set(timeline.columns)
    # samples every 10 ms carry the loop's phase; a tiny cell's optimizer step (a few ms) may fall between two
    # samples in all 12 steps of a loaded machine (a fresh clone's run once saw none), its forward and backward not
    phases = set(timeline["phase"].dropna())
    assert {"forward", "backward"} <= phases <= {"setup", "forward", "backward", "optimizer", "zero_grad", "eval"}
    env = json.loads((quick_run / "env.json").read_text())
    assert env["versions"]["torch"].startswith("2.") and env["versions"]["bitsandbytes"]
    assert "git_revision" in env and "cpu" in env


def test_the_run_table_says_what_its_peak_is(quick_run: Path) -> None:
    """On the CPU the peak is RSS growth over the worker's baseline, on CUDA the allocator's: a footnote says which,
    in the report's words (one definition)."""
    from rich.console import Console

    from memprof.views.tables import peak_note, results_table

    gpu_run = Path(__file__).parent.parent / "results" / "gpu" / "h100-2026-11-28" / "qlora-70b"
    for run_dir, cuda in ((quick_run, False), (gpu_run, True)):
        console = Console(width=200, record=True)
        console.print(results_table(read_records(run_dir), 200))
        shown = console.export_text()
        assert peak_note(cuda) in shown and peak_note(not cuda) not in shown
    assert "RSS" in peak_note(False) and "baseline" in peak_note(False) and "allocator" in peak_note(True)
