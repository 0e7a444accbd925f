"""On the CPU, freed memory glibc's malloc keeps is part of the RSS peak: read through the peak's step (mallinfo2)
and named in the breakdown instead of being left in the unnamed remainder."""

from __future__ import annotations

import ctypes
import ctypes.util
import csv
from pathlib import Path

import pytest

from memprof.measure.host import heap_free_bytes
from memprof.results.store import read_records

needs_glibc = pytest.mark.skipif(heap_free_bytes() is None, reason="no glibc mallinfo2 here")


@needs_glibc
def test_blocks_freed_below_a_live_one_stay_in_glibcs_free_heap() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(1024) for _ in range(10_000)]
    sentinel = libc.malloc(1024)  # above them: the heap's top cannot be trimmed, so freed blocks stay in the arena
    before = heap_free_bytes()
    for block in blocks:
        libc.free(block)
    grown = heap_free_bytes() - before
    libc.free(sentinel)
    assert 10_000 * 1024 <= grown <= 10_000 * 1024 * 1.2  # each block and its 16-byte header, nothing else


@needs_glibc
def test_a_cpu_cell_names_the_free_heap_at_its_peak(quick_run: Path) -> None:
    """Every cell of the quick suite's run (``memprof run``, each in its own worker)."""
    records = read_records(quick_run)
    assert records
    for record in records:
        assert record.heap_free_delta_bytes is not None
        parts = record.breakdown
        assert parts.get("heap_free", 0) == max(record.heap_free_delta_bytes, 0)
        assert sum(parts.values()) == record.peak_rss_delta_bytes  # the remainder is what the named parts leave
        with open(quick_run / "cells" / f"{record.config.index:04d}" / "timeline.csv") as f:
            rows = list(csv.DictReader(f))
        step = max((row for row in rows if row["rss_bytes"]), key=lambda row: int(row["rss_bytes"]))["step"]
        heap = [int(row["heap_free_bytes"]) for row in rows if row["step"] == step and row["heap_free_bytes"]]
        # training frees what it made (activations, gradients of the loss), and glibc keeps some: its free heap grew
        # through the step of the highest RSS sample, from a baseline taken before the sampler started
        assert len(heap) >= 3  # read as each phase of the step began, at least
        assert 0 < record.heap_free_delta_bytes <= min(heap)
