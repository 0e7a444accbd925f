"""benchmarks/gpu-acceptance's parts that decide whether a GPU run brings anything back: the rehearsal's small copies
of the GPU suites load as CPU suites, and $OUT holds a few plain files within the device tool's limits."""

from __future__ import annotations

import importlib.util
import sys
import tarfile
import time
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from memprof import suite

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu-acceptance"


@pytest.fixture(scope="module")
def acceptance():  # noqa: ANN201 - the script, loaded as a module
    loader = SourceFileLoader("gpu_acceptance", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_acceptance", loader))
    sys.modules["gpu_acceptance"] = module  # dataclasses look their module up
    loader.exec_module(module)
    yield module
    del sys.modules["gpu_acceptance"]


def context(acceptance, tmp_path: Path, rehearse: bool = True):  # noqa: ANN001, ANN201
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    return acceptance.Context(rehearse, tmp_path / "work", tmp_path / "out", time.monotonic() + 60, {})


@pytest.mark.parametrize("name", ["reference", "levers-gpu", "qlora-70b", "architectures"])
def test_a_rehearsal_runs_a_small_cpu_copy_of_each_gpu_suite(acceptance, tmp_path: Path, name: str) -> None:
    shipped = suite.load(name)
    small = suite.load(str(acceptance.suite_path(context(acceptance, tmp_path), name)))
    assert shipped.name == small.name and {c.budget.device for c in shipped.cells} == {"cuda"}
    assert {(c.model.name, c.budget.device, c.shape.batch_size, c.shape.seq_len, c.training.steps) for c in small.cells} \
        == {("tiny-llama", "cpu", 2, 32, 3)}
    assert 1 <= len(small.cells) <= min(len(shipped.cells), 8)
    # the adapters keep their settings: rank, quantisation
    assert all(c.adapter in [s.adapter for s in shipped.cells] for c in small.cells)


def test_out_is_a_tarball_of_the_stages_with_logs_cut_and_passes_the_limits(acceptance, tmp_path: Path) -> None:
    ctx = context(acceptance, tmp_path)
    run = ctx.work / "1-reference" / "runs" / "reference-1" / "cells" / "0000"
    run.mkdir(parents=True)
    (run / "steps.csv").write_text("step,loss\n0,5.5\n")
    log = ctx.work / "1-reference" / "reference.log"
    log.write_bytes(b"x" * (acceptance.LOG_TAIL_BYTES + 1000) + b"the end\n")
    acceptance.pack(ctx)
    with tarfile.open(ctx.out / "results.tar.gz") as tar:
        assert tar.extractfile("1-reference/runs/reference-1/cells/0000/steps.csv").read() == b"step,loss\n0,5.5\n"
        kept = tar.extractfile("1-reference/reference.log").read()
    assert kept.startswith(b"[... 1008 bytes cut ...]\n") and kept.endswith(b"the end\n")
    assert len(kept.split(b"\n", 1)[1]) == acceptance.LOG_TAIL_BYTES
    assert acceptance.out_problems(ctx.out) == []
    (ctx.out / "nested").mkdir()
    (ctx.out / "a b.txt").write_text("")
    assert sorted(acceptance.out_problems(ctx.out)) == [
        "'a b.txt' has other characters than letters, digits, '.', '_', '-'", "nested is not a plain file"]
