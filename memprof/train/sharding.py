"""Sharding strategies: wrap one rank's model and optimizer (ddp, zero1, fsdp2), and predict what each rank holds.

Build side (inside a rank whose process group is up): ``shard``. Plan side (no process group, meta
tensors): ``local_shapes`` and ``zero1_partition`` reproduce the two partition rules exactly — FSDP2 splits every
parameter on dim 0 with ``torch.chunk`` (the last ranks may get fewer or no rows; the sharded parameter's storage
is padded to the full chunk), ZeroRedundancyOptimizer hands whole parameters, largest first, to the rank with
the fewest elements so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprof.train.fourbit import is_four_bit

if TYPE_CHECKING:
    from torch import nn

    from memprof.train.optim import Construct

def shard(model: nn.Module, strategy: str, device: torch.device) -> tuple[nn.Module, Construct | None]:
    """This rank's model for ``strategy`` (ddp, zero1 or fsdp2), and how its optimizer is to be made (None: as
    without sharding); the default process group must be initialised."""
    if strategy == "fsdp2":
        _fully_shard(model, device)
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, _zero1 if strategy == "zero1" else None


def _zero1(cls: type, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 as transformers' FSDP plugin applies it: each decoder layer its own unit, then the root.

    QLoRA: FSDP2 makes every parameter a DTensor, and a bitsandbytes ``Params4bit`` that becomes one loses its
    quant state. So the 4-bit base weights stay out of sharding (``ignored_params``: each rank holds them whole,
    at half a byte per weight) and the adapters shard. FSDP1 instead flattens a unit's parameters into one
    buffer, which is why QLoRA there needs ``bnb_4bit_quant_storage`` set to the adapters' dtype.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    four_bit = {p for p in model.parameters() if is_four_bit(p)} or None
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=four_bit)
    fully_shard(model, mesh=mesh, ignored_params=four_bit)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 makes units of: those transformers never splits (``_no_split_modules``, the decoder
    layers), found under a peft wrapper too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in kinds]


# --- plan side -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gathered:
    """What an FSDP2 rank all-gathers, in bytes: its root unit's own weights (embeddings, final norm, head: gathered
    at the first forward, resharded at the end of backward) and each decoder layer's (gathered while it works, the
    next one's all-gather issued before it is needed). 4-bit weights are never sharded (``_fully_shard``), so never
    gathered."""

    root: int = 0
    layers: tuple[int, ...] = ()

    def with_layers(self, n: int) -> int:
        """The root unit's weights and the ``n`` largest layers'."""
        return self.root + sum(sorted(self.layers, reverse=True)[:n])


def gathered(model: nn.Module) -> Gathered:
    """What an FSDP2 rank of ``model`` (on the meta device, or real) all-gathers."""

    def full(params: Iterable[nn.Parameter]) -> int:
        return sum(p.numel() * p.element_size() for p in params if not is_four_bit(p))

    layers = tuple(full(layer.parameters()) for layer in decoder_layers(model))
    return Gathered(full(model.parameters()) - sum(layers), layers)


def chunk_rows(rows: int, world_size: int) -> int:
    """Rows in each of ``torch.chunk``'s chunks: what FSDP2 pads every rank's shard to."""
    return math.ceil(rows / world_size) if rows else 0


def local_shapes(shape: Sequence[int], world_size: int) -> list[tuple[int, ...]]:
    """Each rank's FSDP2 shard of a parameter of ``shape`` (unpadded: the DTensor's local tensor)."""
    shape = tuple(shape)
    if not shape:
        return [shape] * world_size
    chunk = chunk_rows(shape[0], world_size)
    out = []
    for rank in range(world_size):
        rows = max(0, min(shape[0], (rank + 1) * chunk) - rank * chunk)
        out.append((rows, *shape[1:]))
    return out


def padded_shard_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements in every rank's padded FSDP2 shard of a parameter of ``shape``."""
    shape = tuple(shape)
    if not shape:
        return 1
    return chunk_rows(shape[0], world_size) * math.prod(shape[1:])


def zero1_partition(groups: Sequence[Sequence[int]], world_size: int) -> list[list[list[int]]]:
    """ZeroRedundancyOptimizer's partition: for each rank, for each param group, the indices (into that
    group) of the parameters it owns. ``groups`` gives each group's parameter element counts."""
    sizes = [0] * world_size
    out: list[list[list[int]]] = [[[] for _ in groups] for _ in range(world_size)]
    for g, numels in enumerate(groups):
        for i in sorted(range(len(numels)), key=lambda k: numels[k], reverse=True):  # stable, as sorted()
            rank = sizes.index(min(sizes))
            out[rank][g].append(i)
            sizes[rank] += numels[i]
    return out
