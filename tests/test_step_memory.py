"""step_memory's formulas against the real autograd graph on the CPU, for every architecture it models: the bytes a
step saves (SavedActivations, byte for byte), and the gradients made when backward reaches the first layer."""

from __future__ import annotations

import itertools

import pytest
import torch

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.measure import step_memory
from memprof.measure.accounting import weight_bytes
from memprof.measure.replay import replay_step, saved_bytes
from memprof.train import models

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cell(preset: str, adapter: str, target_modules: str | None, precision: str, checkpointing: bool = False,
          attn: str = "sdpa") -> CellConfig:
    lora = {"r": 8, "lora_dropout": 0.0, **({"target_modules": target_modules} if target_modules else {})}
    return CellConfig(model=ModelSpec(name=preset, preset=preset),
                      adapter=AdapterSpec(name=adapter, kind=adapter, lora=lora if adapter != "none" else {}),
                      optimizer=OptimizerSpec(label="adamw_torch", name="adamw_torch"),
                      shape=ShapeSpec(batch_size=2, seq_len=64, precision=precision),
                      levers=Levers(gradient_checkpointing=checkpointing, attn_implementation=attn))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_the_saved_bytes_are_what_autograd_saves(preset: str) -> None:
    """Every adapter (LoRA on all linears, on attention, peft's default q/v), precision, checkpointing and attention
    kernel; Qwen3's per-head q/k norms and its attention wider than the hidden size included."""
    wrong = []
    for adapter, targets, precision, checkpointing, attn in itertools.product(
            ("none", "lora", "qlora", "dora"), ("all-linear", "attention", None), ("fp32", "bf16"), (False, True),
            ("sdpa", "eager")):
        if adapter == "none" and targets != "all-linear":
            continue
        cell = _cell(preset, adapter, targets, precision, checkpointing, attn)
        shape = step_memory.step_shape(cell, "cpu")
        assert shape is not None, cell.key
        if step_memory.activation_bytes(shape) != (saved := saved_bytes(cell)):
            wrong.append((cell.key, saved, step_memory.activation_bytes(shape)))
    assert not wrong


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])  # an output head of its own; one tied to the input
def test_a_full_fine_tunes_gradients_when_backward_reaches_the_first_layer(preset: str) -> None:
    """The head's gradient is made first and the embedding's last: what the layer-0 moments under checkpointing
    count. A tied weight's gradient becomes ``.grad`` only once the embedding's share is added, but the head's share is
    alive from the start, in autograd's buffer for it (a replay's allocator events show it): counted as made."""
    cell = _cell(preset, "none", None, "bf16")
    model = models.build_model(cell.model, cell.adapter, "bf16", CPU, cell.levers)
    made: list[int] = []

    def count(*_: object) -> None:
        made.append(sum(p.grad.nbytes for p in model.parameters() if p.grad is not None))

    model.get_decoder().layers[0].mlp.register_full_backward_pre_hook(count)
    models.full_loss(model, torch.randint(0, 256, (2, 64))).backward()
    shape = step_memory.step_shape(cell, "cpu")
    gradients = weight_bytes(model).trainable.total
    assert shape is not None and shape.tied_embeddings == (preset == "tiny-qwen3")
    buffered = shape.vocab * shape.hidden * 2 if shape.tied_embeddings else 0
    assert [m + buffered for m in made] == [step_memory.gradients_before_first_layer(shape, gradients)]
    assert 0 < made[0] < gradients


@pytest.mark.parametrize(("adapter", "checkpointing"), [("none", False), ("none", True), ("lora", False),
                                                         ("lora", True)])
def test_a_later_micro_batch_runs_beside_the_first_ones_gradients(adapter: str, checkpointing: bool) -> None:
    """With gradient accumulation every gradient is there from the first micro-batch on: a later micro-batch's
    replayed peak (memprof.measure.replay, exact) plus those gradients against the largest forward or backward moment
    (a full fine-tune of small-llama: +45% over one micro-batch's peak without checkpointing)."""
    cell = _cell("small-llama", adapter, "all-linear", "bf16", checkpointing)
    cell = cell.model_copy(update={"shape": ShapeSpec(batch_size=2, seq_len=256, precision="bf16", grad_accum=2)})
    torch.manual_seed(0)
    model = models.build_model(cell.model, cell.adapter, "bf16", CPU, cell.levers)
    x = torch.randint(0, models.BYTE_VOCAB, (2, 256))
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    replayed = replay_step(model, models.loss_function(cell.levers), x, accumulating=True)
    real = max(replayed.forward_bytes, replayed.backward_bytes) + gradients
    every = step_memory.moments(step_memory.step_shape(cell, "cpu"), weights=0, optimizer=0, gradients=gradients)
    predicted = max(sum(parts.values()) - parts["input_ids"] for name, parts in every.items()
                    if step_memory.phase(name) in ("forward", "backward"))
    assert predicted == pytest.approx(real, rel=0.06)
