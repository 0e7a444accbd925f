"""One training step replayed under ``torch.profiler`` (``profile_memory``): the highest live bytes in its forward
and in its backward, summed from the allocator's own events. On the CPU these are exact, which makes the replay the
check of ``memprof.measure.step_memory``'s moments where no GPU measured them (``benchmarks/moment_replay.py``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from memprof.measure.activations import SavedActivations


@dataclass(frozen=True)
class StepPeaks:
    """What a replayed step held: the bytes autograd saved in forward, and each phase's highest live bytes above
    what was allocated before forward (weights, input batch)."""

    activation_bytes: int
    forward_bytes: int
    backward_bytes: int


def replay_step(model: nn.Module, loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                x: torch.Tensor) -> StepPeaks:
    """Two steps' forward and backward to warm up (lazy buffers, the first step's one-time allocations), then one
    more under the profiler, gradients set to None before it as the loop's ``zero_grad`` leaves them."""
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with SavedActivations(model) as saved:
            out = loss(model, x)
        out.backward()
    model.zero_grad(set_to_none=True)
    del out
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
    live, peaks = 0, {"forward": 0, "backward": 0}
    for event in memory:
        live += event["args"]["Bytes"]
        for phase, (start, end) in spans.items():
            if start <= event["ts"] <= end:
                peaks[phase] = max(peaks[phase], live)
    return StepPeaks(saved.bytes, peaks["forward"], peaks["backward"])
