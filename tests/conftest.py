"""Shared test helpers: tiny suites written to a temp dir, and running the CLI in-process."""

from __future__ import annotations

import subprocess
import sys
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


def _start_quick(root: Path) -> subprocess.Popen:
    """``python -m memprof run quick`` into ``root / "results"``, its output in ``root / "run.log"``."""
    with open(root / "run.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "memprof", "run", "quick", "--out", str(root / "results")],
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session", autouse=True)
def quick_run_started(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      one_thread_per_worker: None) -> Iterator[tuple[subprocess.Popen, Path] | None]:
    """The quick suite's run for ``quick_run``, started with the session when a collected test uses it: it runs on
    one core beside the first files' tests, which train on the other (one thread each), so its 30 s are mostly gone
    by the time test_heap, test_jobs, test_ray and test_run ask for it. Killed at the end if it is still running."""
    if not any("quick_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("quick")
    proc = _start_quick(root)
    yield proc, root
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def quick_run(quick_run_started: tuple[subprocess.Popen, Path] | None) -> Path:
    """The shipped quick suite (the README's default run) run once, one cell at a time, by ``python -m memprof``:
    its results folder, which the serial runs of several tests would otherwise repeat."""
    assert quick_run_started is not None  # started for every collected test that uses this fixture
    proc, root = quick_run_started
    code = proc.wait(timeout=600)
    assert code == 0, (root / "run.log").read_text()[-2000:]
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
