"""Attribution at the peak: the measured peak split into the exactly known parts and what remains.

Every part is reported, the remainder included, so nothing is silently folded away:
- known: frozen weights, trainable (adapter) weights, buffers, gradients, optimizer state, saved activations;
- ``other``: peak minus the known parts (temporaries and workspaces, minus any overlap: gradients and
  activations are not all alive at the same instant, so it can be negative and is kept signed);
- on CUDA, ``allocator_cache``: reserved minus allocated at the peak; ``non_pytorch``: NVML's figure for this
  process (the device's when the driver cannot name our process) minus reserved: the CUDA context, cuBLAS
  workspaces, and bitsandbytes' paged (managed) optimizer state, which the torch allocator never sees.
On the CPU the peak is the growth of resident memory over the worker's baseline, which also holds library pages
touched for the first time; the remainder says how much.
"""

from __future__ import annotations

from dataclasses import replace

from memprof.results.record import Record

KNOWN_PARTS = ("frozen_weight_bytes", "trainable_weight_bytes", "buffer_bytes", "gradient_bytes",
               "optimizer_state_bytes", "activation_bytes")


def attribute(record: Record) -> Record:
    """The record with ``attributed_*`` fields filled in where the figures exist."""
    parts = [getattr(record, name) for name in KNOWN_PARTS]
    if any(p is None for p in parts):
        return record
    known = sum(parts)
    values: dict[str, int | None] = {}
    if record.peak_allocated_bytes is not None:
        # paged state is CUDA managed memory outside the torch allocator: not part of its peak
        values["attributed_other_bytes"] = record.peak_allocated_bytes - (known - (record.optimizer_state_paged_bytes
                                                                                   or 0))
        values["allocator_cache_bytes"] = record.peak_reserved_bytes - record.peak_allocated_bytes
        nvml = record.nvml_peak_process_used_bytes or record.nvml_peak_device_used_bytes
        if nvml is not None:
            values["non_pytorch_bytes"] = nvml - record.peak_reserved_bytes
    elif record.peak_rss_delta_bytes is not None:
        values["attributed_other_bytes"] = record.peak_rss_delta_bytes - known
    return replace(record, **values)
