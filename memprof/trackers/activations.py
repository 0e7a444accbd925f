"""Saved activations: the unique storages autograd keeps from forward for backward."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from memprof.trackers.accounting import storage_key


class SavedActivations:
    """Counts the bytes autograd saves during the forward passes run inside the block.

    Parameters and buffers that autograd saves are not activations and are left out; every other storage is
    counted once, however many ops save it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._exclude = {storage_key(t) for t in [*model.parameters(), *model.buffers()]
                         if t.device.type != "meta"}
        self._seen: set[tuple[str, int]] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            key = storage_key(t)
            if key not in self._seen and key not in self._exclude:
                self._seen.add(key)
                self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._hooks.__exit__(exc_type, exc, tb)
