"""The measurements a cell and a user's own loop share: which sources to sample, and how the trackers' readings
become Record fields. ``memprof.run.worker`` (suites) and ``memprof.track`` (the Python API) both use these, so there is
one copy of the measurement."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memprof.results.record import StepLog, smoothed_final
from memprof.measure import accounting
from memprof.measure.allocator import CudaAllocator
from memprof.measure.host import HostBaseline, heap_free_bytes, high_water_bytes, rss_bytes
from memprof.measure.nvml import open_nvml
from memprof.measure.sampler import Sampler, Source

SAMPLE_INTERVAL_S = {"cpu": 0.01, "cuda": 0.05}  # the sampler's default, by device type (``sample_interval``)
NVML_PERIOD_S = 0.1  # NVML reads are driver round trips: at most ten a second (the allocator's peaks are exact anyway)
NVML_IDLE_S = 5.0  # and while the allocator's reserved bytes stand still, one every this many seconds


@dataclass
class MemorySources:
    """What to sample on a device, and the allocator tracker on CUDA."""

    device_name: str
    sources: list[Source] = field(default_factory=list)
    allocator: CudaAllocator | None = None


def memory_sources(device: torch.device) -> MemorySources:
    """Host RSS everywhere; on CUDA also the allocator's current figures and NVML's (when NVML answers).

    Each sample reads ``/proc/self/statm`` (26 µs on the H200's host) and on CUDA the allocator's counters (83 µs),
    which only fill the timeline (its peaks are exact). What NVML reports moves when the caching allocator reserves
    or frees a segment (rarely, after the first step), so it is read when the reserved bytes moved (at most every
    ``NVML_PERIOD_S``), else every ``NVML_IDLE_S`` for memory allocated outside PyTorch; the last sample, taken after
    training while the cache is still held, sees the highest figure of a run whose cache only grew.
    """
    rss = Source(("rss_bytes",), lambda: (rss_bytes(),))
    if device.type != "cuda":
        if heap_free_bytes() is None:
            return MemorySources("cpu", [rss])
        rss, rose = _rss_and_its_rises()  # glibc: its free heap where the peak can need it (``peak_values``)
        return MemorySources("cpu", [rss, Source(("heap_free_bytes",), lambda: (heap_free_bytes(),), due=rose,
                                                 each_phase=True)])
    allocator = CudaAllocator(device)
    out = MemorySources(torch.cuda.get_device_name(device), [rss, Source(("allocated_bytes", "reserved_bytes"),
                                                                         allocator.current)], allocator)
    nvml = open_nvml(device.index or 0, str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or ""))
    if nvml is not None:
        out.sources.append(Source(("nvml_device_used_bytes", "nvml_process_used_bytes"), nvml[0], NVML_PERIOD_S,
                                  _reserved_moved(allocator)))
    return out


def sample_interval(device: torch.device, asked: float | None = None) -> float:
    """The sampler's interval: ``asked``, else 10 ms on the CPU and 50 ms on CUDA. Each wake-up of the sampler's
    thread takes the GIL from the training thread, which a launch-bound GPU step cannot spare: over a loop of small
    torch ops the thread used 1.21% of a CPU at 10 ms and 0.38% at 50 ms (2-core Intel Xeon VM), a bound on the GIL
    it took (results/benchmarks/sampler_cost.md). On CUDA no peak depends on the interval (the allocator's are
    exact, NVML is read when they move, the kernel keeps the host's high-water mark); on the CPU the samples name
    the phase of the RSS peak."""
    return asked if asked is not None else SAMPLE_INTERVAL_S["cuda" if device.type == "cuda" else "cpu"]


def _reserved_moved(allocator: CudaAllocator) -> Callable[[], bool]:
    """True when the allocator's reserved bytes (as its source last read them) moved since this last answered True,
    or ``NVML_IDLE_S`` passed since then."""
    seen, at = -1, -math.inf

    def due() -> bool:
        nonlocal seen, at
        now = time.perf_counter()
        if allocator.last_reserved == seen and now - at < NVML_IDLE_S:
            return False
        seen, at = allocator.last_reserved, now
        return True

    return due


def _rss_and_its_rises() -> tuple[Source, Callable[[], bool]]:
    """The RSS source, and whether RSS rose past its highest since the last time that answered True. ``mallinfo2``
    walks every free chunk of every arena under its lock, which blocks the training threads' mallocs on a
    fragmented heap: the free heap is read when RSS climbs past its highest (early in a cell, then rarely) and when a
    phase begins, the readings the peak needs."""
    high, seen = -1, -1

    def read() -> tuple[int]:
        nonlocal high
        rss = rss_bytes()
        high = max(high, rss)
        return (rss,)

    def rose() -> bool:
        nonlocal seen
        risen, seen = high > seen, high
        return risen

    return Source(("rss_bytes",), read), rose


def exact_values(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Exact weight and optimizer-state bytes (whatever of the two exists)."""
    values: dict[str, Any] = {}
    if model is not None:
        weights = accounting.weight_bytes(model)
        values.update(total_params=weights.frozen_params + weights.trainable_params,
                      trainable_params=weights.trainable_params, frozen_weight_bytes=weights.frozen.total,
                      frozen_four_bit_bytes=weights.frozen_four_bit.total,
                      trainable_weight_bytes=weights.trainable.total, buffer_bytes=weights.buffers.total)
    if optimizer is not None:
        state = accounting.optimizer_state_bytes(optimizer)
        values.update(optimizer_state_bytes=state.total, optimizer_state_paged_bytes=state.paged,
                      optimizer_state_bytes_by_dtype=state.by_dtype)
    return values


def peak_values(sampler: Sampler, allocator: CudaAllocator | None, baseline: HostBaseline) -> dict[str, Any]:
    """Peaks from the allocator (exact), NVML (sampled) and the host (sampled, and the kernel's high-water mark where
    it rose during the measurement), and on CUDA the phase the peak fell in: the allocator's phase with the highest
    peak at the step it was split by phase (samples cannot tell: the loss's backward, often the peak, lasts a few
    milliseconds). With glibc, how much its free heap had grown over the baseline's (``heap_free_at_peak``): freed
    memory glibc kept, part of the RSS peak though no tensor holds it."""
    values: dict[str, Any] = {}
    if allocator is not None:
        peaks = allocator.peaks
        phases = peaks.phase_peak_allocated_bytes
        values.update(peak_allocated_bytes=peaks.peak_allocated_bytes, peak_reserved_bytes=peaks.peak_reserved_bytes,
                      num_alloc_retries=peaks.num_alloc_retries, num_ooms=peaks.num_ooms,
                      phase_peak_allocated_bytes=dict(phases),
                      peak_phase=max(phases, key=phases.__getitem__) if phases else "")
    values["nvml_peak_device_used_bytes"] = sampler.peaks.get("nvml_device_used_bytes")
    values["nvml_peak_process_used_bytes"] = sampler.peaks.get("nvml_process_used_bytes")
    high_water = high_water_bytes()
    peak_rss = max(sampler.peaks["rss_bytes"] or 0, high_water if high_water > baseline.high_water else 0)
    values.update(rss_baseline_bytes=baseline.rss, peak_rss_bytes=peak_rss,
                  peak_rss_delta_bytes=peak_rss - baseline.rss)
    heap = heap_free_at_peak(sampler.timeline)
    if baseline.heap_free is not None and heap is not None:
        values["heap_free_delta_bytes"] = heap - baseline.heap_free
    return values


def heap_free_at_peak(timeline: Sequence[dict[str, Any]]) -> int | None:
    """glibc's least free heap read in the step of the highest RSS sample (read as each phase begins and as RSS
    rises): memory it kept free through that step, so no moment of the step counts it alive. Read at the RSS high
    alone, it would also hold what the step freed before it, which the peak's moment counts alive: late in a
    backward, the activations it consumed (small-llama's eager full fine-tune: 139 MB free when its backward began,
    314 MB at its RSS high, and a remainder of -71 MB)."""
    sampled = [row for row in timeline if row.get("rss_bytes") is not None]
    if not sampled:
        return None
    step = max(sampled, key=lambda row: row["rss_bytes"])["step"]
    return min((row["heap_free_bytes"] for row in timeline
                if row["step"] == step and row.get("heap_free_bytes") is not None), default=None)


def step_summary(logs: Sequence[StepLog], warmup_steps: int, tokens_per_step: int | None,
                 losses: Sequence[float] | None = None) -> dict[str, Any]:
    """Loss and timing figures from the per-step logs; timing leaves out the warm-up steps. ``losses``: the losses
    that are known, in order, where some steps' are not (a Trainer logs one every ``logging_steps``); default every
    step's."""
    out: dict[str, Any] = {}
    losses = [log.loss for log in logs] if losses is None else list(losses)
    if losses:
        out["first_loss"] = losses[0]
        out["final_loss"] = losses[-1]
        out["final_loss_smoothed"] = smoothed_final(losses)
    if logs:
        out["train_s"] = sum(log.step_time_s for log in logs)
    measured = [log.step_time_s for log in logs[warmup_steps:]]
    if measured:
        median = statistics.median(measured)
        out["step_time_median_s"] = median
        out["step_time_p95_s"] = percentile(measured, 0.95)
        if tokens_per_step:
            out["tokens_per_s"] = tokens_per_step / median if median > 0 else math.nan
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
