"""The PyTorch CUDA caching allocator: exact peaks, per phase and over the whole block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType

import torch


@dataclass
class AllocatorPeaks:
    peak_allocated_bytes: int = 0
    peak_reserved_bytes: int = 0
    peak_active_bytes: int = 0
    num_alloc_retries: int = 0
    num_ooms: int = 0
    inactive_split_bytes: int = 0
    phase_peak_allocated_bytes: dict[str, int] = field(default_factory=dict)


class CudaAllocator:
    """Tracks allocator peaks on ``device`` for the block; ``phase(name)`` splits them by phase.

    Peak statistics are reset on entry and at phase boundaries (the caller asked for exactly that by using
    this tracker); the whole-block peak is the maximum over the segments, so nothing is lost by the resets.
    The figures are read in ``finally`` so a cell that dies of OOM still reports the peak it reached.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks = AllocatorPeaks()
        self.last_reserved = 0  # what ``current`` last read

    def __enter__(self) -> CudaAllocator:
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._fold()

    def _fold(self) -> dict[str, int]:
        stats = torch.cuda.memory_stats(self.device)
        p = self.peaks
        p.peak_allocated_bytes = max(p.peak_allocated_bytes, stats.get("allocated_bytes.all.peak", 0))
        p.peak_reserved_bytes = max(p.peak_reserved_bytes, stats.get("reserved_bytes.all.peak", 0))
        p.peak_active_bytes = max(p.peak_active_bytes, stats.get("active_bytes.all.peak", 0))
        p.num_alloc_retries = stats.get("num_alloc_retries", 0)
        p.num_ooms = stats.get("num_ooms", 0)
        p.inactive_split_bytes = max(p.inactive_split_bytes, stats.get("inactive_split_bytes.all.current", 0))
        return stats

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._fold()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            stats = self._fold()
            peak = stats.get("allocated_bytes.all.peak", 0)
            phases = self.peaks.phase_peak_allocated_bytes
            phases[name] = max(phases.get(name, 0), peak)

    def current(self) -> tuple[int, int]:
        """(allocated, reserved) bytes now, from one read of the allocator's counters.

        The sampler calls this every interval while the training thread waits for the GIL:
        ``torch.cuda.memory_allocated`` and ``memory_reserved`` would each flatten all ~140 of ``memory_stats``'
        figures in Python, where the nested dict is built in C++ once. Before CUDA is initialised: (0, 0).
        """
        stats = torch.cuda.memory_stats_as_nested_dict(self.device)
        if not stats:
            return 0, 0
        self.last_reserved = stats["reserved_bytes"]["all"]["current"]
        return stats["allocated_bytes"]["all"]["current"], self.last_reserved
