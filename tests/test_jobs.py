"""`memprof run --jobs N`: the same cells of the quick suite and the same exact figures as a serial run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli, write_suite

from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.run.executor import gpu_names
from memprof.suite.load import load

QUICK_CELLS = len(load("quick").cells)

EXACT = ("optimizer_state_bytes", "trainable_weight_bytes", "frozen_weight_bytes", "gradient_bytes",
         "activation_bytes")


def by_key(run_dir: Path) -> dict:
    return {r.key: r for r in read_records(run_dir)}


def test_two_jobs_run_the_same_cells_with_identical_exact_metrics(tmp_path: Path, quick_run: Path) -> None:
    serial = by_key(quick_run)
    assert run_cli("run", "quick", "--out", str(tmp_path / "parallel"), "--jobs", "2") == 0
    (run_dir,) = (tmp_path / "parallel").iterdir()
    parallel = by_key(run_dir)
    assert serial.keys() == parallel.keys() and len(serial) == QUICK_CELLS
    for key, r in parallel.items():
        assert r.status is Status.OK and r.concurrent_jobs == 2 and serial[key].concurrent_jobs == 1
        for name in EXACT:
            assert getattr(r, name) == getattr(serial[key], name), (key, name)


@pytest.mark.parametrize("jobs", [0, (os.cpu_count() or 1) + 1])
def test_jobs_below_one_or_beyond_the_cores_are_a_usage_error(tmp_path: Path, jobs: int,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path)
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--device", "cpu", "--jobs", str(jobs)) == 2
    assert capsys.readouterr().err.startswith("error: --jobs: ")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("inherited", "count", "names"), [
    (None, 0, []), (None, 2, ["0", "1"]), ("2,3", 4, ["2", "3"]), ("GPU-a1, GPU-b2", 2, ["GPU-a1", "GPU-b2"]),
    ("", 4, []), ("1,-1,0", 4, ["1"]), ("3", 0, []),
])
def test_jobs_are_pinned_to_the_gpus_this_process_may_use(inherited: str | None, count: int,
                                                          names: list[str]) -> None:
    # an inherited CUDA_VISIBLE_DEVICES is kept (job i gets its i-th entry), read as CUDA reads it; a host where
    # NVML sees no card pins nothing whatever the variable says
    assert gpu_names(inherited, count) == names
