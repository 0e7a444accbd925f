"""The plan against what an H200 measured (the shipped records are the fixture): the allocator peak within 3% median
and 8% max on every ok cell, the whole card within 10% of NVML's peak, and inside the plan's stated uncertainty;
benchmarks/plan_accuracy.py writes the same figures to results/benchmarks/plan_accuracy.*."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import plan_accuracy  # noqa: E402

from memprof.measure.attribution import attribute_run  # noqa: E402
from memprof.plan import calibration  # noqa: E402
from memprof.plan import predict as plan  # noqa: E402
from memprof.plan.calibrate import fit_device  # noqa: E402
from memprof.results.record import Record  # noqa: E402
from memprof.results.store import read_records  # noqa: E402
from memprof.suite.restore import with_suite_configs  # noqa: E402


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    shipped = calibration.load()
    return [row for run in plan_accuracy.GPU_RUNS for row in plan_accuracy._errors(attribute_run(run), shipped,
                                                                                     "cuda")]


def test_the_plan_of_every_h200_cell_is_within_the_targets(rows: list[dict]) -> None:
    allocated = [abs(row["allocated_error"]) for row in rows]
    total = [abs(row["total_error"]) for row in rows]
    assert len(rows) == 21
    assert statistics.median(allocated) <= 0.03 and max(allocated) <= 0.08
    assert max(total) <= 0.10
    assert all(row["within_uncertainty"] for row in rows)


def test_the_step_on_the_meta_device_plans_every_h200_cell_as_the_analytic_model_does(rows: list[dict]) -> None:
    """The plan an architecture outside the analytic model gets (its step run on the meta device), made for the
    H200's Llama cells: their allocator peaks within 0.1%, and the whole card within the analytic plan's target."""
    assert max(abs(row["meta_error"]) for row in rows) <= 0.001
    assert max(abs(row["meta_total_error"]) for row in rows) <= 0.10


def test_the_fitted_fallbacks_stated_uncertainty_on_cuda_covers_its_miss_on_the_h200_cells(rows: list[dict]) -> None:
    """Where the meta device cannot run a model, the temporaries fitted to CPU runs miss a GPU's allocator peak
    (mostly over); the plan states how far (a share of their bytes)."""
    assert max(abs(row["fitted_temporaries_miss"]) for row in rows) <= plan_accuracy.plan.FITTED_TEMPORARIES_CUDA_ERROR


def test_on_the_h100s_cells_too_the_meta_plan_holds_and_the_fitted_one_states_its_miss() -> None:
    """The H100's reference cells and its 70B QLoRA cell (results/gpu/h100-2026-11-28), which no calibration was
    fitted to: the plan from the step on the meta device within 0.5% of every allocator peak."""
    h100 = plan_accuracy.ROOT / "results" / "gpu" / "h100-2026-11-28"
    rows = [row for run in ("reference", "qlora-70b")
            for row in plan_accuracy._errors(attribute_run(h100 / run), calibration.load(), "cuda")]
    assert len(rows) == 17 and max(abs(row["meta_error"]) for row in rows) <= 0.005
    assert max(abs(row["fitted_temporaries_miss"]) for row in rows) <= plan_accuracy.plan.FITTED_TEMPORARIES_CUDA_ERROR


def test_other_architectures_cpu_peaks_lie_within_the_plans_stated_uncertainty() -> None:
    """results/architectures-cpu (small Phi-3, Gemma3, Qwen3-MoE and OLMo2 layers, LoRA and full, checkpointing off
    and on, measured on this CPU): every cell planned from its step on the meta device, its RSS growth inside the
    plan's stated uncertainty."""
    run = plan_accuracy.CPU_ARCHITECTURES
    records = with_suite_configs(read_records(run), run)
    rows = plan_accuracy._errors(records, calibration.load(), "cpu")
    assert len(rows) == 16 and {r.config.model.name.split("-")[0] for r in records} == {"phi3", "gemma3", "qwen3moe",
                                                                                        "olmo2"}
    assert all(plan.plan_requests([r.config], calibration.load(), "cpu")[0].method == "meta" for r in records)
    assert all(row["within_uncertainty"] for row in rows), [row for row in rows if not row["within_uncertainty"]]


