"""GPU memory capacities for `memprof plan`: card names and generic sizes, in bytes.

Card figures are the total memory the driver reports for the card (``nvidia-smi``'s "MiB" column, as listed by
NVIDIA's data sheets and users' ``nvidia-smi`` output), which is a little less than the marketing size for some
cards. Generic sizes (``24GB``) mean that many GiB (``512MB``: MiB). Nothing here was measured by memprof.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprof.errors import UserError

MIB = 1 << 20
GIB = 1 << 30

CARDS: dict[str, int] = {
    "rtx-3090": 24576 * MIB,
    "rtx-4090": 24564 * MIB,
    "a10g": 23028 * MIB,
    "l4": 23034 * MIB,
    "a6000": 49140 * MIB,
    "l40s": 46068 * MIB,
    "a100-40gb": 40960 * MIB,
    "a100-80gb": 81920 * MIB,
    "h100-80gb": 81559 * MIB,
    "h200": 143771 * MIB,
}

_GENERIC = re.compile(r"^(\d+(?:\.\d+)?)\s*([gm])i?b$")


@dataclass(frozen=True)
class Gpu:
    """A memory budget to plan against: a card, a generic size, or a byte count."""

    name: str
    capacity_bytes: int


def parse_gpu(text: str, where: str = "--gpu") -> Gpu:
    """A card name (``rtx-4090``), a generic size (``24GB`` = 24 GiB, ``512MiB``) or a plain byte count.

    Raises:
        UserError: for an unknown name or a capacity that is not positive.
    """
    key = text.strip().lower()
    if key in CARDS:
        return Gpu(key, CARDS[key])
    generic = _GENERIC.match(key)
    if generic:
        unit = MIB if generic.group(2) == "m" else GIB
        return budget(text, int(float(generic.group(1)) * unit), where)
    if key.isdigit():
        return budget(text, int(key), where)
    raise UserError(where, f"not a GPU or a size: '{text}' (cards: {', '.join(CARDS)}; or a size such as 24GB, "
                    "40GB, 48GB, 80GB, 141GB, 512MiB, or bytes)")


def budget(name: str, capacity_bytes: int, where: str = "--budget-bytes") -> Gpu:
    """A plain memory budget.

    Raises:
        UserError: when ``capacity_bytes`` is not positive.
    """
    if capacity_bytes <= 0:
        raise UserError(where, f"a memory budget must be positive, got {capacity_bytes}")
    return Gpu(name, capacity_bytes)
