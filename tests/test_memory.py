"""Memory truth on the CPU: exact parts, activations linear in batch size, an attribution that adds up."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_suite

from memprof import suite
from memprof.measure import step_memory
from memprof.measure.attribution import PARTS
from memprof.results.record import Status
from memprof.run.launch import run_cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def records_by_batch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = write_suite(tmp_path_factory.mktemp("suite"), steps=2, batch_sizes="[1, 2, 4]")
    return {c.shape.batch_size: run_cell(c).record for c in suite.load(str(path)).cells}


def test_saved_activations_grow_linearly_with_batch_size(records_by_batch: dict) -> None:
    a = {b: r.activation_bytes for b, r in records_by_batch.items()}
    assert all(r.status is Status.OK for r in records_by_batch.values())
    assert a[1] > 0
    per_sample_small, per_sample_large = a[2] - a[1], (a[4] - a[2]) / 2
    assert per_sample_large == pytest.approx(per_sample_small, rel=0.01)


def test_exact_parts_do_not_depend_on_batch_size(records_by_batch: dict) -> None:
    for name in ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes", "optimizer_state_bytes"):
        assert len({getattr(r, name) for r in records_by_batch.values()}) == 1, name


def test_attribution_adds_up_to_the_peak_with_the_remainder_explicit(records_by_batch: dict) -> None:
    for r in records_by_batch.values():
        assert set(r.breakdown) <= set(PARTS) and "other" in r.breakdown
        assert sum(r.breakdown.values()) == r.peak_rss_delta_bytes
        named = {"frozen_weights": r.frozen_weight_bytes, "trainable_weights": r.trainable_weight_bytes,
                 "optimizer_state": r.optimizer_state_bytes}
        assert {name: r.breakdown[name] for name in named} == named
        # what autograd saved is all alive up to the loss; in backward, the layers done have freed theirs
        if step_memory.phase(r.peak_moment) == "forward":
            assert r.breakdown["activations"] == r.activation_bytes
        else:
            assert 0 < r.breakdown["activations"] <= r.activation_bytes
        assert r.allocator_cache_bytes is None and r.non_pytorch_bytes is None  # CUDA-only parts


def test_full_fine_tune_trains_every_parameter(tmp_path: Path) -> None:
    cell = suite.load(str(write_suite(tmp_path, steps=2, adapters='["none"]'))).cells[0]
    r = run_cell(cell).record
    assert r.status is Status.OK
    assert r.frozen_weight_bytes == 0 and r.trainable_params == r.total_params
    assert r.gradient_bytes == r.trainable_weight_bytes == 4 * r.trainable_params
    assert r.optimizer_state_bytes == 8 * r.trainable_params + 4 * _param_tensors(cell)


def _param_tensors(cell) -> int:
    import torch

    from memprof.train.models import build_model

    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    return sum(1 for p in model.parameters() if p.requires_grad)
