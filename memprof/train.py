"""The training loop: N optimizer steps, nothing else. Measurement hooks in through ``probe``."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_s: float


class Probe(Protocol):
    """What the loop tells its observers: where it is, and when gradients are complete."""

    def phase(self, step: int, name: str) -> AbstractContextManager[None]: ...

    def gradients_ready(self, step: int) -> None: ...

    def step_done(self, log: StepLog) -> None: ...


class NullProbe:
    """Observes nothing: the loop as it runs without memprof."""

    def phase(self, step: int, name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def gradients_ready(self, step: int) -> None:
        pass

    def step_done(self, log: StepLog) -> None:
        pass


class Diverged(Exception):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}")
        self.step = step


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
          batches: Iterator[torch.Tensor], steps: int, grad_accum: int, max_grad_norm: float,
          device: torch.device, probe: Probe) -> list[StepLog]:
    """Run ``steps`` optimizer steps of causal-LM training and return one log line per step.

    Raises:
        Diverged: at the first step whose loss is not finite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    model.train()
    logs: list[StepLog] = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x = next(batches).to(device, non_blocking=True)
            with probe.phase(step, "forward"):
                loss = model(input_ids=x, labels=x).loss / grad_accum
            with probe.phase(step, "backward"):
                loss.backward()
            loss_sum += loss.detach()  # stays on the device: no sync here
        with probe.phase(step, "optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # queued, no sync
            probe.gradients_ready(step)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        with probe.phase(step, "zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        # SYNC: the one device->host copy per step; it waits for all the work queued above.
        loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
        logs.append(StepLog(step, loss_value, float(lr), norm_value, time.perf_counter() - t0))
        probe.step_done(logs[-1])
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value)
    return logs
