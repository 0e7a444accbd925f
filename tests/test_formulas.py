"""Every catalogue formula against the real optimizer: measured optimizer-state bytes == predicted, byte for byte.

Each case builds a tiny Llama (LoRA or full fine-tune) with memprof's own builders, takes two real training
steps and compares ``accounting.optimizer_state_bytes`` with ``memprof.measure.formulas``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from memprof.config.catalogue import CATALOGUE
from memprof.measure.formulas import predict_for_optimizer, predict_state_bytes, why_unpredictable
from memprof.train.models import build_model
from memprof.train.optim import build_optimizer, is_schedule_free
from memprof.config.spec import AdapterSpec, ModelSpec
from memprof.suite.schema import AdapterTable
from memprof.measure.accounting import optimizer_state_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
# intermediate 700: LoRA matrices of 11200 elements, which fill no whole number of 256-element blocks
MODEL = ModelSpec(name="tiny-llama-700", preset="tiny-llama", overrides={"intermediate_size": 700})
ADAPTERS = {"lora": AdapterTable(kind="lora", r=16, target_modules="all-linear").to_spec("lora"),
            "full": AdapterTable(kind="none").to_spec("full")}
# torchao compiles its update once per parameter shape: on the CPU that is seconds a shape, so its cases use
# few shapes that still reach every branch (quantised, < 4096 elements, >= 4096 but not whole blocks).
TORCHAO_MODELS = {"lora": MODEL,
                  "full": ModelSpec(name="tiny-llama-256", preset="tiny-llama",
                                    overrides={"intermediate_size": 256, "num_key_value_heads": 4})}
TORCHAO_ADAPTERS = {"lora": AdapterTable(kind="lora", r=16, target_modules=["q_proj", "up_proj"]).to_spec("lora"),
                    "full": ADAPTERS["full"]}
# Optimizers whose formula needs the param groups (projected groups, per-name groups), not just shapes.
GROUPED = {"galore_adamw", "galore_adafactor", "apollo_adamw", "adam_mini"}
_PAGED_ON_CPU = ("bitsandbytes' AdEMAMix pages buffers of >= 1e5 elements even on the CPU, where paging is missing "
                 "(test_paged_ademamix_on_the_cpu_fails_for_large_params)")
LIBRARY_LIMITS = {
    ("adam_mini", "lora"): "Adam-mini views q/k_proj params as heads of hidden**2/n_heads elements; a LoRA "
                           "matrix is smaller, and Adam-mini fails on it (RuntimeError)",
    ("paged_ademamix_8bit", "full"): _PAGED_ON_CPU,
    ("paged_ademamix_32bit", "full"): _PAGED_ON_CPU,
}



def train(name: str, adapter: str, kwargs: dict[str, Any] | None = None, precision: str = "fp32",
          model_spec: ModelSpec = MODEL, adapter_spec: AdapterSpec | None = None,
          steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny model and its optimizer after ``steps`` real training steps."""
    torch.manual_seed(0)
    model = build_model(model_spec, adapter_spec or ADAPTERS[adapter], precision, CPU)
    optimizer = build_optimizer(name, kwargs or {}, 1e-3, model, CPU)
    if is_schedule_free(optimizer):
        optimizer.train()
    batch = torch.randint(0, 256, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged-on-CPU fallbacks, GrokAdamW's deprecated autocast
        for _ in range(steps):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model, optimizer


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def skip_reason(name: str, adapter: str) -> str | None:
    entry = CATALOGUE[name]
    if not entry.installed:
        return f"{entry.library} is not installed (pip install {entry.install or entry.requires})"
    if entry.needs_cuda:
        return "needs CUDA"
    return why_unpredictable(name) or LIBRARY_LIMITS.get((name, adapter))


@pytest.mark.parametrize("adapter", ["lora", "full"])
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_formula_matches_measured_state_bytes(name: str, adapter: str) -> None:
    reason = skip_reason(name, adapter)
    if reason:
        pytest.skip(reason)
    torchao = CATALOGUE[name].library == "torchao"
    model, optimizer = train(name, adapter, model_spec=TORCHAO_MODELS[adapter] if torchao else MODEL,
                             adapter_spec=TORCHAO_ADAPTERS[adapter] if torchao else None)
    measured = optimizer_state_bytes(optimizer).total
    assert measured > 0 or name == "sgd"
    assert predict_for_optimizer(name, optimizer) == measured
    if name not in GROUPED:  # from shapes and dtypes alone, with the defaults transformers builds it with
        shapes = [(tuple(p.shape), p.dtype) for p in trainable(model)]
        assert predict_state_bytes(name, shapes, {}) == measured


@pytest.mark.parametrize("name", ["adamw_torch", "adafactor", "torch_adafactor", "came", "stable_adamw",
                                  "ademamix_8bit", "lion_8bit", "galore_adamw", "galore_adafactor", "apollo_adamw",
                                  "grokadamw", "schedule_free_adamw"])
def test_formula_follows_bf16_params(name: str) -> None:
    """16-bit params: fp32 upcasts (Adafactor, CAME), Kahan buffers (StableAdamW), fp32 bitsandbytes state,
    rank-sized projector copies instead of SVD views (GaLore)."""
    reason = skip_reason(name, "lora")
    if reason:
        pytest.skip(reason)
    _, optimizer = train(name, "lora", precision="bf16")
    assert predict_for_optimizer(name, optimizer) == optimizer_state_bytes(optimizer).total


@pytest.mark.parametrize(("name", "kwargs"), [
    ("adamw_torch", {"amsgrad": True}),
    ("sgd", {"momentum": 0.9}),
    ("rmsprop", {"momentum": 0.9, "centered": True}),
    ("adafactor", {"beta1": 0.9}),
    ("adamw_bnb_8bit", {"min_8bit_size": 16384}),
    ("lion_8bit", {"min_8bit_size": 1}),
    ("galore_adamw", {"rank": 4}),
    ("galore_adamw", {"rank": 4, "proj_type": "reverse_std"}),
    ("apollo_adamw", {"rank": 4, "proj_type": "reverse_std", "scale_type": "tensor"}),  # channel: std only
    ("stable_adamw", {"kahan_sum": False}),
])
def test_formula_follows_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    reason = skip_reason(name, "lora")
    if reason:
        pytest.skip(reason)
    _, optimizer = train(name, "lora", kwargs)
    assert predict_for_optimizer(name, optimizer) == optimizer_state_bytes(optimizer).total


def test_adamw_is_eight_bytes_an_element_and_a_float32_step_per_tensor() -> None:
    model, optimizer = train("adamw_torch", "lora")
    params = trainable(model)
    state = optimizer_state_bytes(optimizer)
    assert state.total == 8 * sum(p.numel() for p in params) + 4 * len(params)
    assert state.tensors == 3 * len(params)
    assert all(s["step"].dtype == torch.float32 and s["step"].device == CPU for s in optimizer.state.values())


def test_bnb_8bit_layout() -> None:
    """uint8 moments, one fp32 absmax per started 256-block, fp32 state below 4096 elements, and the two qmaps
    (256 fp32 codes each) shared by every quantised parameter."""
    model, optimizer = train("adamw_bnb_8bit", "lora")
    params = trainable(model)
    small = [p for p in params if p.numel() < 4096]
    big = [p for p in params if p.numel() >= 4096]
    assert small and big and any(p.numel() % 256 for p in big)
    for p in big:
        s = optimizer.state[p]
        assert s["state1"].dtype == s["state2"].dtype == torch.uint8 and s["state1"].shape == p.shape
        assert s["absmax1"].shape == s["absmax2"].shape == (math.ceil(p.numel() / 256),)
        assert s["qmap1"] is optimizer.state[big[0]]["qmap1"] and s["qmap1"].shape == (256,)
    for p in small:
        assert optimizer.state[p]["state1"].dtype == torch.float32 and "absmax1" not in optimizer.state[p]
    state = optimizer_state_bytes(optimizer)
    blocks = sum(math.ceil(p.numel() / 256) for p in big)
    assert state.by_dtype == {"uint8": 2 * sum(p.numel() for p in big),
                              "float32": 8 * sum(p.numel() for p in small) + 8 * blocks + 2 * 256 * 4}


def test_paged_ademamix_on_the_cpu_fails_for_large_params() -> None:
    """Other paged optimizers fall back to ordinary buffers on the CPU; AdEMAMix's (2, *shape) buffer does not."""
    with pytest.raises(RuntimeError, match="cget_managed_ptr"):
        train("paged_ademamix_32bit", "full", steps=1)


def test_unknown_or_unpredictable_names_give_none() -> None:
    shapes = [((64, 64), torch.float32)]
    assert predict_state_bytes("no_such_optimizer", shapes) is None
    assert predict_state_bytes("galore_adamw_8bit", shapes) is None
    assert "CUDA" in why_unpredictable("galore_adamw_8bit")
    assert why_unpredictable("adamw_torch") is None
