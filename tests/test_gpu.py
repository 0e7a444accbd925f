"""CUDA paths: allocator peaks, NVML, paged optimizer state, attribution, a real CUDA OOM, and `memprof run` end to
end (a zygote that must not touch CUDA, a forked child that does). Run by benchmarks/gpu-acceptance."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli, short_suite

from memprof import suite
from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.run.launch import run_cell
from memprof.train.meta import meta_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PAGING_THRESHOLD = 100_000  # bitsandbytes pages a state buffer only for tensors of at least this many elements
# small-llama: r16's LoRA matrices are all below the threshold (nothing pages); at r256 every A matrix (256 x 512,
# 256 x 1376) and the B matrices of q, o, gate, up and down (512 x 256, 1376 x 256) reach it, k's and v's (256 x 256)
# do not
SUITE = short_suite("gpu").replace('device = "cpu"', 'device = "cuda"') + """
[grid]
model = ["small-llama"]
adapter = ["r16", "r256"]
optimizer = ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
batch_size = [4]
seq_len = [256]

[adapters.r16]
kind = "lora"
r = 16
target_modules = "all-linear"

[adapters.r256]
kind = "lora"
r = 256
target_modules = "all-linear"
"""


def test_a_cuda_oom_is_the_cells_result_and_the_next_cell_runs_clean(tmp_path: Path) -> None:
    """First in the file, so that a run stopped by its time limit has checked it (fixtures are made lazily)."""
    free, _ = torch.cuda.mem_get_info()
    # tiny-llama's fp32 logits over its 256-token vocabulary: four copies of them alone exceed the free memory
    batch_size = free // (1024 * 256 * 4 * 4) + 1
    path = tmp_path / "oom.toml"
    path.write_text(short_suite("oom").replace('device = "cpu"', 'device = "cuda"') + f"""
[grid]
model = ["tiny-llama"]
optimizer = ["adamw_torch"]
batch_size = [{batch_size}, 2]
seq_len = [1024]
""")
    assert run_cli("run", str(path), "--out", str(tmp_path / "out")) == 0  # an OOM is an answer, not a failure
    (run_dir,) = (tmp_path / "out").iterdir()
    oom, ok = read_records(run_dir)
    assert oom.status is Status.OOM, oom.error
    assert oom.num_ooms >= 1 and oom.peak_allocated_bytes > 0  # the peak it reached survives the OOM
    assert ok.status is Status.OK and ok.peak_allocated_bytes < free


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    path = tmp_path_factory.mktemp("gpu") / "gpu.toml"
    path.write_text(SUITE)
    return suite.load(str(path)).cells, path


@pytest.fixture(scope="module")
def in_process(cells: tuple[list, Path]) -> dict:
    return {(c.adapter.name, c.optimizer.label): run_cell(c).record for c in cells[0]}


def test_the_zygote_preloads_bitsandbytes_and_peft_without_initialising_cuda() -> None:
    """So that a cell on a CUDA host skips their imports, as one on the CPU does, and can still be forked."""
    import subprocess
    import sys

    probe = ("import sys, torch; from memprof.run.zygote import preload; assert preload(); "
             "print(torch.cuda.is_initialized(), 'bitsandbytes' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr[-2000:]


def test_cuda_cells_report_allocator_and_nvml_peaks(in_process: dict) -> None:
    for r in in_process.values():
        assert r.status is Status.OK, r.error
        assert r.device.startswith("cuda") and r.peak_allocated_bytes > 0
        assert r.peak_reserved_bytes >= r.peak_allocated_bytes
        assert r.nvml_peak_device_used_bytes is None or r.nvml_peak_device_used_bytes >= r.peak_reserved_bytes
        assert set(r.phase_peak_allocated_bytes) >= {"forward", "backward", "optimizer"} and r.peak_phase


def test_the_breakdown_adds_up_to_the_allocator_peak_and_names_it(in_process: dict) -> None:
    for r in in_process.values():
        assert sum(r.breakdown.values()) == r.peak_allocated_bytes
        assert abs(r.breakdown["other"]) <= 0.02 * r.peak_allocated_bytes, f"{r.key} {r.peak_moment} {r.breakdown}"
        assert r.allocator_cache_bytes == r.peak_reserved_bytes - r.peak_allocated_bytes >= 0


def test_paged_state_is_what_reaches_the_threshold_and_lies_outside_the_allocator(cells: tuple[list, Path],
                                                                                  in_process: dict) -> None:
    for adapter in ("r16", "r256"):
        cell = next(c for c in cells[0] if c.adapter.name == adapter)
        big = sum(p.numel() for p in meta_model(cell.model, cell.adapter, cell.shape.precision).parameters()
                  if p.requires_grad and p.numel() >= PAGING_THRESHOLD)
        for optimizer, per_element in (("paged_adamw_8bit", 2), ("paged_adamw_32bit", 8)):
            paged = in_process[(adapter, optimizer)]
            # two state buffers per large tensor (uint8 or fp32) are paged; absmax and small tensors are not
            assert paged.optimizer_state_paged_bytes == per_element * big, (adapter, optimizer)
        plain = in_process[(adapter, "adamw_bnb_8bit")]
        assert in_process[(adapter, "paged_adamw_8bit")].optimizer_state_bytes == plain.optimizer_state_bytes
        assert plain.optimizer_state_paged_bytes == 0
    assert in_process[("r16", "paged_adamw_8bit")].optimizer_state_paged_bytes == 0  # nothing reaches it
    r256 = in_process[("r256", "paged_adamw_8bit")]
    assert r256.peak_allocated_bytes < in_process[("r256", "adamw_bnb_8bit")].peak_allocated_bytes


def test_memprof_run_on_a_cuda_host_measures_what_the_in_process_run_measures(
        cells: tuple[list, Path], in_process: dict, tmp_path: Path) -> None:
    """The zygote imports without initialising CUDA and forks each cell, which then does: the same exact bytes."""
    assert run_cli("run", str(cells[1]), "--out", str(tmp_path / "out")) == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    for r in read_records(run_dir):
        before = in_process[(r.config.adapter.name, r.config.optimizer.label)]
        assert r.status is Status.OK and r.peak_allocated_bytes and r.nvml_peak_process_used_bytes is not None
        for name in ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes", "optimizer_state_bytes",
                     "optimizer_state_paged_bytes", "activation_bytes"):
            assert getattr(r, name) == getattr(before, name), (r.key, name)
        # the sampler read the allocator at every sample and NVML when the allocator's reserved bytes moved, both ends
        # included
        timeline = pd.read_csv(run_dir / "cells" / f"{r.config.index:04d}" / "timeline.csv")
        assert timeline["allocated_bytes"].max() > 0 and timeline["allocated_bytes"].notna().all()
        assert 2 <= timeline["nvml_device_used_bytes"].notna().sum() < len(timeline)
