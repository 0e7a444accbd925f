"""`memprof plan`: exact parts against real models and measured cells, the big presets without a download,
refitting the calibration, and one-line errors for bad input."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from memprof.plan import calibration, predict as plan
from memprof.train import meta
from memprof.train.models import build_model
from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.config.spec import MAX_BATCH_SIZE, AdapterSpec, CellConfig, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.suite import parse
from memprof.suite.schema import AdapterTable
from memprof.measure.accounting import weight_bytes

# QLoRA with paged 8-bit AdamW over five shapes and two batch sizes (enough to refit its activations), and a full
# fine-tune with AdamW: 4-bit weights with quant state, 8-bit and 32-bit optimizer state. Seven cells.
MEASURED_SUITE = """
[suite]
name = "plan-check"
device = "cpu"
steps = 2
warmup_steps = 1
timeout_s = 300

[grid]
model = ["base", "wide", "mlp", "kv", "deep"]
adapter = ["qlora", "none"]
optimizer = ["paged_adamw_8bit", "adamw_torch"]
batch_size = [2, 8]
seq_len = [64]

""" + "".join(f"[[exclude]]\n{rule}\n\n" for rule in (
    'adapter = "qlora"\noptimizer = "adamw_torch"', 'adapter = "none"\noptimizer = "paged_adamw_8bit"',
    'adapter = "none"\nbatch_size = 8', *(f'model = "{m}"\nbatch_size = 8' for m in ("wide", "mlp", "kv", "deep")),
    *(f'adapter = "none"\nmodel = "{m}"' for m in ("wide", "mlp", "kv", "deep")))) + """
[models.base]
preset = "tiny-llama"
[models.wide]
preset = "tiny-llama"
overrides = {hidden_size = 512, intermediate_size = 1376, num_attention_heads = 8, num_key_value_heads = 4}
[models.mlp]
preset = "tiny-llama"
overrides = {intermediate_size = 1376}
[models.kv]
preset = "tiny-llama"
overrides = {num_key_value_heads = 4}
[models.deep]
preset = "tiny-llama"
overrides = {num_hidden_layers = 3}

[adapters.qlora]
kind = "qlora"
r = 16
target_modules = "all-linear"
"""
EXACT_FIELDS = ("frozen_weight_bytes", "trainable_weight_bytes", "buffer_bytes", "gradient_bytes",
                "optimizer_state_bytes")


def _adapter(kind: str, **changes: object) -> AdapterSpec:
    return AdapterTable(kind=kind, r=16, target_modules="all-linear", **changes).to_spec(kind)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CPU run of MEASURED_SUITE (7 cells, in fresh processes)."""
    tmp = tmp_path_factory.mktemp("plan")
    suite_path = tmp / "plan-check.toml"
    suite_path.write_text(MEASURED_SUITE)
    assert run_cli("run", str(suite_path), "--out", str(tmp / "results")) == 0
    (run_dir,) = (tmp / "results").iterdir()
    return run_dir


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind,changes", [("none", {}), ("lora", {}), ("dora", {}), ("qlora", {}),
                                          ("qlora", {"double_quant": False}), ("qlora", {"quant_type": "fp4"})])
def test_meta_model_weights_equal_a_real_build(precision: str, kind: str, changes: dict) -> None:
    """Frozen (4-bit: packed weight, absmax, nested absmax, offset and maps), trainable and buffer bytes of the
    meta model equal those of the model quantised for real on the CPU, byte for byte."""
    model_spec = ModelSpec(name="tiny-llama", preset="tiny-llama")
    adapter_spec = _adapter(kind, **changes)
    real = weight_bytes(build_model(model_spec, adapter_spec, precision, torch.device("cpu")))
    model = meta.meta_model(model_spec, adapter_spec, precision)
    assert meta.frozen_weight_bytes(model) == real.frozen.total
    assert weight_bytes(model).trainable.total == real.trainable.total
    assert weight_bytes(model).buffers.total == real.buffers.total


def test_four_bit_formula_by_hand() -> None:
    # 65536 values: 32768 packed bytes, 1024 blocks of 64 -> uint8 absmax, 4 nested fp32 absmax, offset, maps
    assert meta.four_bit_bytes(65536) == 32768 + 1024 + 4 + 4 * 4 + 1024 + 64
    assert meta.four_bit_bytes(65536, double_quant=False) == 32768 + 4 * 1024 + 64
    assert meta.four_bit_bytes(65) == 33 + 2 + 4 + 4 + 1024 + 64  # odd count, partial block


