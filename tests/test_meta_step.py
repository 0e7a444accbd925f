"""Saved activations measured on the meta device (memprof.measure.meta_step) against a real CPU step for the
architectures step_memory does not model, and against step_memory's formulas (checked on an H200) for CUDA."""

from __future__ import annotations

import itertools

import pytest

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.measure import meta_step, step_memory
from memprof.measure.replay import saved_bytes

SMALL = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 344, "num_attention_heads": 4,
         "num_key_value_heads": 2, "pad_token_id": 0}
# more layers than the meta step measures (it extrapolates a period of the layer pattern), Gemma's alternating
# sliding and full attention included
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
        if meta_step.activation_bytes(cell, "cpu") != (saved := saved_bytes(cell)):
            wrong.append((adapter, precision, checkpointing, saved, meta_step.activation_bytes(cell, "cpu")))
    assert not wrong


@pytest.mark.parametrize(("preset", "adapter", "precision", "checkpointing", "attn"), [
    ("llama-3.1-8b", "qlora", "bf16", False, "sdpa"),  # the fp32 stream: sdpa's math path on CUDA
    ("llama-3.1-8b", "none", "bf16", True, "sdpa"),
    ("llama-3.2-1b", "lora", "bf16", False, "sdpa"),   # flash, with its dropout seed and offset
    ("llama-3.2-1b", "lora", "fp32", False, "sdpa"),
    ("llama-3.2-1b", "lora", "bf16", False, "eager"),
    ("qwen2.5-0.5b", "dora", "bf16", False, "sdpa"),
    ("qwen3-0.6b", "lora", "bf16", True, "eager"),
])
def test_on_cuda_the_meta_step_is_the_analytic_models_to_the_byte(preset: str, adapter: str, precision: str,
                                                                  checkpointing: bool, attn: str) -> None:
    """At the presets' real sizes (b3 x 1024, the batch past the two it measures): the same kernels' saved tensors
    as step_memory's formulas, which equal an H200's measured activations (tests/test_attribution.py)."""
    cell = _cell(ModelSpec(name=preset, preset=preset), adapter, precision, checkpointing, attn, batch=3, seq=1024)
    analytic = step_memory.activation_bytes(step_memory.step_shape(cell, "cuda"))
    assert meta_step.activation_bytes(cell, "cuda") == analytic


@pytest.mark.parametrize("name", ["phi3", "gemma2", "mixtral"])
def test_a_recomputed_layer_saves_what_a_further_layer_saves(name: str) -> None:
    """What a checkpointed layer holds again in backward: a real model's bytes with one layer more, less without
    (Gemma2's two kinds of layer alike with eager attention); on a model shorter than the pattern it measures too."""
    config = {**SMALL, **ARCHITECTURES[name]}
    saved = [saved_bytes(_cell(ModelSpec(name=name, config={**config, "num_hidden_layers": layers}), "lora", "bf16",
                               False, "eager" if name == "gemma2" else "sdpa")) for layers in (3, 4)]
    two_layers = _cell(ModelSpec(name=name, config={**config, "num_hidden_layers": 2}), "lora", "bf16", True,
                       "eager" if name == "gemma2" else "sdpa")
    assert meta_step.layer_bytes(two_layers, "cpu") == saved[1] - saved[0]
