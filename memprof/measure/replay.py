"""One training step replayed: what its forward saves for backward (``saved_bytes``), and under ``torch.profiler``
(``profile_memory``) the highest live bytes in its forward and in its backward, summed from the allocator's own
events. On the CPU these are exact, which makes the replay the check of ``memprof.measure.step_memory``'s moments
and of ``memprof.measure.meta_step`` where no GPU measured them (``benchmarks/moment_replay.py``, the tests)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from memprof.config.spec import CellConfig
from memprof.measure.activations import SavedActivations

Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepPeaks:
    """What a replayed step held: the bytes autograd saved in forward, and each phase's highest live bytes above
    what was allocated before forward (weights, input batch)."""

    activation_bytes: int
    forward_bytes: int
    backward_bytes: int


def step_saved_bytes(model: nn.Module, loss: Loss, x: torch.Tensor) -> int:
    """What one forward of ``loss(model, x)`` saves for backward (``SavedActivations``); its backward runs after."""
    with SavedActivations(model) as saved:
        out = loss(model, x)
    out.backward()
    return saved.bytes


def saved_bytes(cell: CellConfig) -> int:
    """What one micro-batch of ``cell`` saves in forward on the CPU: its model built as a run builds it (seeded), a
    batch of byte tokens of its shape, its loss."""
    from memprof.train import models

    torch.manual_seed(0)
    model = models.build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"), cell.levers)
    x = torch.randint(0, models.BYTE_VOCAB, (cell.shape.batch_size, cell.shape.seq_len))
    return step_saved_bytes(model, models.loss_function(cell.levers), x)


def replay_step(model: nn.Module, loss: Loss, x: torch.Tensor, accumulating: bool = False) -> StepPeaks:
    """Two steps' forward and backward to warm up (lazy buffers, the first step's one-time allocations), then one
    more under the profiler, gradients set to None before it as the loop's ``zero_grad`` leaves them; or, when
    ``accumulating``, a later micro-batch of a step: the gradients of the one before it still there (and left out
    of the peaks, as allocated before)."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        activation_bytes = step_saved_bytes(model, loss, x)
    if not accumulating:
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function("forward"):
            out = loss(model, x)
        with torch.profiler.record_function("backward"):
            out.backward()
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(str(Path(folder) / "trace.json"))
        events = json.loads((Path(folder) / "trace.json").read_text())["traceEvents"]
    spans = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("ph") == "X" and e.get("name") in ("forward", "backward")}
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    live, peaks, allocated = 0, {"forward": 0, "backward": 0}, set()
    for event in memory:
        size, address = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            allocated.add(address)
        elif address in allocated:
            allocated.discard(address)
        else:  # not allocated in this profile: a block an earlier profile saw at this address, its free reported
            continue  # with that block's size when another block there is freed (tests/test_meta_step.py)
        live += size
        for phase, (start, end) in spans.items():
            if start <= event["ts"] <= end:
                peaks[phase] = max(peaks[phase], live)
    return StepPeaks(activation_bytes, peaks["forward"], peaks["backward"])