def test_plan_matches_measured_cells_byte_for_byte(measured: Path) -> None:
    records = read_records(measured)
    cells = {c.key: c for c in parse((measured / "suite.toml").read_text(), measured / "suite.toml").cells}
    assert len(records) == 7 and all(r.status is Status.OK for r in records)
    cal = calibration.load()
    errors = []
    for r in records:
        request = cells[r.key]
        exact = plan.exact_parts(request)
        assert {f: getattr(exact, f) for f in EXACT_FIELDS} == {f: getattr(r, f) for f in EXACT_FIELDS}, r.key
        predicted = plan.predict(request, exact, cal, "cpu")
        errors.append((predicted.allocated_bytes - r.peak_rss_delta_bytes) / r.peak_rss_delta_bytes)
    worst = max(errors, key=abs)
    print(f"plan vs measured CPU peak (RSS growth): errors {[f'{e:+.1%}' for e in errors]}, worst {worst:+.1%}")
    assert all(abs(e) < 0.5 for e in errors)  # CPU-calibrated activations and temporaries: a sanity bound


def test_refit_from_measured_run_reproduces_activations(measured: Path, tmp_path: Path) -> None:
    out = tmp_path / "calibration.json"
    assert run_cli("plan", "--calibrate", str(measured), "--calibration-out", str(out)) == 0
    fitted = calibration.load(out)
    assert set(fitted.groups) == {"fp32/qlora"}
    assert "fp32/none" in fitted.source["skipped"]  # one shape only: not enough to fit
    assert fitted.source["device"] == "cpu" and fitted.source["runs"] == [measured.name]
    assert fitted.groups["fp32/qlora"].records == 6
    # saved activations are deterministic and linear in the widths: the fit reproduces them closely
    assert fitted.groups["fp32/qlora"].activation_max_error < 0.01


def test_shipped_calibration_says_where_it_came_from() -> None:
    cal = calibration.load()
    assert cal.device == "cpu" and cal.devices["cuda"].machine == "NVIDIA H200"
    assert cal.devices["cuda"].cells == 21 and 0.7e9 < cal.devices["cuda"].non_pytorch_bytes < 0.9e9
    assert {f"{p}/{k}" for p in ("fp32", "bf16") for k in ("none", "lora", "qlora", "dora")} <= set(cal.groups)
    assert cal.source["versions"]["torch"]


@pytest.mark.parametrize(("change", "named"), [
    (lambda d: [1, 2], "not a JSON object"),
    (lambda d: {**d, "devices": "x"}, "devices: Input should be a valid dictionary"),
    (lambda d: {**d, "devices": {"cuda": {**d["devices"]["cuda"], "other": "abc"}}}, "devices.cuda.other:"),
    (lambda d: {**d, "devices": {"cuda": {**d["devices"]["cuda"], "cells": "many"}}}, "devices.cuda.cells:"),
    (lambda d: {k: v for k, v in d.items() if k != "groups"}, "groups: Field required"),
    (lambda d: {**d, "groups": {"fp32/lora": {**d["groups"]["fp32/lora"], "activation": [1.0]}}},
     "groups.fp32/lora.activation: 6 coefficients"),
])
def test_a_calibration_file_is_checked_field_by_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      change: object, named: str) -> None:
    shipped = json.loads(calibration.DEFAULT_PATH.read_text())
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(change(shipped)))
    assert run_cli("plan", "--model", "tiny-llama", "--calibration", str(path)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path}: not a memprof calibration file: ") and named in line


