"""Run one cell: build → warm up → measured steps → Record. Every fault becomes a field of the Record."""

from __future__ import annotations

import math
import resource
import socket
import statistics
import time
import traceback
from contextlib import ExitStack
from typing import Any

import torch

from memprof.attribution import attribute
from memprof.cell import Cell
from memprof.record import CellResult, Record, Status, smoothed_final
from memprof.trackers.host import rss_bytes


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def run_cell(cell: Cell, sample_interval_s: float = 0.01) -> CellResult:
    """Build the cell's model and optimizer, train it, and measure everything on the way.

    Never raises for a fault inside the cell (OOM, divergence, a library error, Ctrl-C): those are the
    Record's ``status``.
    """
    from memprof import data, models, optim
    from memprof.probe import CellProbe
    from memprof.trackers import accounting
    from memprof.trackers.cuda import CudaAllocator
    from memprof.trackers.nvml import open_nvml
    from memprof.trackers.sampler import Sampler
    from memprof.train import Diverged, train

    t_start = time.perf_counter()
    device = resolve_device(cell.device)
    torch.manual_seed(cell.seed)
    values: dict[str, Any] = {"host": socket.gethostname(), "device": str(device), "rss_baseline_bytes": rss_bytes()}
    sources: dict[str, Any] = {"rss_bytes": rss_bytes}
    allocator = None
    if device.type == "cuda":
        allocator = CudaAllocator(device)
        values["device_name"] = torch.cuda.get_device_name(device)
        sources["allocated_bytes"] = lambda: torch.cuda.memory_allocated(device)
        sources["reserved_bytes"] = lambda: torch.cuda.memory_reserved(device)
        nvml = open_nvml(device.index or 0)
        if nvml is not None:
            sources["nvml_device_used_bytes"], sources["nvml_process_used_bytes"], _ = nvml
    else:
        values["device_name"] = "cpu"

    status, model, optimizer, probe = Status.OK, None, None, None
    sampler = Sampler(sources, sample_interval_s)
    with ExitStack() as stack:
        stack.enter_context(sampler)
        if allocator is not None:
            stack.enter_context(allocator)
        try:
            model = models.build_model(cell.model_spec, cell.adapter_spec, cell.precision, device)
            optimizer = optim.build_optimizer(cell.optim, cell.optim_kwargs, cell.lr, model, device)
            scheduler = optim.build_schedule(cell.schedule, optimizer, cell.lr_warmup_steps, cell.steps)
            if optim.is_schedule_free(optimizer):
                optimizer.train()
            corpus = data.load_corpus(cell.data_spec, cell.seed)
            batches = data.batches(corpus.train, cell.batch_size, cell.seq_len, cell.seed)
            probe = CellProbe(model, sampler, allocator, snapshot_step=max(cell.warmup_steps - 1, 0))
            values["setup_s"] = time.perf_counter() - t_start
            train(model, optimizer, scheduler, batches, cell.steps, cell.grad_accum, cell.max_grad_norm, device,
                  probe)
        except Diverged as err:
            status, values["error"], values["fail_step"] = Status.DIVERGED, str(err), err.step
        except optim.OptimizerUnavailable as err:
            status, values["error"] = Status.UNAVAILABLE, str(err)
        except KeyboardInterrupt:
            status, values["error"] = Status.INTERRUPTED, "interrupted"
        except Exception as err:  # noqa: BLE001 - any library error is this cell's result
            status = Status.OOM if is_oom(err) else Status.CRASHED
            values["error"] = _one_line(err)
            if status is Status.CRASHED:
                values["traceback"] = traceback.format_exc()
        if status is not Status.OK and status is not Status.UNAVAILABLE and probe is not None:
            values["fail_phase"], step = probe.where
            values.setdefault("fail_step", step if step >= 0 else None)
        elif probe is None and status in (Status.OOM, Status.CRASHED):
            values["fail_phase"] = "setup"

    if model is not None:
        weights = accounting.weight_bytes(model)
        values.update(total_params=weights.frozen_params + weights.trainable_params,
                      trainable_params=weights.trainable_params, frozen_weight_bytes=weights.frozen.total,
                      trainable_weight_bytes=weights.trainable.total, buffer_bytes=weights.buffers.total)
    if optimizer is not None:
        state = accounting.optimizer_state_bytes(optimizer)
        values.update(optimizer_state_bytes=state.total, optimizer_state_paged_bytes=state.paged,
                      optimizer_state_bytes_by_dtype=state.by_dtype)
    if allocator is not None:
        peaks = allocator.peaks
        values.update(peak_allocated_bytes=peaks.peak_allocated_bytes, peak_reserved_bytes=peaks.peak_reserved_bytes,
                      num_alloc_retries=peaks.num_alloc_retries, num_ooms=peaks.num_ooms)
    values["nvml_peak_device_used_bytes"] = sampler.peaks.get("nvml_device_used_bytes")
    values["nvml_peak_process_used_bytes"] = sampler.peaks.get("nvml_process_used_bytes")
    peak_rss = max(sampler.peaks["rss_bytes"] or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    values.update(peak_rss_bytes=peak_rss, peak_rss_delta_bytes=peak_rss - values["rss_baseline_bytes"])
    logs = probe.logs if probe is not None else []
    if probe is not None:
        values.update(activation_bytes=probe.activation_bytes, gradient_bytes=probe.gradient_bytes)
    values.update(_summarise(logs, cell))
    values["cell_wall_s"] = time.perf_counter() - t_start
    values.pop("traceback", None)
    record = attribute(Record.for_cell(cell, status=status, **values))
    steps = [{"cell_key": cell.key, "repeat": cell.repeat, **vars(log)} for log in logs]
    return CellResult(record, steps, [{"cell_key": cell.key, **row} for row in sampler.timeline])


def _summarise(logs: list, cell: Cell) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if logs:
        out["first_loss"] = logs[0].loss
        out["final_loss"] = logs[-1].loss
        out["final_loss_smoothed"] = smoothed_final([log.loss for log in logs])
        out["train_s"] = sum(log.step_time_s for log in logs)
    measured = [log.step_time_s for log in logs[cell.warmup_steps:]]
    if measured:
        median = statistics.median(measured)
        out["step_time_median_s"] = median
        out["step_time_p95_s"] = _percentile(measured, 0.95)
        out["tokens_per_s"] = cell.tokens_per_step / median if median > 0 else math.nan
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:500]
