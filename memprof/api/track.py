"""memprof inside the user's own training loop: ``with memprof.track(model, optimizer) as t: ... t.step(loss=...)``.

It drives the same trackers as ``memprof run`` (``memprof.measure.readings``) and writes a results folder in the same
format (one cell), so ``memprof report`` and ``memprof compare`` read it unchanged.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from memprof.api.describe import describe
from memprof.config.spec import OptimizerSpec
from memprof.measure.accounting import gradient_bytes
from memprof.measure.activations import SavedActivations
from memprof.measure.attribution import attribute
from memprof.measure.host import heap_free_bytes, rss_bytes
from memprof.measure.load import CpuPressure
from memprof.measure.readings import exact_values, memory_sources, peak_values, sample_interval, step_summary
from memprof.measure.sampler import Sampler
from memprof.results import env as env_mod
from memprof.results.record import CellResult, Record, Status, StepLog
from memprof.results.store import RunWriter, new_run_dir


class Tracking:
    """One tracked training run. Use through :func:`track`.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``. At ``snapshot_step`` the saved
    activations of that step's forward pass and the gradients right before its ``optimizer.step()`` are counted
    exactly; every other step runs with the sampler alone.

    Attributes:
        record: the Record, once the ``with`` block has exited.
        run_dir: the results folder written on exit, or None when ``out`` was None.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, out: str | Path | None = None,
                 name: str = "track", batch_size: int = 0, seq_len: int = 0, warmup_steps: int = 1,
                 sample_interval_s: float | None = None, optimizer_spec: OptimizerSpec | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.optimizer_spec = optimizer_spec
        self.out = Path(out) if out is not None else None
        self.name = name
        self.batch_size, self.seq_len, self.warmup_steps = batch_size, seq_len, warmup_steps
        self.snapshot_step = warmup_steps
        self.device = next(model.parameters()).device
        self.logs: list[StepLog] = []
        self.record: Record | None = None
        self.run_dir: Path | None = None
        self.activation_bytes: int | None = None
        self.gradient_bytes: int | None = None
        self._tokens: int | None = None
        self._stack = ExitStack()
        self._saved: SavedActivations | None = None
        self._measured = memory_sources(self.device)
        self._sampler = Sampler(self._measured.sources, sample_interval(self.device, sample_interval_s))
        self._pressure = CpuPressure()
        self._baseline = 0
        self._heap_baseline: int | None = None
        self._t_last = 0.0
        self._t_start = 0.0

    def __enter__(self) -> Tracking:
        self._t_start = self._t_last = time.perf_counter()
        self._baseline, self._heap_baseline = rss_bytes(), heap_free_bytes()
        self._stack.enter_context(self._sampler)
        self._stack.enter_context(self._pressure)
        if self._measured.allocator is not None:
            self._stack.enter_context(self._measured.allocator)
        self._stack.enter_context(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
        self._sampler.mark(0, "train")
        self._maybe_start_snapshot()
        return self

    def step(self, loss: float | torch.Tensor, tokens: int | None = None) -> None:
        """Record one optimizer step: its loss (a tensor is synced here) and the tokens it trained on."""
        now = time.perf_counter()
        value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)  # SYNC on a GPU
        step = len(self.logs)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.logs.append(StepLog(step, value, lr, float("nan"), now - self._t_last))
        if tokens is not None:
            self._tokens = tokens
        self._t_last = now
        self._sampler.mark(step + 1, "train")
        self._maybe_start_snapshot()

    def _maybe_start_snapshot(self) -> None:
        if len(self.logs) == self.snapshot_step:
            self._saved = SavedActivations(self.model).__enter__()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self.activation_bytes, self._saved = self._saved.bytes, None
            self.gradient_bytes = gradient_bytes(self.model).total

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._saved = None
        self._stack.close()
        status = Status.OK
        if exc_type is not None:
            status = Status.INTERRUPTED if issubclass(exc_type, KeyboardInterrupt) else Status.CRASHED
        config = describe(self.model, self.optimizer, suite=self.name, batch_size=self.batch_size,
                          seq_len=self.seq_len, steps=len(self.logs), warmup_steps=self.warmup_steps,
                          optimizer_spec=self.optimizer_spec)
        values = self._values(exc)
        self.record = attribute(Record(config, status=status, **values), values.get("peak_phase", ""))
        if self.out is not None:
            self._write()

    def _values(self, exc: BaseException | None) -> dict[str, Any]:
        values: dict[str, Any] = {"host": socket.gethostname(), "device": str(self.device),
                                  "device_name": self._measured.device_name,
                                  "activation_bytes": self.activation_bytes, "gradient_bytes": self.gradient_bytes,
                                  "cell_wall_s": time.perf_counter() - self._t_start,
                                  "cpu_pressure": self._pressure.share}
        if exc is not None:
            values["error"] = f"{type(exc).__name__}: {exc}"[:500]
        values.update(exact_values(self.model, self.optimizer))
        values.update(peak_values(self._sampler, self._measured.allocator, self._baseline, self._heap_baseline))
        tokens = self._tokens or (self.batch_size * self.seq_len) or None
        values.update(step_summary(self.logs, self.warmup_steps, tokens))
        return values

    def set_last_loss(self, loss: float) -> None:
        """Replace the loss of the last recorded step (for callers that learn it after the step, e.g. a Trainer)."""
        if self.logs:
            self.logs[-1] = replace(self.logs[-1], loss=float(loss))

    def _write(self) -> None:
        assert self.record is not None and self.out is not None
        self.run_dir = new_run_dir(self.out, self.name)
        suite_text = f'# written by memprof.track\n[suite]\nname = "{self.name}"\n'
        writer = RunWriter(self.run_dir, suite_text, {"suite": self.name, "suite_digest": "",
                                                      "cell_keys": [self.record.key]}, env_mod.capture())
        steps = [{"cell_key": self.record.key, "repeat": 0, **vars(log)} for log in self.logs]
        timeline = [{"cell_key": self.record.key, **row} for row in self._sampler.timeline]
        writer.append(CellResult(self.record, steps, timeline))


def track(model: nn.Module, optimizer: torch.optim.Optimizer, out: str | Path | None = None, *,
          name: str = "track", batch_size: int = 0, seq_len: int = 0, warmup_steps: int = 1,
          sample_interval_s: float | None = None, optimizer_spec: OptimizerSpec | None = None) -> Tracking:
    """Measure a training loop you already have.

    Args:
        model: the model being trained (a peft model is recognised as such).
        optimizer: its optimizer; state bytes are counted exactly when the block exits.
        out: a results root: the run is written to ``out/<name>-<timestamp>/`` in the format of ``memprof run``;
            None writes nothing.
        name: the run's name (its "suite" in the results).
        batch_size, seq_len: recorded with the run; their product is the tokens per step unless ``step`` is
            given ``tokens``.
        warmup_steps: steps left out of the timing; activations and gradients are counted at the step after.
        sample_interval_s: memory sampling interval (default: 10 ms on the CPU, 50 ms on CUDA).
        optimizer_spec: what the optimizer was asked for, by name and settings (a Trainer's ``args.optim``);
            without it the record names the optimizer by its class path and its defaults.

    Returns:
        A context manager; call ``.step(loss=..., tokens=...)`` after every optimizer step.
    """
    return Tracking(model, optimizer, out, name=name, batch_size=batch_size, seq_len=seq_len,
                    warmup_steps=warmup_steps, sample_interval_s=sample_interval_s, optimizer_spec=optimizer_spec)

