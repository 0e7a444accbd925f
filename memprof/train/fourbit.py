"""bitsandbytes 4-bit weights: telling them apart from other tensors."""

from __future__ import annotations

import torch


def is_four_bit(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``), told apart without importing bitsandbytes."""
    return type(p).__name__ == "Params4bit"
