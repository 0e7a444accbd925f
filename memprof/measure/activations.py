"""Saved activations: the unique storages autograd keeps from forward for backward."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn

from memprof.measure.accounting import storage_key


class SavedActivations:
    """Counts the bytes autograd saves during the forward passes run inside the block and still holds when forward
    ends: at the block's end, or when backward first reads a saved tensor inside it (the block may span a whole step,
    as ``memprof.track``'s does).

    Parameters and buffers that autograd saves are not activations and are left out, FSDP2's all-gathered
    (unsharded) parameters too; every other storage is counted once, however many ops save it. Under gradient
    checkpointing the inputs each checkpointed layer keeps for its recomputation count as well: non-reentrant
    checkpointing holds them outside autograd's saved tensors. On the meta device (shapes, no memory) it counts the
    same storages, each known by its own object (``memprof.measure.meta_step``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._exclude = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self._saved: dict[tuple[str, int], tuple[int, int]] = {}  # storage key -> (StorageImpl, bytes)
        # weak references to the tensors saved from each storage: a storage whose tensors all died (a graph dropped
        # within forward, as DoRA's weight-norm branch is) gave its address back, and does not count
        self._refs: dict[tuple[str, int], list[weakref.ref[torch.Tensor]]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._patched: list[tuple[nn.Module, Any]] = []  # (layer, its own checkpoint function)
        self._open = False
        self._at_backward: int | None = None  # the bytes alive when backward began inside the block
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._count(t)
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        if self._open and self._at_backward is None:
            self._at_backward = self._alive_bytes()
        return t

    def _count(self, t: torch.Tensor) -> None:
        if isinstance(t, nn.Parameter) or self._at_backward is not None:
            return
        key, storage = storage_key(t), t.untyped_storage()
        refs = self._refs.get(key, [])
        # another storage at the address of one that died, or of one whose memory was freed under its live tensors
        # (FSDP2 frees a layer's all-gathered parameters after its forward, while autograd still holds views of them)
        moved_in = self._saved.get(key, (storage._cdata,))[0] != storage._cdata
        if refs and (moved_in or all(ref() is None for ref in refs)):
            self._saved.pop(key, None)
            refs = []
        self._refs[key] = [*refs, weakref.ref(t)]
        if key not in self._saved and key not in self._exclude:
            self._saved[key] = (storage._cdata, storage.nbytes())

    def _counting(self, checkpoint: Any) -> Any:
        def wrapped(function: Any, *args: Any, **kwargs: Any) -> Any:
            for value in [*args, *getattr(function, "keywords", {}).values()]:
                if isinstance(value, torch.Tensor):
                    self._count(value)
            return checkpoint(function, *args, **kwargs)
        return wrapped

    def __enter__(self) -> SavedActivations:
        for module in self.model.modules():
            if getattr(module, "gradient_checkpointing", False) and "_gradient_checkpointing_func" in vars(module):
                self._patched.append((module, module._gradient_checkpointing_func))
                module._gradient_checkpointing_func = self._counting(module._gradient_checkpointing_func)
        self._hooks.__enter__()
        self._open = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
        self._open = False
        for module, checkpoint in self._patched:
            module._gradient_checkpointing_func = checkpoint
        self.bytes = self._alive_bytes() if self._at_backward is None else self._at_backward
        self._refs.clear()

    def _alive_bytes(self) -> int:
        gathered = {p.untyped_storage()._cdata for p in _fsdp_unsharded_params(self.model)}
        return sum(nbytes for key, (impl, nbytes) in self._saved.items()
                   if impl not in gathered and any(ref() is not None for ref in self._refs[key]))


def _fsdp_unsharded_params(model: nn.Module) -> Iterator[torch.Tensor]:
    """FSDP2's unsharded parameters (views of its all-gather buffers); none for a model it does not shard."""
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if callable(state) else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            if hasattr(fsdp_param, "_unsharded_param"):
                yield fsdp_param._unsharded_param
