"""Exact tensor accounting: bytes of weights, gradients and optimizer state, each storage counted once."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ByteCount:
    """Bytes of a set of tensors, counted by unique storage, with per-dtype and paged splits."""

    total: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    paged: int = 0
    tensors: int = 0


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a DTensor's (FSDP2's sharded parameters, gradients and optimizer
    state) local shard; any other tensor as it is."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer holding this rank's state: ZeroRedundancyOptimizer's wrapped local one, else itself."""
    inner = getattr(optimizer, "optim", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Which storage ``t`` views: its device and address (a meta storage has none: its own object's)."""
    storage = local(t).untyped_storage()
    return (str(t.device), storage._cdata if t.device.type == "meta" else storage.data_ptr())


def count_bytes(tensors: Iterable[torch.Tensor], exclude: set[tuple[str, int]] | None = None) -> ByteCount:
    """Sum the storages behind ``tensors``, each once; views and shared tensors do not double count."""
    seen: set[tuple[str, int]] = set(exclude or ())
    out = ByteCount()
    for t in map(local, tensors):
        if t.device.type == "meta":
            key = ("meta", id(t))
            nbytes = t.numel() * t.element_size()
        else:
            key = storage_key(t)
            nbytes = t.untyped_storage().nbytes()
        if key in seen:
            continue
        seen.add(key)
        out.total += nbytes
        out.tensors += 1
        dtype = str(t.dtype).removeprefix("torch.")
        out.by_dtype[dtype] = out.by_dtype.get(dtype, 0) + nbytes
        if getattr(t, "is_paged", False):
            out.paged += nbytes
    return out


# Plain objects that optimizers keep in their state and that hold tensors: GaLore's and APOLLO's projectors.
_TENSOR_HOLDERS = {"GaLoreProjector", "GradientProjector"}


def walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples, bitsandbytes quant states, low-rank projectors and
    tensor subclasses (torchao's low-bit states own no storage: their codes, scales and qmaps do)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                yield from walk_tensors(getattr(obj, name))
        else:
            yield obj
    elif type(obj).__name__ in _TENSOR_HOLDERS:
        yield from walk_tensors(vars(obj))
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from walk_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from walk_tensors(value)
    elif type(obj).__name__ == "QuantState":
        # bitsandbytes 4-bit: absmax, code, offset and, with double quantisation, a nested state
        yield from walk_tensors({k: v for k, v in vars(obj).items() if k != "state2"})
        if getattr(obj, "state2", None) is not None:
            yield from walk_tensors(obj.state2)


def _with_quant_state(p: torch.Tensor) -> Iterator[torch.Tensor]:
    yield p
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        yield from walk_tensors(quant_state)


@dataclass(frozen=True)
class WeightBytes:
    """A model's parameters split into what trains and what stays frozen; ``frozen_four_bit`` is the part of
    ``frozen`` that bitsandbytes quantised (with its quant state)."""

    frozen: ByteCount
    trainable: ByteCount
    frozen_params: int
    trainable_params: int
    buffers: ByteCount
    frozen_four_bit: ByteCount


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Frozen weights (4-bit weights with their quant state), trainable weights and buffers, exactly.

    Element counts are logical parameters: a packed 4-bit weight counts the elements it stands for.
    """
    four_bit, frozen, trainable = [], [], []
    n_frozen = n_trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable.append(p)
            n_trainable += p.numel()
        else:
            (four_bit if getattr(p, "quant_state", None) is not None else frozen).extend(_with_quant_state(p))
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            n_frozen += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    params = count_bytes(trainable)
    taken = {storage_key(t) for t in trainable if t.device.type != "meta"}
    four_bit_count = count_bytes(four_bit, exclude=taken)
    frozen_count = count_bytes([*four_bit, *frozen], exclude=taken)
    taken |= {storage_key(t) for t in [*four_bit, *frozen] if t.device.type != "meta"}
    buffers = count_bytes(model.buffers(), exclude=taken)
    return WeightBytes(frozen_count, params, n_frozen, n_trainable, buffers, four_bit_count)


def gradient_bytes(model: nn.Module) -> ByteCount:
    """Gradients of the parameters, each storage once (a rank's shards under FSDP2)."""
    return count_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> ByteCount:
    """Every tensor the optimizer keeps in ``state`` (moments, step counters, quantisation maps and absmax),
    each storage once; paged (bitsandbytes managed-memory) bytes are also reported apart. GrokAdamW keeps its
    moments in ``param_groups[i]["state"]`` instead of ``optimizer.state``: those count too."""
    optimizer = local_optimizer(optimizer)
    hidden = [group["state"] for group in optimizer.param_groups if isinstance(group.get("state"), dict)]
    return count_bytes(walk_tensors([*optimizer.state.values(), *hidden]))
