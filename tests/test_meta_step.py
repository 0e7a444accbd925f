"""The step run on the meta device (memprof.measure.meta_step) against a real CPU step for the architectures
step_memory does not model (what forward saves, to the byte; the step's peak, against the profiler's replay), and
against step_memory's formulas (checked on an H200) for CUDA."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.measure import meta_step, step_memory
from memprof.measure.replay import replay_step, saved_bytes
from memprof.plan import calibration, predict
from memprof.train import models

SMALL = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
         "num_key_value_heads": 2, "pad_token_id": 0}
# more layers than the meta step measures (it extrapolates a period of the layer pattern), Gemma's alternating
# sliding and full attention included
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCHITECTURES = {
    "gemma2": {"model_type": "gemma2", "head_dim": 32, "num_hidden_layers": 6, "sliding_window": 16},
    "gemma3": {"model_type": "gemma3_text", "head_dim": 32, "num_hidden_layers": 6, "sliding_window": 16,
               "layer_types": ["sliding_attention", "full_attention"] * 3},
    "phi3": {"model_type": "phi3", "num_hidden_layers": 4},
    "olmo2": {"model_type": "olmo2", "num_hidden_layers": 4},
    # mixtures of experts: peft adapts the fused expert weights as parameters; QLoRA's and fp32's experts are fp32
    "mixtral": {"model_type": "mixtral", "num_hidden_layers": 4, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3-moe": {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 96},
}
LORA = {"r": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def _cell(model: ModelSpec, adapter: str, precision: str, checkpointing: bool, attn: str = "sdpa", batch: int = 2,
          seq: int = 64) -> CellConfig:
    lora = LORA if adapter != "none" else {}
    return CellConfig(model=model, adapter=AdapterSpec(name=adapter, kind=adapter, lora=lora),
                      optimizer=OptimizerSpec(label="adamw_torch", name="adamw_torch"),
                      shape=ShapeSpec(batch_size=batch, seq_len=seq, precision=precision),
                      levers=Levers(gradient_checkpointing=checkpointing, attn_implementation=attn))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_meta_step_saves_what_a_cpu_step_saves(name: str) -> None:
    model = ModelSpec(name=name, config={**SMALL, **ARCHITECTURES[name]})
    wrong = []
    for adapter, precision, checkpointing in [*itertools.product(("lora", "qlora", "none"), ["bf16"], (False, True)),
                                              ("lora", "fp32", False)]:
        cell = _cell(model, adapter, precision, checkpointing, "eager" if name == "gemma2" else "sdpa")
        assert step_memory.step_shape(cell, "cpu") is None  # outside the analytic model
        if meta_step.step_peak(cell, "cpu").saved != (saved := saved_bytes(cell)):
            wrong.append((adapter, precision, checkpointing, saved, meta_step.step_peak(cell, "cpu").saved))
    assert not wrong


@pytest.mark.parametrize(("preset", "adapter", "precision", "checkpointing", "attn"), [
    ("llama-3.1-8b", "qlora", "bf16", False, "sdpa"),  # the fp32 stream: sdpa's math path on CUDA
    ("llama-3.1-8b", "none", "bf16", True, "sdpa"),
    ("llama-3.2-1b", "lora", "bf16", False, "sdpa"),   # flash, with its dropout seed and offset
    ("llama-3.2-1b", "lora", "fp32", False, "sdpa"),
    ("llama-3.2-1b", "lora", "bf16", True, "eager"),  # the recomputed softmax's backward, CUDA's tmp included
    ("qwen2.5-0.5b", "dora", "bf16", False, "sdpa"),
    ("qwen3-0.6b", "lora", "bf16", True, "eager"),
])
def test_on_cuda_the_meta_step_is_the_analytic_models_to_the_byte(preset: str, adapter: str, precision: str,
                                                                  checkpointing: bool, attn: str) -> None:
    """At the presets' real sizes (b3 x 1024): the same kernels' saved tensors as step_memory's formulas, which equal
    an H200's measured activations (tests/test_attribution.py); and the plan from the step on the meta device is the
    analytic plan's peak (which equals the H200's allocator peaks, tests/test_plan_accuracy.py), where the formulas
    are checked ones (DoRA's are an estimate)."""
    cell = _cell(ModelSpec(name=preset, preset=preset), adapter, precision, checkpointing, attn, batch=3, seq=1024)
    shape = step_memory.step_shape(cell, "cuda")
    assert meta_step.step_peak(cell, "cuda").saved == step_memory.activation_bytes(shape)
    shipped = calibration.load()
    analytic = predict.plan_requests([cell], shipped, "cuda")[0]
    measured = predict.meta_plan(cell, analytic.exact, shipped, "cuda")
    if analytic.moment not in step_memory.ESTIMATES:
        assert measured.allocated_bytes == pytest.approx(analytic.allocated_bytes, rel=1e-3)


@pytest.mark.parametrize("name", ["llama", "phi3", "gemma2", "mixtral"])
def test_the_meta_steps_peak_is_a_cpu_replays_but_for_the_cpu_kernels_scratch(name: str) -> None:
    """The highest live bytes of one step on the meta device against the profiler's allocator events in a real CPU
    step (memprof.measure.replay, exact): never above, equal (within 0.1%) where the peak falls outside a CPU
    kernel's own scratch (sdpa's), and at most the plan's stated error below (17% on Phi-3's recomputed layer)."""
    config = {**SMALL, "num_hidden_layers": 4, **ARCHITECTURES.get(name, {"model_type": "llama"})}
    below = []
    combos = [("lora", False, 0, 1), ("lora", True, 0, 1), ("none", False, 0, 1), ("qlora", False, 0, 1),
              ("none", True, 64, 1), ("none", True, 0, 2)]  # the last: a later micro-batch, beside the gradients
    for adapter, checkpointing, chunk, accumulation in combos:
        cell = _cell(ModelSpec(name=name, config=config), adapter, "bf16", checkpointing,
                     "eager" if name == "gemma2" else "sdpa", batch=2, seq=256)
        cell = cell.model_copy(update={"levers": cell.levers.model_copy(update={"loss_chunk": chunk}),
                                       "shape": cell.shape.model_copy(update={"grad_accum": accumulation})})
        if models.loss_chunk_unavailable(models.build_config(cell.model), cell.levers):
            continue  # Gemma2's soft-capped logits
        torch.manual_seed(0)
        model = models.build_model(cell.model, cell.adapter, "bf16", torch.device("cpu"), cell.levers)
        x = torch.randint(0, models.BYTE_VOCAB, (2, 256))
        replay = replay_step(model, models.loss_function(cell.levers), x, accumulating=accumulation > 1)
        real, meta = max(replay.forward_bytes, replay.backward_bytes), meta_step.step_peak(cell, "cpu").bytes
        below.append((real - meta) / real)
    assert min(below) < 1e-3 and all(0 <= b <= predict.META_ERROR["cpu"] for b in below), below


def test_a_replay_counts_no_free_of_a_block_its_step_did_not_allocate() -> None:
    """torch's CPU allocator keeps the size of a block allocated under a profile until it sees it freed under one: a
    block freed between profiles leaves its size behind, and the next block at its address is reported freed with
    that size (an earlier replay's gradients did this to a later one, 4-41% low). The replay counts the frees of
    what its own step allocated, so such frees inside it change nothing."""
    from torch.profiler import ProfilerActivity, profile

    model, x = nn.Linear(256, 256), torch.randn(32, 256)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x).square().mean()

    clean = replay_step(model, loss, x)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
        seen = [torch.empty(1024) for _ in range(64)]
    addresses = {t.data_ptr() for t in seen}
    del seen  # freed outside a profile: their sizes stay behind
    held = [torch.empty(1024) for _ in range(64)]
    assert addresses & {t.data_ptr() for t in held}  # malloc hands the same addresses out again
    calls = []

    def freeing(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:  # the profiled step: two warm-up steps before it
            held.clear()
        return loss(m, x)

    assert replay_step(model, freeing, x) == clean and not held


def test_a_step_that_fails_on_its_own_is_said_as_a_run_of_it_fails() -> None:
    """peft wraps PhiMoE's router (an ``nn.Linear`` that returns a tuple) under all-linear, and its forward then
    breaks: the meta step says so with the library's line, where a real CPU step raises the same error; without the
    router in its targets the step runs."""
    model = ModelSpec(name="phimoe", config={**SMALL, "model_type": "phimoe", "num_hidden_layers": 2,
                                             "num_local_experts": 4})
    cell = _cell(model, "lora", "bf16", False)
    with pytest.raises(AttributeError) as real:
        saved_bytes(cell)
    with pytest.raises(meta_step.StepFails) as meta:
        meta_step.step_peak(cell, "cuda")
    assert str(meta.value).startswith("phimoe / lora: the step fails")
    assert f"AttributeError: {real.value} (peft/tuners/lora/layer.py:" in str(meta.value)
    attention = AdapterSpec(name="attn", kind="lora", lora={**LORA, "target_modules": "attention"})
    assert meta_step.step_peak(cell.model_copy(update={"adapter": attention}), "cuda").bytes > 0  # the router's part
