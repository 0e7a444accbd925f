"""`memprof fit`: the largest batch that trains under a CPU memory budget, found by isolated trials."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from rich.console import Console

from memprof.config.spec import CellConfig
from memprof.plan.fit import Search, Trial, search
from memprof.plan.gpus import GIB, MIB, parse_gpu
from memprof.plan.predict import cell_from_flags
from memprof.results.record import Record
from memprof.run.executor import LocalExecutor
from memprof.views.plan import search_table

# tiny-llama, LoRA, AdamW, 2 steps of 1024-token sequences: each sequence adds ~110 MB of resident memory, and the
# worker's address space is capped at the budget, so a couple of sequences fit and more are a real OOM.
BUDGET = 420_000_000
MAX_BATCH = 64


def test_fit_finds_the_largest_batch_under_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("fit", "--model", "tiny-llama", "--adapter", "lora", "--optimizer", "adamw_torch",
                   "--precision", "fp32", "--seq-len", "1024", "--steps", "2", "--device", "cpu",
                   "--memory-budget", str(BUDGET), "--margin", "0", "--max", str(MAX_BATCH), "--json")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    trials = {t["value"]: t for t in result["trials"]}
    best = result["best"]
    assert 1 <= best <= 8, result
    # the answer is bracketed by measurement: it ran under the budget, one more sequence ran out of memory or ran
    # with a peak over the budget (RLIMIT_AS caps the address space, the peak is resident memory growth)
    assert trials[best]["status"] == "ok" and trials[best]["fits"] and trials[best]["peak_bytes"] <= BUDGET
    over = trials[best + 1]
    assert not over["fits"] and (over["status"] == "oom" or (over["status"] == "ok" and over["peak_bytes"] > BUDGET))
    # doubling, then bisection: 2*floor(log2(best)) + 2 trials, within log2(range) + 3
    assert len(result["trials"]) == 2 * int(math.log2(best)) + 2
    assert len(result["trials"]) <= math.log2(MAX_BATCH) + 3
    assert result["wall_s"] > 0
    # the table names what every trial ran and what its peak and limit are
    shown = Search(**{**result, "trials": [Trial(**t) for t in result["trials"]]})
    console = Console(width=100, record=True)
    console.print(search_table(shown))
    text = " ".join(console.export_text().split())
    assert "trials of batch_size for tiny-llama/lora/adamw_torch/s1024/ga1/fp32/" in text and "on cpu" in text
    assert "limit: each trial's address space (RLIMIT_AS)" in text and "peak: its resident memory growth" in text


@pytest.mark.parametrize("argv,message", [
    (["--memory-budget", "0"], "--memory-budget: a memory budget must be positive"),
    (["--memory-budget", "1MB"], "--memory-budget: a memory budget must be at least 8,388,608 B"),  # hung a worker
    (["--memory-budget", "lots"], "--memory-budget: not a GPU or a size: 'lots'"),
    ([], "--memory-budget: required on the CPU"),
    (["--memory-budget", "1000000", "--world-size", "0"], "--world-size: must be 1 to 1,024, got 0"),
    (["--memory-budget", "1GB", "--world-size", "100000", "--strategy", "fsdp2"],
     "--world-size: must be 1 to 1,024, got 100,000"),  # it forked a rank per process until the host ran out
    (["--memory-budget", "1GB", "--batch-size", "99999999999"], "--batch-size: must be 1 to 1,048,576, got"),
    (["--memory-budget", "1GB", "--max", "99999999"], "--max: batch_size is at most 1,048,576, got 99,999,999"),
    (["--memory-budget", "1GB", "--search", "seq_len", "--granularity", "1", "--start", "4"],
     "--granularity: seq_len is at least 2: search it in multiples of 2 or more, not 1"),  # it may halve to 1
    (["--memory-budget", "1000000", "--strategy", "zero1"], "--strategy: zero1 needs --world-size > 1"),
    (["--memory-budget", "1000000", "--margin", "1.5"], "--margin: must be in [0, 1)"),
    (["--memory-budget", "1000000", "--timeout", "0"], "--timeout: must be positive and at most 604800 s"),
    (["--memory-budget", "1000000", "--timeout", "-1"], "--timeout: must be positive and at most 604800 s"),
    (["--memory-budget", "1000000", "--timeout", "inf"], "(a week), got inf"),
    (["--memory-budget", "1000000", "--timeout", "nan"], "(a week), got nan"),
    (["--memory-budget", "1000000", "--start", "8", "--max", "4"], "--start: must be at most --max (4), got 8"),
    (["--memory-budget", "1000000", "--start", "0"], "--start: must be positive, got 0"),
    (["--memory-budget", "1000000", "--max", "-1"], "--max: must be at least the granularity (1), got -1"),
    (["--memory-budget", "1000000", "--search", "seq_len", "--max", "64", "--granularity", "128"],
     "--max: must be at least the granularity (128), got 64"),
    (["--memory-budget", "1000000", "--granularity", "0"], "--granularity: must be positive, got 0"),
    # what plan and a run refuse: before a trial, not as its crash (exit 3)
    (["--memory-budget", "1GB", "--target-modules", "nope_proj"],
     "--target-modules: adapter: Target modules {'nope_proj'} not found in the base model"),
    (["--memory-budget", "1GB", "--world-size", "3"], "--world-size: 3 needs --strategy (ddp, zero1 or fsdp2)"),
])
def test_fit_bad_input_is_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("fit", "--model", "tiny-llama", "--device", "cpu", *argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err


def test_fit_refuses_a_model_that_does_not_build_before_any_trial(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')  # cut short
    assert run_cli("fit", "--model", str(tmp_path), "--device", "cpu", "--memory-budget", "1GB") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {tmp_path}: cannot build the model config: ") and len(err.splitlines()) == 1


def test_fit_on_cuda_without_a_gpu_or_a_budget_says_neither_is_there(capsys: pytest.CaptureFixture[str]) -> None:
    from memprof.results import env

    if env.capture()["gpus"]:
        pytest.skip("NVML names a GPU here: its memory is the limit")
    assert run_cli("fit", "--model", "tiny-llama", "--device", "cuda") == 2
    assert "--memory-budget: required where NVML names no GPU" in " ".join(capsys.readouterr().err.split())


def test_fit_never_tries_past_max(capsys: pytest.CaptureFixture[str]) -> None:
    # everything fits under 512 MiB at 64 tokens: doubling from 3 stops at --max, which is the answer
    code = run_cli("fit", "--model", "tiny-llama", "--seq-len", "64", "--device", "cpu", "--memory-budget", "512MiB",
                   "--start", "3", "--max", "5", "--json")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [(t["value"], t["fits"]) for t in result["trials"]] == [(3, True), (5, True)]
    assert result["best"] == 5 and result["failed"] is None
    assert "/fp32/" in result["config"]  # no --precision: the CPU's own, as `memprof plan --device cpu` takes


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA, where a CUDA trial crashes")
def test_a_crashed_trial_stops_the_search_with_one_line_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli("fit", "--model", "tiny-llama", "--seq-len", "64", "--device", "cuda", "--memory-budget", "512MiB",
                   "--json")
    captured = capsys.readouterr()
    assert code == 3  # as `memprof run` exits for a crashed cell
    result = json.loads(captured.out)
    crashed = {"value": 1, "status": "crashed", "fits": None}
    assert [{k: t[k] for k in crashed} for t in result["trials"]] == [crashed]
    assert result["failed"] == result["trials"][0] and result["best"] is None
    assert "/bf16/" in result["config"]  # no --precision: CUDA's own, as `memprof plan` takes
    lines = captured.err.splitlines()
    assert lines[0] == "  batch_size 1: crashed"  # not "does not fit": a crash says nothing about memory
    assert lines[1].startswith("error: batch_size 1: crashed, so the search stopped") and len(lines) == 2
    assert "Torch not compiled with CUDA enabled" in lines[1]


def test_a_trial_past_its_timeout_stops_the_search_and_keeps_the_trials_before(tmp_path: Path) -> None:
    request = cell_from_flags("tiny-llama", "lora", 16, "all-linear", "adamw_torch", 1, 64, "fp32", 1, False, "sdpa",
                              1, None, 0)
    executor = LocalExecutor(tmp_path)

    def run(cell: CellConfig) -> Record:
        """A real trial; from batch 4 on, with a timeout no trial can meet."""
        if cell.shape.batch_size >= 4:
            cell = cell.with_values({"budget.timeout_s": 0.01})
        return executor.run(cell).record

    try:
        result = search(request, "batch_size", run, 512 * MIB, 0.0, 2, "cpu", cap_address_space=True)
    finally:
        executor.close()
    assert [(t.value, t.status, t.fits) for t in result.trials] == [(1, "ok", True), (2, "ok", True),
                                                                    (4, "timeout", None)]
    assert result.failed == result.trials[-1] and result.best is None
    assert result.failed.error == "ran past timeout_s = 0.01 and was killed"
    console = Console(width=100, record=True)
    console.print(search_table(result))
    row = next(line for line in console.export_text().splitlines() if "timeout" in line)
    assert [cell.strip() for cell in row.split("│")[1:-2]] == ["3", "4", "timeout", "–", "512.00 MiB", "–"]


def test_ctrl_c_stops_the_search_keeps_the_trials_and_exits_130() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "memprof", "fit", "--model", "tiny-llama", "--seq-len", "64",
                             "--device", "cpu", "--memory-budget", "512MiB"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # Ctrl-C's default, even where this test runs in a background job that ignores it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr.readline() == "  batch_size 1: ok\n"
        proc.send_signal(signal.SIGINT)  # during the second trial, or between trials: either stops the search
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    rows = [[cell.strip() for cell in line.split("│")[2:4]] for line in out.splitlines() if line.startswith("│")]
    assert rows[0] == ["1", "ok"] and rows[-1][1] in ("ok", "interrupted")  # the search's trials, kept
    said = " ".join(err.split())
    fitted = max(int(value) for value, status in rows if status == "ok")  # 2 where that trial ended first
    assert said.endswith(f"interrupted, so the search has no answer (so far: batch_size {fitted} fits)")
    assert "largest batch_size that fits" not in out


@pytest.mark.parametrize("text,size", [("400MiB", 400 * MIB), ("512mb", 512 * MIB), ("24GB", 24 * GIB),
                                       ("1.5GiB", int(1.5 * GIB)), ("1000000", 1_000_000)])
def test_a_memory_budget_is_bytes_a_size_or_a_card(text: str, size: int) -> None:
    assert parse_gpu(text, "--memory-budget").capacity_bytes == size