def _plan_json(*argv: str, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    assert run_cli("plan", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_llama_8b_qlora_and_70b_plan_offline(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    (p8,) = _plan_json("--model", "llama-3.1-8b", "--adapter", "qlora", "--rank", "16", "--optimizer",
                       "paged_adamw_8bit", "--batch-size", "4", "--seq-len", "2048", "--gpu", "24GB", "h100-80gb",
                       capsys=capsys)
    # LoRA r=16 on all seven linear layers of 32 layers: r * (in + out) each
    per_layer = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert p8["trainable_params"] == 32 * per_layer == 41_943_040
    assert (p8["batch_size"], p8["seq_len"], p8["parallel.world_size"], p8["loss_chunk"]) == (4, 2048, 1, 0)  # data
    assert p8["total_params"] == 8_030_261_248 + 41_943_040  # Llama-3.1-8B and its adapter
    parts = p8["parts"]
    assert parts["trainable_weights"]["bytes"] == 4 * 41_943_040  # peft keeps adapters in fp32
    # the peak is the loss's backward: last step's gradients were freed (zero_grad(set_to_none=True))
    assert p8["moment"] == "loss backward" and "gradients" not in parts
    assert parts["loss_logits"]["bytes"] == 2 * 4 * 2048 * 128256 * 4  # nll's and log_softmax's fp32 gradients
    # 8-bit AdamW: two uint8 states plus one fp32 absmax per 256 values (every LoRA matrix has >= 4096 values); the
    # uint8 buffers of matrices with >= 1e5 elements are paged (outside the allocator), the rest is not
    state = parts["optimizer_state"]["bytes"] + parts["optimizer_state_paged_bytes"]["bytes"]
    assert state == 2 * (41_943_040 + 4 * (41_943_040 // 256)) + 2 * 1024
    assert not parts["optimizer_state_paged_bytes"]["allocated"]
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)
    embeddings = 2 * 128256 * 4096 * 4  # embed_tokens and lm_head, cast to fp32 by peft's k-bit preparation
    assert parts["kbit_fp32_weights"]["bytes"] == embeddings + (2 * 32 + 1) * 4096 * 4  # and the 65 norms
    assert linear // 2 < parts["frozen_weights"]["bytes"] < linear // 2 * 1.07
    assert [g["gpu"] for g in p8["gpus"]] == ["24GB", "h100-80gb"]
    assert all(g["max_batch_size"] >= 0 for g in p8["gpus"])
    # paged state is CUDA managed memory the driver moves to the host when the card is full: not needed on it
    paged = parts["optimizer_state_paged_bytes"]["bytes"]
    assert p8["pageable_bytes"] == paged > 0
    for g in p8["gpus"]:
        assert g["headroom_bytes"] == g["capacity_bytes"] - (p8["total_bytes"] - paged)

    (p70,) = _plan_json("--model", "llama-3.1-70b", "--adapter", "none", "--optimizer", "adamw_torch",
                        "--precision", "bf16", "--gpu", "141GB", capsys=capsys)
    assert p70["total_params"] == 70_553_706_496
    assert p70["parts"]["trainable_weights"]["bytes"] == 2 * 70_553_706_496
    # AdamW: exp_avg and exp_avg_sq like each bf16 param, and a 4-byte step per tensor
    tensors = 80 * 9 + 3
    assert p70["parts"]["optimizer_state"]["bytes"] == 2 * 2 * 70_553_706_496 + 4 * tensors
    assert p70["gpus"][0]["fits"] == "no" and p70["gpus"][0]["max_batch_size"] == 0


def test_plan_suite_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite_path = tmp_path / "s.toml"
    suite_path.write_text(MEASURED_SUITE.replace("batch_size = [2, 8]", "batch_size = [2, 8, 64]"))
    plans = _plan_json(str(suite_path), "--gpu", "24GB", capsys=capsys)
    assert len(plans) == 7 + 6  # the measured cells, and batch 64 for the six configurations without a rule
    assert run_cli("plan", str(suite_path), "--gpu", "24GB", "40GB") == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "optimizer" in line).split()
    assert header == ["model", "adapter", "optimizer", "batch", "peak", "24GB", "40GB"]  # a column per GPU, named
    assert "predicted peak on the card, fits per GPU: seq_len 64, fp32" in " ".join(" ".join(lines).split())
    row = next(line.split() for line in lines if "paged_adamw_8bit" in line and " 64 " in line)
    assert row[-2:] in (["✓", "✓"], ["✗", "✓"], ["?", "✓"], ["✗", "?"], ["✗", "✗"]), row  # one mark per GPU
    # planned for the CPU, the table speaks of RSS and memory sizes, not of a card and its paging
    assert run_cli("plan", str(suite_path), "--device", "cpu", "--gpu", "24GB") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "RSS growth of a CPU run, fits per memory size" in text and "GPU" not in text
    assert "host memory" not in text and " 24GB " in text


def test_a_cpu_plan_is_checked_against_memory_not_cards(capsys: pytest.CaptureFixture[str]) -> None:
    from memprof.results.env import memory_bytes

    (cpu,) = _plan_json("--model", "tiny-llama", "--device", "cpu", capsys=capsys)
    assert [(g["gpu"], g["capacity_bytes"]) for g in cpu["gpus"]] == [("host RAM", memory_bytes())]
    assert cpu["precision"] == "fp32"  # the CPU's own precision, as `memprof fit` takes it there
    assert run_cli("plan", "--model", "tiny-llama", "--device", "cpu", "--gpu", "h200") == 2
    assert "'h200' is a GPU: a CPU plan checks against memory sizes" in capsys.readouterr().err


def test_plan_checks_real_cards_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Generic sizes are GiB, more than the cards: "80GB" is 80 GiB, an H100 80GB 81,559 MiB."""
    from memprof.plan.gpus import CARDS, DEFAULT_CARDS, parse_gpu

    (p,) = _plan_json("--model", "tiny-llama", capsys=capsys)
    assert [g["gpu"] for g in p["gpus"]] == list(DEFAULT_CARDS)
    assert p["precision"] == "bf16"  # CUDA's own
    assert [g["capacity_bytes"] for g in p["gpus"]] == [CARDS[name] for name in DEFAULT_CARDS]
    assert CARDS["h100-80gb"] == 81559 << 20 < parse_gpu("80GB").capacity_bytes == 80 << 30


def test_a_plan_that_does_not_fit_says_by_how_much(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plan", "--model", "llama-3.1-70b", "--adapter", "none", "--seq-len", "4096", "--gpu",
                   "h100-80gb") == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("│ h100-80gb"))
    assert re.search(r"\d+\.\d\d GiB short \(needs \d+\.\d×\)", row), row  # not a headroom of -740%
    assert "%" not in row and row.count("none fits") == 2 and " 0 " not in row


def test_the_fits_table_names_the_total_and_what_is_needed_on_the_card(capsys: pytest.CaptureFixture[str]) -> None:
    from memprof.plan import gpus
    from memprof.views.plan import verdict_table

    card = gpus.parse_gpu("h100-80gb")
    for optimizer, headers in (("adamw_torch", ["total"]), ("paged_adamw_8bit", ["total", "needed"])):
        request = plan.cell_from_flags("llama-3.2-1b", "qlora", optimizer=optimizer, seq_len=512)
        (p,) = plan.plan_requests([request], calibration.load(), "cuda")
        table = verdict_table(p, [plan.verdict(p, card, calibration.load())])
        shown = [c.header for c in table.columns]
        assert [h for h in shown if h in ("total", "on the card", "needed")] == headers, shown


def test_more_tokens_never_plan_less() -> None:
    request = plan.cell_from_flags("tiny-llama", "lora", batch_size=1, seq_len=64, precision="fp32")
    cal = calibration.load()
    exact = plan.exact_parts(request)
    totals = [plan.predict(request.with_values({"shape.batch_size": b}), exact, cal).total_bytes for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    checkpointed = request.with_values({"shape.batch_size": 8, "levers.gradient_checkpointing": "on"})
    assert plan.predict(checkpointed, exact, cal).total_bytes < totals[-1]


@pytest.mark.parametrize("kind", ["linear", "quadratic", "stepped"])
def test_largest_within_is_exact_and_follows_a_smooth_margin(kind: str) -> None:
    """The search the plan's verdict uses (each step a plan, a second each outside the analytic model): the answer
    of a brute-force scan for a margin that falls with n as a plan's bytes grow (linearly with the batch, and with
    the length squared for eager attention) or in steps; on a straight margin, at most five plans."""
    for answer, start in itertools.product((1, 7, 100, 1326, 4095), (1, 4, 1024, 4096)):
        slope = 1000.0
        margin = {"linear": lambda n: slope * (answer + 0.5 - n),
                  "quadratic": lambda n: slope * (answer + 0.5) ** 2 - slope * n * n,
                  "stepped": lambda n: slope * (answer // 64 * 64 + 63 - n // 64 * 64) if n <= answer else -1.0}[kind]
        calls: list[int] = []
        got = plan.largest_within(lambda n: (calls.append(n), margin(n))[1], start=start, limit=4096)
        assert got == max(n for n in range(1, 4097) if margin(n) >= 0), (answer, start)
        if kind == "linear":
            assert len(calls) <= 5, (answer, start, calls)


def test_largest_is_exact_for_a_threshold() -> None:
    for answer in (0, 1, 2, 3, 7, 8, 100, 4095):
        calls: list[int] = []

        def fits(n: int) -> bool:
            calls.append(n)
            return n <= answer
        assert plan.largest(fits, limit=4096) == answer
        assert len(calls) == (1 if answer == 0 else 2 * int(math.log2(answer)) + 2)
        calls.clear()  # from a start that does not fit: halving down to the answer, then bisecting
        assert plan.largest(fits, start=answer + 5, limit=4096) == answer
        assert calls[0] == answer + 5 and all(n <= answer + 5 for n in calls)
        assert len(calls) <= 2 * int(math.log2(answer + 5)) + 2


@pytest.mark.parametrize("extra,where", [
    ('[adapters.lora]\nrnk = 4\n', "adapters.lora.rnk: not a field of peft's LoraConfig"),
    ('[adapters.lora]\nr = "16"\n', "adapters.lora.r: Input should be a valid integer"),
    ('[optimizers.mine]\noptim = "adamw_torch"\nkwargs = { nosuch_arg = 3 }\n',
     "optimizers.mine.kwargs: optimizer 'mine' (adamw_torch) does not build: AdamW.__init__() got an unexpected"),
])
def test_a_bad_suite_is_one_line_naming_file_and_key(extra: str, where: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "s.toml"
    optimizer = "" if "[optimizers.mine]" in extra else '[optimizers.mine]\noptim = "sgd"\n'
    path.write_text('[suite]\nname = "s"\n[grid]\nmodel = ["tiny-llama"]\noptimizer = ["mine"]\n' + optimizer + extra)
    assert run_cli("plan", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}: {where}")


@pytest.mark.parametrize("argv,where", [
    (["--model", "tiny-llama", "--gpu", "rtx-9090"], "--gpu: not a GPU or a size: 'rtx-9090'"),
    (["--model", "tiny-llama", "--budget-bytes", "0"], "--budget-bytes: a memory budget must be positive"),
    (["--model", "tiny-llama", "--gpu", "0GB"], "--gpu: a memory budget must be positive"),
    (["--model", "no-such-model"], "--model: 'no-such-model' is neither a preset"),
    (["--model", "tiny-llama", "--optimizer", "adamw_torh"], "did you mean 'adamw_torch'"),
    (["--model", "tiny-llama", "--world-size", "2", "--strategy", "fsdp2", "--loss-chunk", "16"],
     "--loss-chunk, --strategy: loss_chunk with parallel fsdp2: the chunked loss calls"),
    (["--model", "tiny-llama", "--world-size", "3"], "--world-size: 3 needs --strategy (ddp, zero1 or fsdp2)"),
    (["--model", "tiny-llama", "--world-size", "99999999999", "--strategy", "fsdp2"],
     "--world-size: must be 1 to 1,024, got 99,999,999,999"),  # a MemoryError, or hours of per-rank parts
    (["--model", "tiny-llama", "--batch-size", "99999999999"], "--batch-size: must be 1 to 1,048,576, got"),
    (["--model", "tiny-llama", "--seq-len", "1"], "--seq-len: must be 2 to 16,777,216, got 1"),
    (["--model", "tiny-llama", "--target-modules", "nope_proj"],
     "--target-modules: adapter: Target modules {'nope_proj'} not found in the base model"),
])
def test_bad_input_is_one_line_exit_2(argv: list[str], where: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plan", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert where in " ".join(err.split()) and "Traceback" not in err


def test_the_largest_batch_a_card_takes_is_searched_within_a_batch_s_bounds(
        capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-llama at 8 tokens: the search from a batch of 1 doubles past 2**20 sequences before a 141 GB card is
    full; it stops at the bound (it crashed there, a batch no ShapeSpec takes)."""
    assert run_cli("plan", "--model", "tiny-llama", "--seq-len", "8", "--gpu", "h200", "--json") == 0
    ((fit,),) = [row["gpus"] for row in json.loads(capsys.readouterr().out)]
    assert 0 < fit["max_batch_size"] <= MAX_BATCH_SIZE


def test_a_model_folder_a_model_cannot_be_built_from_is_the_model_flags_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A key of the folder's config.json at fault (here a vocabulary too small for byte-level corpora) names
    --model, the flag that gave the folder, not --adapter."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert run_cli("plan", "--model", str(tmp_path)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: --model {tmp_path}: vocab_size 100 < 256"), err


def test_qwen3_plans_analytically_and_a_mixture_of_experts_on_the_meta_device(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Qwen3 (per-head q/k norms, tests/test_step_memory.py) is in the analytic model; Mixtral's experts, which
    peft adapts as parameters (its ParamWrapper), are not: its step run on the meta device
    (tests/test_meta_step.py), no traceback. Where the meta device could not run them, the fitted coefficients
    would take the width each token passes through (2 experts of 128), with the uncertainty
    benchmarks/fallback_accuracy.py measured for mixtures of experts."""
    (qwen,) = _plan_json("--model", "qwen3-8b", "--adapter", "qlora", "--batch-size", "2", "--seq-len", "2048",
                         "--gradient-checkpointing", "--gpu", "24GB", capsys=capsys)
    assert qwen["trainable_params"] == 36 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 12288))
    assert qwen["moment"] == "loss backward"
    assert qwen["parts"]["loss_logits"]["bytes"] == 2 * 2048 * 151936 * 8  # two fp32 [tokens, vocab] gradients
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2}))
    (moe,) = _plan_json("--model", str(tmp_path), "--batch-size", "2", "--seq-len", "64", capsys=capsys)
    assert moe["moment"].endswith("(meta device)") and moe["trainable_params"] > 0
    assert moe["parts"]["activations"]["how"] == "measured on the meta device"
    request = CellConfig(model=ModelSpec(name="moe", path=str(tmp_path)),
                         adapter=AdapterSpec(name="lora", kind="lora", lora={"r": 8, "target_modules": "all-linear"}),
                         optimizer=OptimizerSpec(label="adamw_torch", name="adamw_torch"),
                         shape=ShapeSpec(batch_size=2, seq_len=64, precision="bf16"))
    (planned,) = plan.plan_requests([request], calibration.load())
    _, how, error = plan.fitted_activations(request, planned.exact, calibration.load())
    assert error == plan.MOE_ERROR and "not fitted to mixtral layers" in how
    assert (planned.exact.shape.intermediate, planned.exact.shape.experts) == (2 * 128, 4)


def test_an_architecture_outside_the_model_is_measured_on_the_meta_device(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Gemma2 with eager attention: its step run on the meta device, nothing fitted but the remainder; with sdpa,
    which transformers has no path for in Gemma2, one line saying so and exit 2 (a run records such a cell as
    unavailable); with the chunked loss, which its soft-capped logits refuse, one line naming --loss-chunk."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}))
    (gemma,) = _plan_json("--model", str(tmp_path), "--attn", "eager", "--seq-len", "64", capsys=capsys)
    assert gemma["moment"].endswith("(meta device)")
    assert gemma["parts"]["activations"]["how"] == "measured on the meta device"
    assert gemma["parts"]["activations"]["error"] == plan.META_ERROR["cuda"]
    assert run_cli("plan", "--model", str(tmp_path), "--seq-len", "64") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --attn: attn_implementation sdpa: Gemma2ForCausalLM does not support")
    assert error.endswith("(eager does)") and "\n" not in error
    assert run_cli("plan", "--model", str(tmp_path), "--attn", "eager", "--seq-len", "64", "--loss-chunk", "32") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --loss-chunk: loss_chunk: the model transforms its logits") and "\n" not in error


def test_a_suite_plan_gives_each_configuration_a_run_would_not_train_its_ending_and_plans_the_rest(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As a run records them, a cell's own failure is that cell's: Gemma2 with sdpa (no path in transformers) is
    unavailable, PhiMoE under all-linear LoRA (peft wraps its tuple-returning router) crashes, tiny-llama plans."""
    small = "vocab_size = 256, hidden_size = 64, intermediate_size = 128, num_attention_heads = 2"
    path = tmp_path / "mixed.toml"
    path.write_text(f"""[suite]
name = "mixed"
[grid]
model = ["gemma2", "phimoe", "tiny-llama"]
adapter = ["all"]
optimizer = ["adamw_torch"]
batch_size = [1, 2]
seq_len = [32]
[models.gemma2]
config = {{ model_type = "gemma2", {small}, num_hidden_layers = 1, num_key_value_heads = 1, head_dim = 32 }}
[models.phimoe]
config = {{ model_type = "phimoe", {small}, num_hidden_layers = 1, num_key_value_heads = 2, num_local_experts = 4 }}
[adapters.all]
kind = "lora"
r = 8
target_modules = "all-linear"
""")
    plans = _plan_json(str(path), "--device", "cpu", "--gpu", "24GB", capsys=capsys)
    assert [(p["model"], p.get("status", "planned"), len(p.get("gpus", []))) for p in plans] == [
        ("gemma2", "unavailable", 0), ("gemma2", "unavailable", 0), ("phimoe", "crashed", 0),
        ("phimoe", "crashed", 0), ("tiny-llama", "planned", 1), ("tiny-llama", "planned", 1)]
    assert "AttributeError: 'tuple' object has no attribute 'dtype'" in plans[2]["error"]
    assert run_cli("plan", str(path), "--device", "cpu", "--gpu", "24GB") == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "gemma2 all adamw_torch 1 unavailable gemma2 all adamw_torch 2 unavailable" in shown  # no marks
    assert "phimoe / all / adamw_torch: crashed: " in shown and shown.count("gemma2 / all / adamw_torch:") == 1


def test_the_fallbacks_stated_uncertainty_covers_its_committed_miss() -> None:
    """results/benchmarks/fallback_accuracy.json: the fitted activations against autograd's on seven architectures
    outside the analytic model; the plan's stated error for them covers every miss."""
    committed = Path(__file__).parent.parent / "results" / "benchmarks" / "fallback_accuracy.json"
    result = json.loads(committed.read_text())
    moe = {"mixtral", "qwen3-moe"}
    assert {r["architecture"] for r in result["rows"]} >= moe | {"gemma2", "gemma3", "phi3"}
    assert max(abs(r["miss"]) for r in result["rows"] if r["architecture"] not in moe) <= plan.ARCHITECTURE_ERROR
    assert max(abs(r["miss"]) for r in result["rows"] if r["architecture"] in moe) <= plan.MOE_ERROR


def test_model_that_is_not_a_causal_lm(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 32128}))
    assert run_cli("plan", "--model", str(tmp_path)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "T5Config" in last and "Traceback" not in err


def test_the_qlora_papers_65b_on_48gb_question(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/plan.md answers it from docs/qlora-48gb.toml: LLaMA-65B fits one 48 GB card with paged AdamW, as the
    paper says; Llama-3.1-70B with peft's fp32 casts does not surely fit (its 128k vocabulary)."""
    plans = _plan_json(str(Path(__file__).parent.parent / "docs" / "qlora-48gb.toml"), "--gpu", "48GB",
                       capsys=capsys)
    answer = {(p["model"], p["adapter"], p["optimizer"]): p["gpus"][0]["fits"] for p in plans}
    assert len(answer) == 8
    assert all(fits == "yes" for (model, _, _), fits in answer.items() if model == "llama-65b")
    assert answer["llama-3.1-70b", "qlora", "paged_adamw_32bit"] != "yes"
    casts = {p["adapter"]: p["parts"].get("kbit_fp32_weights", {}).get("bytes", 0) for p in plans
             if p["model"] == "llama-3.1-70b" and p["optimizer"] == "paged_adamw_8bit"}
    assert casts["noprep"] == 0 and casts["qlora"] > 2 * 128256 * 8192 * 4  # embeddings and head in fp32


def test_a_cpu_plan_reads_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    """Small models' sizes in millions, no note about parts outside an allocator the CPU has none of, and a warning
    when the length asked for is beyond what the model was made for."""
    assert run_cli("plan", "--model", "tiny-llama", "--device", "cpu", "--seq-len", "2048", "--gpu", "24GB") == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert re.search(r"\(\d+\.\d M params, 0\.1 M trainable\)", shown), shown[:300]
    assert "not the torch allocator's" not in shown and "headroom" in shown
    assert "seq_len 2,048 is beyond its max_position_embeddings (1,024)" in shown
    from memprof.plan import gpus
    from memprof.views.plan import verdict_table

    request = plan.cell_from_flags("tiny-llama", "lora", batch_size=1, seq_len=64, precision="fp32")
    (cpu_plan,) = plan.plan_requests([request], calibration.load(), "cpu")
    size = gpus.parse_gpu("24GB")
    first = verdict_table(cpu_plan, [plan.verdict(cpu_plan, size, calibration.load())]).columns[0]
    assert (first.header, first.justify) == ("memory", "left")  # the sizes' column, left as the GPU names' is
