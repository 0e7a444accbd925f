"""Shared test helpers: tiny suites written to a temp dir, and running the CLI in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TINY_SUITE = """
[suite]
name = "{name}"
device = "cpu"
steps = {steps}
warmup_steps = 1
timeout_s = 120

[grid]
model = ["tiny-llama"]
adapter = {adapters}
optimizer = {optimizers}
batch_size = {batch_sizes}
seq_len = [32]
"""


def short_suite(name: str) -> str:
    """The [suite] table of a two-step CPU suite with one held-out batch, for tests that write their own grid."""
    return f"""
[suite]
name = "{name}"
device = "cpu"
steps = 2
warmup_steps = 1
timeout_s = 300
eval_batches = 1
"""


def write_suite(directory: Path, name: str = "tiny", steps: int = 3, adapters: str = '["lora"]',
                optimizers: str = '["adamw_torch"]', batch_sizes: str = "[2]", extra: str = "") -> Path:
    """A small valid suite file; ``extra`` TOML is appended verbatim."""
    path = directory / f"{name}.toml"
    path.write_text(TINY_SUITE.format(name=name, steps=steps, adapters=adapters, optimizers=optimizers,
                                      batch_sizes=batch_sizes) + extra)
    return path


def pytest_configure(config: pytest.Config) -> None:
    """Tables are read at the width a piped run prints (120 columns) whatever runs the tests: at the 80 columns of a
    narrow terminal, or of pytest-xdist's workers, rich wraps a cell over several lines."""
    os.environ["COLUMNS"] = "120"


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker() -> Iterator[None]:
    """One OpenMP/MKL thread in every process the tests start (zygotes and their cells, ``python -m memprof``): on a
    busy 2-core box a cell's second thread spends its time spin-waiting, and the quick suite's serial run took 386 s
    with two threads where it takes 31 s with one. What the tests assert (bytes, statuses, losses) does not depend on
    the thread count; ``--jobs`` sets its own (``executor.threads_env``)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        yield


def _session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every test process of the session sees: with pytest-xdist the workers' common parent."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _start_quick(root: Path) -> subprocess.Popen:
    """``python -m memprof run quick`` into ``root / "results"``, its output in ``root / "run.log"``; its exit code
    goes to ``root / "exit"`` when it ends, for whichever test process waits on it."""
    script = '"$0" -m memprof run quick --out "$1/results" > "$1/run.log" 2>&1; echo $? > "$1/exit.tmp"; ' \
             'mv "$1/exit.tmp" "$1/exit"'
    return subprocess.Popen(["sh", "-c", script, sys.executable, str(root)])


@pytest.fixture(scope="session", autouse=True)
def quick_run_started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      one_thread_per_worker: None) -> Iterator[Path | None]:
    """The folder of the quick suite's run for ``quick_run``, started with the session, by the first test process to
    get here, when a collected test uses it: one run for all of pytest-xdist's workers, beside the first files' tests
    (one thread each), so its 30 s are mostly gone by the time test_heap, test_jobs, test_ray and test_run ask for
    it. The process that started it waits for its end before leaving: another may still need it."""
    if not any("quick_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    root = _session_tmp(tmp_path_factory) / "quick"
    try:
        root.mkdir()
    except FileExistsError:  # another worker started it
        yield root
        return
    proc = _start_quick(root)
    yield root
    proc.wait(timeout=600)


@pytest.fixture(scope="session")
def quick_run(quick_run_started: Path | None) -> Path:
    """The shipped quick suite (the README's default run) run once, one cell at a time, by ``python -m memprof``:
    its results folder, which the serial runs of several tests would otherwise repeat."""
    assert quick_run_started is not None  # started for every collected test that uses this fixture
    root, deadline = quick_run_started, time.monotonic() + 600
    while not (root / "exit").exists():  # polled: the run may belong to another test process
        assert time.monotonic() < deadline, "the quick suite's run did not end within 600 s"
        time.sleep(0.5)
    assert (root / "exit").read_text().strip() == "0", (root / "run.log").read_text()[-2000:]
    (run_dir,) = (root / "results").iterdir()
    return run_dir


def run_cli(*argv: str) -> int:
    """Run ``memprof`` in-process and return its exit code."""
    from memprof.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for in-process training of tiny models: on a busy 2-core box a second OpenMP thread
    spends its time spin-waiting and makes these steps up to ten times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
