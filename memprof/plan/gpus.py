"""GPU memory capacities for `memprof plan`: card names and generic sizes, in bytes.

Card figures are the total memory the driver reports for the card (``nvidia-smi``'s "MiB" column, as listed by
NVIDIA's data sheets and users' ``nvidia-smi`` output), which is a little less than the marketing size for some
cards. Generic sizes (``24GB``) mean that many GiB (``512MB``: MiB), a little more than the cards sold as that size
(an H100 80GB has 81,559 MiB = 79.6 GiB): `memprof plan` checks real cards by default. Nothing here was measured by
memprof.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memprof.errors import UserError
from memprof.results.env import memory_bytes

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

# one card per tier (24, 40, 48, 80, 141 GB), the smaller where two share one: a plan that fits it fits the tier
DEFAULT_CARDS = ("rtx-4090", "a100-40gb", "l40s", "h100-80gb", "h200")

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


def memory_size(text: str, where: str = "--gpu") -> Gpu:
    """A memory size to plan a CPU run against: a generic size or bytes, never a card.

    Raises:
        UserError: for a card's name, an unknown name or a size that is not positive.
    """
    if text.strip().lower() in CARDS:
        raise UserError(where, f"'{text}' is a GPU: a CPU plan checks against memory sizes (64GB, or bytes)")
    return parse_gpu(text, where)


def host_memory() -> Gpu:
    """This host's physical memory, what a CPU plan is checked against by default."""
    return Gpu("host RAM", memory_bytes())


def budget(name: str, capacity_bytes: int, where: str = "--budget-bytes") -> Gpu:
    """A plain memory budget.

    Raises:
        UserError: when ``capacity_bytes`` is not positive.
    """
    if capacity_bytes <= 0:
        raise UserError(where, f"a memory budget must be positive, got {capacity_bytes}")
    return Gpu(name, capacity_bytes)
