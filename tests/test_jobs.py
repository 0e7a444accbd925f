"""`memprof run --jobs N`: the same cells of the quick suite and the same exact figures as a serial run."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli, write_suite

from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.suite.load import load

QUICK_CELLS = len(load("quick").cells)

EXACT = ("optimizer_state_bytes", "trainable_weight_bytes", "frozen_weight_bytes", "gradient_bytes",
         "activation_bytes")


def run(tmp_path: Path, name: str, *extra: str) -> dict:
    """The shipped quick suite (the README's default run) into ``tmp_path/name``."""
    assert run_cli("run", "quick", "--out", str(tmp_path / name), *extra) == 0
    (run_dir,) = (tmp_path / name).iterdir()
    return {r.key: r for r in read_records(run_dir)}


def test_two_jobs_run_the_same_cells_with_identical_exact_metrics(tmp_path: Path) -> None:
    serial = run(tmp_path, "serial")
    parallel = run(tmp_path, "parallel", "--jobs", "2")
    assert serial.keys() == parallel.keys() and len(serial) == QUICK_CELLS
    for key, r in parallel.items():
        assert r.status is Status.OK and r.concurrent_jobs == 2 and serial[key].concurrent_jobs == 1
        for name in EXACT:
            assert getattr(r, name) == getattr(serial[key], name), (key, name)


def test_jobs_below_one_is_a_usage_error(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--jobs", "0") == 2
    assert not (tmp_path / "r").exists()
