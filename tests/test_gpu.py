"""CUDA paths: allocator peaks, NVML, paged optimizer state, attribution. Run by benchmarks/gpu-acceptance."""

from __future__ import annotations


import pytest
import torch
from conftest import write_suite

from memprof import suite
from memprof.measure.attribution import KNOWN_PARTS
from memprof.results.record import Status
from memprof.run.launch import run_cell

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_records(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = write_suite(tmp_path_factory.mktemp("gpu"), steps=4, adapters='["lora"]',
                       optimizers='["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"]', batch_sizes="[4]",
                       extra="[models.wide]\npreset = \"small-llama\"\n")
    text = path.read_text().replace('device = "cpu"', 'device = "cuda"').replace('["tiny-llama"]', '["wide"]')
    path.write_text(text.replace("seq_len = [32]", "seq_len = [256]"))
    return {c.optimizer.label: run_cell(c).record for c in suite.load(str(path)).cells}


def test_cuda_cells_report_allocator_and_nvml_peaks(cuda_records: dict) -> None:
    for r in cuda_records.values():
        assert r.status is Status.OK, r.error
        assert r.device.startswith("cuda") and r.peak_allocated_bytes > 0
        assert r.peak_reserved_bytes >= r.peak_allocated_bytes
        assert r.nvml_peak_device_used_bytes is None or r.nvml_peak_device_used_bytes >= r.peak_reserved_bytes


def test_breakdown_adds_up_to_the_allocator_peak(cuda_records: dict) -> None:
    r = cuda_records["adamw_torch"]
    known = sum(getattr(r, name) for name in KNOWN_PARTS)
    assert known + r.attributed_other_bytes == r.peak_allocated_bytes
    assert r.allocator_cache_bytes == r.peak_reserved_bytes - r.peak_allocated_bytes >= 0


def test_paged_state_is_counted_and_outside_the_allocator(cuda_records: dict) -> None:
    paged, plain = cuda_records["paged_adamw_8bit"], cuda_records["adamw_bnb_8bit"]
    assert paged.optimizer_state_bytes == plain.optimizer_state_bytes
    assert paged.optimizer_state_paged_bytes > 0 and plain.optimizer_state_paged_bytes == 0
    assert paged.peak_allocated_bytes < plain.peak_allocated_bytes
