"""memprof: optimizer-state memory profiler and benchmark harness for LLM fine-tuning.

The public Python API (the CLI is separate and built on the same pieces):

- :func:`track` — measure your own training loop; writes a results folder like ``memprof run``.
- :class:`MemprofCallback` (``memprof.api.trainer``) — the same for ``transformers.Trainer`` and its subclasses.
- :func:`optimizer_state_bytes` — exact bytes an optimizer keeps in its state.
- :func:`weight_bytes` — a model's parameters split into frozen (4-bit with quant state) and trainable bytes.

Heavy libraries are imported on first use, so ``import memprof`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memprof.quiet import quiet_libraries

quiet_libraries()
__version__ = "0.1.0"
__all__ = ["MemprofCallback", "Tracking", "optimizer_state_bytes", "track", "weight_bytes"]

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memprof.api.trainer import MemprofCallback
    from memprof.api.track import Tracking, track
    from memprof.measure.accounting import WeightBytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in ``optimizer.state``, each storage counted once."""
    from memprof.measure import accounting

    return accounting.optimizer_state_bytes(optimizer).total


def weight_bytes(model: nn.Module) -> WeightBytes:
    """Frozen (quantised weights with their quant state), trainable and buffer bytes of ``model``, exactly."""
    from memprof.measure import accounting

    return accounting.weight_bytes(model)


def __getattr__(name: str) -> Any:
    if name in ("track", "Tracking"):
        import importlib

        return getattr(importlib.import_module("memprof.api.track"), name)
    if name == "MemprofCallback":
        from memprof.api.trainer import MemprofCallback

        return MemprofCallback
    raise AttributeError(f"module 'memprof' has no attribute {name!r}")
