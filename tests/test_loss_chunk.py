"""The loss_chunk lever: the chunked causal-LM loss is transformers' loss with its gradients, its suite axis leaves the
default's keys and hashes as they were, and step_memory's model of it is exact on the CPU: the saved activations as
memprof measures them, the loss's moments as the CPU allocator's events show them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, short_suite
from pydantic import ValidationError

from memprof import suite
from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ParallelSpec, ShapeSpec
from memprof.measure import step_memory
from memprof.measure.replay import replay_step
from memprof.results.record import Status
from memprof.run.launch import run_cell
from memprof.train import models
from memprof.train.loop import full_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
VOCAB = 32_000  # against tiny-llama's hidden 256, the loss's [tokens, vocab] tensors dominate a step
CHUNK = 32
GRID = """
[grid]
model = ["wide-vocab"]
adapter = ["lora"]
optimizer = ["adamw_torch"]
batch_size = [2]
seq_len = [64]
{axis}

[models.wide-vocab]
preset = "tiny-llama"
overrides = {{vocab_size = {vocab}}}
"""


def _suite(path: Path, device: str = "cpu", axis: str = f"loss_chunk = [0, {CHUNK}]") -> Path:
    path.write_text(short_suite(path.stem).replace('device = "cpu"', f'device = "{device}"')
                    + GRID.format(axis=axis, vocab=VOCAB))
    return path


def _tiny(adapter: str, precision: str = "fp32", vocab: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(ModelSpec(name="t", preset="tiny-llama", overrides={"vocab_size": vocab}),
                               AdapterSpec(name=adapter, kind=adapter), precision, CPU)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which leaves A without a gradient
            torch.nn.init.normal_(param, std=0.02)
    return model


def _loss_and_grads(loss: torch.Tensor, model: torch.nn.Module) -> tuple[float, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), [g.float() for g in torch.autograd.grad(loss, params)]


@pytest.mark.parametrize("adapter", ["none", "lora", "qlora"])
def test_the_chunked_loss_and_its_gradients_are_transformers_in_fp32(adapter: str) -> None:
    model = _tiny(adapter)
    x = torch.randint(0, 1000, (2, 40))  # 80 tokens: chunks of 24, 24, 24 and 8
    full, full_grads = _loss_and_grads(full_loss(model, x), model)
    chunked, grads = _loss_and_grads(models.chunked_loss(24, model, x), model)
    assert chunked == pytest.approx(full, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in full_grads)
    for want, got in zip(full_grads, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():  # the held-out evaluation's path: no graph, the checkpoints run plainly
        assert models.chunked_loss(24, model, x).item() == pytest.approx(full_loss(model, x).item(), rel=1e-6)


def test_in_bf16_the_chunked_loss_is_transformers_to_bf16_precision() -> None:
    model = _tiny("none", "bf16")
    x = torch.randint(0, 1000, (2, 40))
    full, full_grads = _loss_and_grads(full_loss(model, x), model)
    chunked, grads = _loss_and_grads(models.chunked_loss(24, model, x), model)
    assert chunked == pytest.approx(full, rel=1e-5)  # both upcast the same bf16 logits
    chunks = 4  # 80 tokens in chunks of 24: the head's gradient is a bf16 sum of 4 partial products, each rounding
    for want, got in zip(full_grads, grads, strict=True):  # by up to bf16's unit roundoff (2**-8) of its total
        assert (got - want).abs().max() <= chunks * 2**-8 * want.abs().max()


def test_a_model_that_transforms_its_logits_and_a_sharded_cell_are_refused() -> None:
    gemma2 = ModelSpec(name="tiny-gemma2", config={"model_type": "gemma2", "vocab_size": 256, "hidden_size": 64,
                                                   "intermediate_size": 128, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    with pytest.raises(models.LeverUnavailable, match="final_logit_softcapping"):
        models.build_model(gemma2, AdapterSpec(name="none", kind="none"), "fp32", CPU, Levers(loss_chunk=CHUNK))
    with pytest.raises(ValidationError, match="unsharded only"):
        Levers(loss_chunk=CHUNK, parallel=ParallelSpec(strategy="fsdp2", world_size=2))


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[CellConfig], CellConfig]:
    """The suite's two cells (loss_chunk 0 and CHUNK), and the one cell of the same suite without the axis."""
    folder = tmp_path_factory.mktemp("suites")
    with_axis, without = _suite(folder / "chunked.toml"), _suite(folder / "plain.toml", axis="")
    return suite.load(str(with_axis)).cells, suite.load(str(without)).cells[0]