def test_other_architectures_peaks_are_split_at_the_moment_and_into_the_parts_their_plan_has() -> None:
    """The same run attributed: each peak at the moment its step on the meta device peaks, the plan's own bytes
    there (one definition, meta_step.moments), and no part of the remainder negative (Gemma3's full fine-tune had
    -21.9 MiB when every saved activation and every gradient were counted at one moment)."""
    run = plan_accuracy.CPU_ARCHITECTURES
    plans = {r.key: plan.plan_requests([r.config], calibration.load(), "cpu")[0]
             for r in with_suite_configs(read_records(run), run)}
    for r in attribute_run(run):
        planned = plans[r.key]
        assert r.peak_moment == planned.moment and r.peak_moment.endswith("(meta device)"), r.key
        for part in ("activations", "loss_logits", "layer", "gradients"):
            assert r.breakdown.get(part, 0) == sum(p.bytes for p in planned.parts if p.name == part), (r.key, part)
        assert r.breakdown["other"] >= 0, r.key


def test_the_shipped_cuda_calibration_is_what_the_h200_runs_give() -> None:
    shipped = calibration.load().devices["cuda"]
    assert fit_device(list(plan_accuracy.GPU_RUNS)) == shipped


def test_the_shipped_cpu_calibration_is_what_the_committed_cpu_run_gives() -> None:
    shipped = calibration.load().devices["cpu"]
    assert fit_device([plan_accuracy.CPU_RUN]) == shipped
    assert shipped.cells == 112 and shipped.other[0] > 0


@pytest.mark.parametrize("fit_on,predict_on", [("reference", "levers-gpu"), ("levers-gpu", "reference")])
def test_leave_one_suite_out_still_plans_the_allocator_peak(fit_on: str, predict_on: str) -> None:
    fitted = calibration.load().with_device(fit_device([plan_accuracy.H200 / fit_on]))
    rows = plan_accuracy._errors(attribute_run(plan_accuracy.H200 / predict_on), fitted, "cuda")
    assert max(abs(row["allocated_error"]) for row in rows) <= 0.03
    assert max(abs(row["total_error"]) for row in rows) <= 0.15  # the cache model extrapolates least well


@pytest.fixture(scope="module")
def cpu_cells() -> list[tuple[Record, plan.Plan]]:
    """The committed CPU calibration run's cells, each with its plan (--device cpu)."""
    records = with_suite_configs(read_records(plan_accuracy.CPU_RUN), plan_accuracy.CPU_RUN)
    return list(zip(records, plan.plan_requests([r.config for r in records], calibration.load(), "cpu")))


def test_the_cpu_plan_is_no_worse_than_the_fitted_fallback_it_replaced(cpu_cells: list[tuple[Record, plan.Plan]]) \
        -> None:
    """On the committed CPU calibration run the old per-group fallback planned RSS growth with a median error of
    6.59% and a max of 37.7% (in-sample, as this is); the analytic plan with its fitted remainder must not be worse."""
    errors = [abs(p.allocated_bytes / r.peak_rss_delta_bytes - 1) for r, p in cpu_cells]
    assert len(errors) == 112
    assert statistics.median(errors) <= 0.0659 and max(errors) <= 0.377


def test_every_cpu_cell_the_remainder_was_fitted_to_lies_within_the_plans_stated_uncertainty(
        cpu_cells: list[tuple[Record, plan.Plan]]) -> None:
    """The remainder's error is the calibration's largest miss as a fraction of a cell's measured peak; stated as a
    fraction of the named parts alone it left 29 of these 112 cells outside the plan's uncertainty."""
    outside = [r.key for r, p in cpu_cells if abs(p.total_bytes - r.peak_rss_delta_bytes) > p.uncertainty_bytes]
    assert not outside
