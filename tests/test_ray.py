"""`memprof run --executor ray` on a real local Ray instance: the same cells and exact figures as a serial run,
a Ray worker killed mid-cell is a crashed cell (and takes the cell's process with it), Ctrl-C cancels the rest."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import run_cli, write_suite
from test_jobs import EXACT, QUICK_CELLS, by_key

from memprof.results.record import Record, Status
from memprof.results.store import read_records

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# adafactor (cell 1) trains until something stops it; the others take two steps.
SLOW_CELL = '[[override]]\nmatch = { optimizer = "adafactor" }\nset = { steps = 100000 }\n'
OPTIMIZERS = '["adamw_torch", "adafactor", "sgd"]'


@pytest.fixture(scope="module")
def local_ray() -> Iterator[str]:
    """A two-CPU Ray instance owned by this test process; yields its address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def records_of(root: Path) -> dict[str, Record]:
    (run_dir,) = root.iterdir()
    return {r.key: r for r in read_records(run_dir)}


def test_ray_runs_the_same_cells_with_identical_exact_metrics(tmp_path: Path, local_ray: str,
                                                             quick_run: Path) -> None:
    serial = by_key(quick_run)
    # Its own driver process connecting by address, as on a cluster.
    subprocess.run([sys.executable, "-m", "memprof", "run", "quick", "--out",
                    str(tmp_path / "ray"), "--executor", "ray", "--address", local_ray], check=True,
                   capture_output=True)
    on_ray = records_of(tmp_path / "ray")
    assert on_ray.keys() == serial.keys() and len(on_ray) == QUICK_CELLS
    for key, r in on_ray.items():
        assert r.status is Status.OK and r.concurrent_jobs == 2 and r.host == serial[key].host
        for name in EXACT:
            assert getattr(r, name) == getattr(serial[key], name), (key, name)
    (run_dir,) = (tmp_path / "ray").iterdir()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [f"cell-{i:04d}.log" for i in range(QUICK_CELLS)]


def when_training(index: int, act: Callable[[psutil.Process], None], seen: list[psutil.Process]) -> threading.Thread:
    """A thread that waits for the Ray worker running cell ``index`` to have its cell process (a child of its
    zygote), puts the worker and its descendants in ``seen``, and calls ``act(worker)``."""
    def watch() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                if " ".join(proc.info["cmdline"] or []).strip() == f"ray::memprof cell {index}":
                    family = proc.children(recursive=True)
                    if len(family) >= 2:  # the zygote and the process it forked for the cell
                        time.sleep(1.0)  # into the cell's training
                        seen.extend([proc, *family])
                        act(proc)
                        return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def all_gone(procs: list[psutil.Process], timeout_s: float = 15.0) -> bool:
    """Whether every process ended (a zombie left to a PID 1 that does not reap counts as ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs):
                return True
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.2)
    return False


def test_a_killed_ray_worker_is_a_crashed_cell_and_the_suite_goes_on(tmp_path: Path, local_ray: str) -> None:
    suite = write_suite(tmp_path, optimizers=OPTIMIZERS, steps=2, extra=SLOW_CELL)
    seen: list[psutil.Process] = []
    watcher = when_training(1, lambda worker: worker.send_signal(signal.SIGKILL), seen)
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--executor", "ray") == 3  # a crashed cell
    watcher.join(timeout=1)
    assert len(seen) >= 3, "never saw cell 1 training"
    records = {r.config.optimizer.label: r for r in records_of(tmp_path / "r").values()}
    assert records.keys() == {"adamw_torch", "adafactor", "sgd"}
    crashed = records.pop("adafactor")
    assert crashed.status is Status.CRASHED and "Ray worker" in crashed.error and "died" in crashed.error
    assert all(r.status is Status.OK for r in records.values())
    assert all_gone(seen), [p for p in seen if p.is_running()]


def test_ctrl_c_cancels_the_ray_tasks_and_keeps_what_finished(tmp_path: Path, local_ray: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path, optimizers=OPTIMIZERS, steps=2, extra=SLOW_CELL)
    seen: list[psutil.Process] = []
    stamp: list[float] = []

    def ctrl_c(worker: psutil.Process) -> None:
        stamp.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    watcher = when_training(1, ctrl_c, seen)
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--executor", "ray") == 130
    assert stamp and time.monotonic() - stamp[0] < 20, "the run did not stop soon after Ctrl-C"
    (run_dir,) = (tmp_path / "r").iterdir()
    assert f"memprof run --resume {run_dir} --executor ray" in " ".join(capsys.readouterr().err.split())
    watcher.join(timeout=1)
    records = records_of(tmp_path / "r")
    assert "adafactor" not in {r.config.optimizer.label for r in records.values()}
    assert all(r.status is Status.OK for r in records.values())
    assert all_gone(seen), [p for p in seen if p.is_running()]


def test_flags_that_do_not_go_with_the_executor_are_usage_errors(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--executor", "ray", "--jobs", "2") == 2
    assert run_cli("run", str(suite), "--out", str(tmp_path / "r"), "--address", "auto") == 2
    assert not (tmp_path / "r").exists()


def test_memprof_does_not_import_ray_and_says_how_to_install_it(tmp_path: Path) -> None:
    check = "import sys, memprof, memprof.cli, memprof.run.runner; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    for dry_run in ([], ["--dry-run"]):  # the dry run said nothing and listed the cells
        without_ray = ("import sys; sys.modules['ray'] = None; from memprof.cli import main; "
                       f"main(['run', 'quick', '--executor', 'ray', '--out', {str(tmp_path / 'r')!r}, *{dry_run}])")
        done = subprocess.run([sys.executable, "-c", without_ray], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()
        assert "--executor" in line and 'pip install "memprof[ray]"' in line
        assert not (tmp_path / "r").exists()
