"""The training loop: N optimizer steps and the held-out evaluation. Measurement hooks in through ``probe``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
from torch import nn

from memprof.results.record import StepLog
from memprof.train.optim import Scheduler, is_schedule_free, steps_on_metric


Loss = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input ids) -> the mean causal-LM loss


def full_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' own causal-LM loss: the model's forward with ``labels``, over the whole [tokens, vocab] logits."""
    return model(input_ids=x, labels=x).loss


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


def evaluate(model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device, loss: Loss = full_loss) -> float:
    """Mean ``loss`` over fixed held-out batches (all the same shape, so the mean of batch means is the token mean)."""
    model.eval()  # no dropout
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for x in batches:
            x = x.to(device, non_blocking=True)
            total += loss(model, x).float()
    model.train()
    return (total / len(batches)).item()  # SYNC


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Scheduler | None,
          batches: Iterator[torch.Tensor], steps: int, grad_accum: int, max_grad_norm: float,
          device: torch.device, probe: Probe, eval_batches: Sequence[torch.Tensor] = (),
          eval_every: int = 0, loss: Loss = full_loss) -> list[StepLog]:
    """Run ``steps`` optimizer steps of causal-LM training, each micro-batch's loss computed by ``loss``, and return
    one log line per step.

    Evaluates on ``eval_batches`` every ``eval_every`` steps (0: only after the last step) and never when there
    are none. A scheduler that reads a metric (ReduceLROnPlateau, GreedyLR) steps on the eval loss, as in
    transformers' Trainer; any other steps after each optimizer step.

    Raises:
        Diverged: at the first step whose loss is not finite.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    on_metric = scheduler is not None and steps_on_metric(scheduler)
    schedule_free = is_schedule_free(optimizer)
    model.train()
    logs: list[StepLog] = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(grad_accum):
            x = next(batches).to(device, non_blocking=True)
            with probe.phase(step, "forward"):
                micro = loss(model, x) / grad_accum
            with probe.phase(step, "backward"):
                micro.backward()
            loss_sum += micro.detach()  # stays on the device: no sync here
            # as transformers' Trainer, keep no graph past its backward: its nodes hold an input made to require grad
            # (transformers' hook for checkpointing under an adapter) and that input's gradient, into the next forward
            del micro
        lr = optimizer.param_groups[0]["lr"]  # the LR this step's update uses: the scheduler moves it afterwards
        with probe.phase(step, "optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # queued, no sync
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of the rank's partial norm
                grad_norm = grad_norm.full_tensor()
            probe.gradients_ready(step)
            optimizer.step()
            if schedule_free:  # its own warm-up scales the LR inside the step
                lr = optimizer.param_groups[0].get("scheduled_lr", lr)
            if scheduler is not None and not on_metric:
                scheduler.step()
        with probe.phase(step, "zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        # SYNC: the one device->host copy per step; it waits for all the work queued above.
        loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
        step_time = time.perf_counter() - t0
        eval_loss = None
        due = step + 1 == steps or (eval_every > 0 and (step + 1) % eval_every == 0)
        if eval_batches and due and math.isfinite(loss_value):
            with probe.phase(step, "eval"):
                if schedule_free:
                    optimizer.eval()  # evaluate the averaged weights, as schedule-free training intends
                eval_loss = evaluate(model, eval_batches, device, loss)
                if schedule_free:
                    optimizer.train()
            if on_metric:
                scheduler.step(eval_loss)
        logs.append(StepLog(step, loss_value, float(lr), norm_value, step_time, eval_loss))
        probe.step_done(logs[-1])
        if not math.isfinite(loss_value):
            raise Diverged(step, loss_value)
    return logs
