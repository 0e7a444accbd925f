"""A live model and optimizer described as a ``CellConfig``: what ``memprof.track`` and the Trainer callback
record, so that two runs of different configurations never share a key or a hash.

The model is its transformers config; the adapter its peft config (every field that differs from peft's
defaults); the optimizer what it was asked for (a Trainer's ``args.optim`` and ``optim_args``) or, without that, its
class path and the defaults it was built with.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from memprof.config.spec import (LORA_DEFAULTS, AdapterSpec, Budget, CellConfig, Levers, ModelSpec, OptimizerSpec,
                                 ParallelSpec, QuantSpec, ShapeSpec, TrainingSpec)
from memprof.train.fourbit import is_four_bit

PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Bookkeeping in a peft or transformers config that says nothing about what trains or how much memory it takes.
_PEFT_BOOKKEEPING = {"base_model_name_or_path", "revision", "peft_type", "inference_mode", "auto_mapping",
                     "peft_version"}
_CONFIG_BOOKKEEPING = {"transformers_version", "use_cache", "architectures", "dtype", "torch_dtype"}


def describe(model: nn.Module, optimizer: torch.optim.Optimizer, *, suite: str, batch_size: int, seq_len: int,
             grad_accum: int, steps: int, warmup_steps: int, optimizer_spec: OptimizerSpec | None = None) -> CellConfig:
    """The configuration a tracked loop ran (``batch_size`` and ``seq_len`` 0: it was not told them); a model inside
    DistributedDataParallel or torch.compile is described as itself, under the parallel strategy it runs."""
    first = next(model.parameters())
    model, parallel = _unwrapped(model, optimizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lr = optimizer.defaults.get("lr")  # None: it sets its own step (Adafactor's relative step), as its kwargs say
    return CellConfig(
        suite=suite, model=_model(base), adapter=_adapter(model, base),
        optimizer=optimizer_spec or optimizer_of(optimizer),
        shape=ShapeSpec(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                        precision=_precision(base, first)),
        levers=Levers(gradient_checkpointing="on" if _checkpointing(base) else "off",
                      attn_implementation=_attention(base), parallel=parallel),
        training=TrainingSpec(lr=1e-3 if lr is None else float(lr), schedule="external", steps=steps,
                              warmup_steps=warmup_steps),
        budget=Budget(device=str(first.device)))


def _unwrapped(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, ParallelSpec]:
    """The model inside DistributedDataParallel's and torch.compile's wrappers, and how its ranks share the work:
    ddp (a DistributedDataParallel), zero1 (with a ZeroRedundancyOptimizer), fsdp2 (``fully_shard``)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.optim import ZeroRedundancyOptimizer

    strategy = "fsdp2" if isinstance(model, FSDPModule) else "none"
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model, strategy = model.module, "zero1" if isinstance(optimizer, ZeroRedundancyOptimizer) else "ddp"
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return model, ParallelSpec(strategy=strategy, world_size=world) if strategy != "none" else ParallelSpec()


def optimizer_of(optimizer: torch.optim.Optimizer) -> OptimizerSpec:
    """An optimizer nobody named: its class path, with the defaults it was built with as its settings."""
    cls = type(optimizer)
    return OptimizerSpec(label=cls.__name__, name=f"{cls.__module__}:{cls.__qualname__}",
                         kwargs=plain(dict(optimizer.defaults)))


def plain(value: Any) -> Any:
    """``value`` as JSON data (tuples as lists, dtypes and other objects as their text)."""
    return json.loads(json.dumps(value, default=str))


def _model(base: nn.Module) -> ModelSpec:
    config = getattr(base, "config", None)
    if not hasattr(config, "to_diff_dict"):  # no transformers config (a plain module, nanoGPT's dataclass...)
        return ModelSpec(name=type(base).__name__)
    values = {k: v for k, v in config.to_diff_dict().items()
              if not k.startswith("_") and k not in _CONFIG_BOOKKEEPING}
    name = getattr(config, "name_or_path", "") or config.model_type
    return ModelSpec(name=name, config=plain({**values, "model_type": config.model_type}))


def _adapter(model: nn.Module, base: nn.Module) -> AdapterSpec:
    """The active peft adapter (the first, where several are), whatever its name: a peft model's, or one added to a
    transformers model (whose ``active_adapters`` is a method)."""
    configs = getattr(model, "peft_config", None) or {}
    active = getattr(model, "active_adapters", [])
    active = (active() if callable(active) else active) if configs else []
    config = configs.get(active[0]) if active else None
    if config is None:
        return AdapterSpec(name="none", kind="none", lora={})
    four_bit = [m for m in base.modules() if is_four_bit(getattr(m, "weight", None))]
    defaults = type(config)().to_dict()
    # every field that differs from peft's defaults, and always the ones memprof reads (whose defaults differ)
    fields = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()
              if k not in _PEFT_BOOKKEEPING and (defaults.get(k) != v or k in LORA_DEFAULTS)}
    name = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if name != "lora":  # another peft method: its own fields, under its own name
        return AdapterSpec(name=name, kind="none", lora=plain(fields))
    kind = "dora" if config.use_dora else "qlora" if four_bit else "lora"
    fields.pop("use_dora", None)
    quant = QuantSpec()
    if four_bit:
        weight, layer = four_bit[0].weight, four_bit[0]
        quant = QuantSpec(quant_type=weight.quant_type, double_quant=bool(weight.compress_statistics),
                          compute_dtype=str(layer.compute_dtype or torch.float32).removeprefix("torch."))
    return AdapterSpec(name=kind, kind=kind, lora=plain(fields), quant=quant)


def _precision(base: nn.Module, first: torch.Tensor) -> str:
    dtype = getattr(getattr(base, "config", None), "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else first.dtype
    return PRECISION_NAMES.get(dtype, "fp32")


def _attention(base: nn.Module) -> str:
    name = getattr(getattr(base, "config", None), "_attn_implementation", None) or "sdpa"
    return name if name in ("eager", "sdpa", "flash_attention_2") else "sdpa"


def _checkpointing(model: nn.Module) -> bool:
    """transformers 5 names it ``is_activation_checkpointing`` (the old name warns); older ones the old name."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