def test_the_axis_keys_the_chunked_cell_and_leaves_the_default_as_it_was(
        cells: tuple[list[CellConfig], CellConfig]) -> None:
    (default, chunked), plain = cells
    assert (default.key, default.config_hash) == (plain.key, plain.config_hash)
    assert chunked.key == f"{plain.key}/lc{CHUNK}" and chunked.config_hash != plain.config_hash
    assert (default.levers_label, chunked.levers_label) == ("", f"chunked-loss-{CHUNK}")


@pytest.fixture(scope="module")
def results(cells: tuple[list[CellConfig], CellConfig]) -> list:
    return [run_cell(cell) for cell in cells[0]]


def test_both_cells_train_alike_and_save_what_step_memory_says(results: list) -> None:
    full, chunked = (result.record for result in results)
    assert full.status is Status.OK and chunked.status is Status.OK
    # the same weights, batches and loss: the same steps and held-out loss, to float tolerance
    for want, got in zip(results[0].steps, results[1].steps, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert results[1].steps[-1]["eval_loss"] == pytest.approx(results[0].steps[-1]["eval_loss"], rel=1e-5)
    for record in (full, chunked):
        assert record.activation_bytes == step_memory.activation_bytes(step_memory.step_shape(record.config, "cpu"))
    tokens, hidden = 2 * 64, 256
    # the fp32 log_softmax output [T, V] is no longer saved, the final hidden states (fp32) are, for the chunks; the
    # labels stay, and the mean's int64 token count (8 B) replaces nll_loss's fp32 total weight (4 B)
    assert full.activation_bytes - chunked.activation_bytes == tokens * VOCAB * 4 - tokens * hidden * 4 - 4
    assert (full.peak_moment, chunked.peak_moment) == ("loss backward", "chunked loss backward")
    # one chunk's fp32 log_softmax output and its two gradients, and the other chunks' hidden-state gradients
    assert chunked.breakdown["loss_logits"] == 3 * CHUNK * VOCAB * 4 + (tokens - CHUNK) * hidden * 4
    assert full.breakdown["loss_logits"] == 2 * tokens * VOCAB * 4
    assert chunked.to_row()["loss_chunk"] == CHUNK and full.to_row()["loss_chunk"] == 0


@pytest.mark.parametrize(("adapter", "precision", "moment"),
                         [("lora", "bf16", "chunked loss backward"), ("none", "fp32", "chunked loss head backward")])
def test_the_chunked_loss_moments_are_exact_on_the_cpu(adapter: str, precision: str, moment: str) -> None:
    cell = CellConfig(model=ModelSpec(name="t", preset="tiny-llama", overrides={"vocab_size": VOCAB}),
                      adapter=AdapterSpec(name=adapter, kind=adapter), optimizer=OptimizerSpec(label="a", name="a"),
                      shape=ShapeSpec(batch_size=2, seq_len=64, precision=precision), levers=Levers(loss_chunk=CHUNK))
    model = models.build_model(cell.model, cell.adapter, precision, CPU, cell.levers)
    x = torch.randint(0, VOCAB, (2, 64))
    chunked = replay_step(model, models.loss_function(cell.levers), x)
    full = replay_step(model, full_loss, x)
    activations = chunked.activation_bytes
    shape = step_memory.step_shape(cell, "cpu")
    assert activations == step_memory.activation_bytes(shape)
    # the input batch was allocated before the profile; the parts it leaves out are a few scalars (a full
    # fine-tune's embedding keeps the input batch, which the moments count twice: once as input_ids)
    every = step_memory.moments(shape, weights=0, optimizer=0, activations=activations)
    predicted = {name: sum(parts.values()) - parts["input_ids"] for name, parts in every.items()}
    assert abs(chunked.forward_bytes - predicted["chunked loss forward"]) <= 4096
    assert abs(chunked.backward_bytes - max(predicted[m] for m in every if step_memory.phase(m) == "backward")) <= 4096
    assert max((m for m in every if step_memory.phase(m) == "backward"), key=predicted.get) == moment
    assert chunked.forward_bytes < full.forward_bytes
    if adapter == "none":  # a trainable head's gradient summed out of place: at 128 tokens its two extra [V, h]
        # copies outweigh what chunking the logits saves
        assert chunked.backward_bytes > full.backward_bytes
    else:
        assert chunked.backward_bytes < full.backward_bytes / 2


def test_plan_shows_the_chunked_loss_smaller(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("plan", str(_suite(tmp_path / "plan.toml", device="cuda")), "--json") == 0
    full, chunked = json.loads(capsys.readouterr().out)
    assert (full["moment"], chunked["moment"]) == ("loss backward", "chunked loss backward")
    tokens, hidden = 2 * 64, 256
    assert chunked["parts"]["loss_logits"]["bytes"] == 3 * CHUNK * VOCAB * 4 + (tokens - CHUNK) * hidden * 4
    assert chunked["parts"]["loss_logits"]["error"] > full["parts"]["loss_logits"]["error"]  # CUDA: an estimate
    assert chunked["allocated_bytes"] < full["allocated_bytes"]


def test_plan_and_fit_take_the_lever_as_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--model", "llama-3.2-1b", "--adapter", "lora", "--batch-size", "4", "--seq-len", "512",
             "--device", "cuda", "--json"]
    assert run_cli("plan", *flags) == 0
    (full,) = json.loads(capsys.readouterr().out)
    assert run_cli("plan", *flags, "--loss-chunk", "256") == 0
    (chunked,) = json.loads(capsys.readouterr().out)
    assert chunked["parts"]["loss_logits"]["bytes"] < full["parts"]["loss_logits"]["bytes"] / 2
    assert chunked["allocated_bytes"] < full["allocated_bytes"]
    assert run_cli("plan", *flags, "--loss-chunk", "-1") == 2
    assert "--loss-chunk: must be 0 (off) or a number of tokens" in capsys.readouterr().err


def test_the_plans_outside_the_analytic_model_plan_the_loss_in_chunks_too() -> None:
    from memprof.plan import calibration
    from memprof.plan.predict import cell_from_flags, exact_parts, fitted_plan, meta_plan

    shipped = calibration.load()
    group = shipped.group("bf16", "lora")
    cells = [cell_from_flags("llama-3.2-1b", "lora", batch_size=4, seq_len=512, loss_chunk=chunk) for chunk in (0, 256)]
    # the step on the meta device: one chunk's logits at a time
    full, chunked = (meta_plan(cell, exact_parts(cell), shipped, "cuda") for cell in cells)
    logits = [{p.name: p.bytes for p in plan.parts}.get("loss_logits", 0) for plan in (full, chunked)]
    assert full.moment == "loss backward (meta device)" and logits[0] >= 2 * 2048 * 128_256 * 4
    assert logits[1] < logits[0] / 4 and chunked.allocated_bytes < full.allocated_bytes
    # the fitted temporaries grow with tokens x vocab (chunked, with 256 of the 2,048 tokens)
    full, chunked = ({p.name: p for p in fitted_plan(cell, exact_parts(cell), shipped, "cuda").parts}["temporaries"]
                     for cell in cells)
    assert full.bytes - chunked.bytes == pytest.approx(group.temporaries[1] * (2048 - 256) * 128_256, rel=1e-6)
    assert "256 tokens at a time" in chunked.how
