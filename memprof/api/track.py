"""memprof inside the user's own training loop: ``with memprof.track(model, optimizer) as t: ... t.step(loss=...)``.

It drives the same trackers as ``memprof run`` (``memprof.measure.readings``) and writes a results folder in the same
format (one cell), so ``memprof report`` and ``memprof compare`` read it unchanged.
"""

from __future__ import annotations

import json
import math
import re
import socket
import statistics
import time
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from memprof.api.describe import describe
from memprof.config.spec import OptimizerSpec
from memprof.measure import accounting
from memprof.measure.activations import SavedActivations
from memprof.measure.attribution import attribute
from memprof.measure.host import HostBaseline
from memprof.measure.load import CpuPressure
from memprof.measure.readings import exact_values, memory_sources, peak_values, sample_interval, step_summary
from memprof.measure.sampler import Sampler
from memprof.results import env as env_mod
from memprof.results.record import CellResult, Record, Status, StepLog
from memprof.results.store import RunWriter, new_run_dir
from memprof.suite.schema import NAME_PATTERN

_active: Tracking | None = None  # the Tracking inside its block, in this process (tracks do not nest)


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
                 name: str = "track", batch_size: int = 0, seq_len: int = 0, grad_accum: int = 1,
                 warmup_steps: int = 1, sample_interval_s: float | None = None,
                 optimizer_spec: OptimizerSpec | None = None) -> None:
        _check(model, optimizer, name, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
               warmup_steps=warmup_steps, sample_interval_s=sample_interval_s, optimizer_spec=optimizer_spec)
        self.model = model
        self.optimizer = inner_optimizer(optimizer)
        self.optimizer_spec = optimizer_spec
        self.out = Path(out) if out is not None else None
        self.name = name
        self.batch_size, self.seq_len, self.grad_accum = batch_size, seq_len, grad_accum
        self.warmup_steps = self.snapshot_step = warmup_steps
        self.device = next(model.parameters()).device
        self.logs: list[StepLog] = []
        self.record: Record | None = None
        self.run_dir: Path | None = None
        self.activation_bytes: int | None = None
        self.gradient_bytes: int | None = None
        self._tokens: list[int | None] = []  # each step's, as ``step`` was told or the model's forward saw
        self._seen_tokens = 0  # input_ids the model's forward took in training since the last step
        self._seen_shape = (0, 0)  # the largest (batch, length) of those
        self._unknown_loss: set[int] = set()  # steps whose loss ``step`` was not told (a Trainer logs it later)
        self._optimizer_steps = 0
        self._entered = False
        self._stack = ExitStack()
        self._saved: SavedActivations | None = None
        self._snapshot_pending = False  # the snapshot step began and its optimizer step has not come yet
        self._outer_hooks = False  # the user's saved_tensors_hooks were active there: activations not counted
        self._measured = memory_sources(self.device)
        self._sampler = Sampler(self._measured.sources, sample_interval(self.device, sample_interval_s))
        self._pressure = CpuPressure()
        self._baseline: HostBaseline | None = None
        self._t_last = 0.0
        self._t_start = 0.0

    def __enter__(self) -> Tracking:
        global _active
        if self._entered:
            raise RuntimeError("memprof.track: this tracking has run already; call memprof.track(...) for another")
        if _active is not None:
            raise RuntimeError("memprof.track: another track is active in this process (tracks do not nest: each "
                               "would measure the other's samples and saved tensors; a Trainer that raised outside "
                               "`with MemprofCallback(...)` leaves its tracking open: its callback.tracking.discard() "
                               "ends it)")
        self._entered = True
        self._t_start = self._t_last = time.perf_counter()
        # On the CPU the peak is RSS growth: the model and optimizer already built count as the cell's own, as
        # they do in `memprof run`'s worker, which takes its baseline before it builds them.
        self._baseline = HostBaseline.now(_held_bytes(self.model, self.optimizer) if self.device.type == "cpu"
                                          else 0)
        with ExitStack() as stack:  # all of it, or none of it left running
            stack.enter_context(self._sampler)
            stack.enter_context(self._pressure)
            if self._measured.allocator is not None:
                stack.enter_context(self._measured.allocator)
            stack.enter_context(self.optimizer.register_step_pre_hook(self._before_optimizer_step))
            stack.enter_context(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._stack = stack.pop_all()
        _active = self
        self._sampler.mark(0, "train")
        self._maybe_start_snapshot()
        return self

    def step(self, loss: float | torch.Tensor | None, tokens: int | None = None) -> None:
        """Record one optimizer step: its loss (a tensor is synced here; None: not known yet, see
        :meth:`set_last_loss`) and the tokens it trained on (default: the ``input_ids`` the model's forward took
        since the last step, else ``batch_size × seq_len × grad_accum``)."""
        if _active is not self:
            raise RuntimeError("memprof.track: step() belongs inside the tracking's with block")
        now = time.perf_counter()
        step = len(self.logs)
        if loss is None:
            value = math.nan
            self._unknown_loss.add(step)
        else:
            value = float(loss.detach().float()) if isinstance(loss, torch.Tensor) else float(loss)  # SYNC on a GPU
        lr = self.optimizer.param_groups[0].get("lr")  # None: one that sets its own step (Adafactor's relative step)
        self.logs.append(StepLog(step, value, math.nan if lr is None else float(lr), math.nan, now - self._t_last))
        self._tokens.append(tokens if tokens is not None else self._seen_tokens or None)
        self._seen_tokens = 0
        self._t_last = now
        self._sampler.mark(step + 1, "train")
        self._maybe_start_snapshot()

    def set_last_loss(self, loss: float) -> None:
        """Give the last recorded step its loss (for callers that learn it after the step, e.g. a Trainer)."""
        if self.logs:
            self.logs[-1] = replace(self.logs[-1], loss=float(loss))
            self._unknown_loss.discard(self.logs[-1].step)

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the tokens of a training forward's ``input_ids`` (the first argument, or by name)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor) and ids.dim() == 2:
            batch, length = ids.shape
            self._seen_tokens += batch * length
            self._seen_shape = (max(self._seen_shape[0], batch), max(self._seen_shape[1], length))

    def _maybe_start_snapshot(self) -> None:
        if len(self.logs) != self.snapshot_step:
            return
        self._snapshot_pending = True
        if _outer_saved_tensors_hooks():  # ours would replace the user's (save_on_cpu...) for the measured step
            self._outer_hooks = True
        else:
            self._saved = SavedActivations(self.model).__enter__()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1
        if self._snapshot_pending:
            self._snapshot_pending = False
            self.gradient_bytes = accounting.gradient_bytes(self.model).total
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self.activation_bytes, self._saved = self._saved.bytes, None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.discard():
            return  # this exit came twice
        status = Status.OK
        if exc_type is not None:
            status = Status.INTERRUPTED if issubclass(exc_type, KeyboardInterrupt) else Status.CRASHED
        elif self._outer_hooks:
            _warn("activations are not counted: the block runs under the user's saved_tensors_hooks (such as "
                  "save_on_cpu), which memprof's own would have replaced for the measured step")
        elif self.activation_bytes == 0 and self.gradient_bytes:
            # an inner torch.autograd.graph.saved_tensors_hooks (save_on_cpu...) took every saved tensor
            self.activation_bytes = None
            _warn("no saved tensor reached memprof's saved-tensor hooks (another saved_tensors_hooks inside the "
                  "block, such as save_on_cpu, takes them): activations are not counted")
        if exc_type is None and (unmeasured := self._unmeasured()):
            _warn(unmeasured)
        batch, length = self._seen_shape
        config = describe(self.model, self.optimizer, suite=self.name, batch_size=self.batch_size or batch,
                          seq_len=self.seq_len or length, grad_accum=self.grad_accum, steps=len(self.logs),
                          warmup_steps=self.warmup_steps, optimizer_spec=self.optimizer_spec)
        values = self._values(exc)
        self.record = attribute(Record(config, status=status, **values), values.get("peak_phase", ""))
        if self.out is not None:
            self._write()

    def discard(self) -> bool:
        """Stop measuring without a record (a run abandoned mid-way): the sampler stops and the hooks go. Returns
        whether it was measuring."""
        global _active
        if _active is not self:
            return False
        _active = None
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self._saved = None
        self._stack.close()
        return True

    def _unmeasured(self) -> str:
        """What a block that raised nothing still left unmeasured ('' where nothing)."""
        if not self.logs:
            return "no step was recorded: call t.step(loss=...) after every optimizer.step()"
        if not self._optimizer_steps:
            return ("the optimizer given to memprof.track never stepped inside the block: gradients and activations "
                    "were not counted, and its state may not be the one that trained")
        if len(self._unknown_loss) == len(self.logs):
            return "no step's loss was given (a Trainer logs it every logging_steps: none fell inside this run)"
        if len(self.logs) <= self.warmup_steps:
            return (f"{len(self.logs)} steps, all warm-up (warmup_steps = {self.warmup_steps}): no step was timed, "
                    f"and activations and gradients were not counted")
        return ""

    def _values(self, exc: BaseException | None) -> dict[str, Any]:
        assert self._baseline is not None
        values: dict[str, Any] = {"host": socket.gethostname(), "device": str(self.device),
                                  "device_name": self._measured.device_name,
                                  "activation_bytes": self.activation_bytes, "gradient_bytes": self.gradient_bytes,
                                  "cell_wall_s": time.perf_counter() - self._t_start,
                                  "cpu_pressure": self._pressure.share}
        if exc is not None:
            values["error"] = f"{type(exc).__name__}: {exc}"[:500]
        values.update(exact_values(self.model, self.optimizer))
        values.update(peak_values(self._sampler, self._measured.allocator, self._baseline))
        told = [n for n in self._tokens[self.warmup_steps:] if n is not None]
        tokens = round(statistics.fmean(told)) if told else self.batch_size * self.seq_len * self.grad_accum or None
        known = [log for log in self.logs if log.step not in self._unknown_loss]
        values.update(step_summary(self.logs, self.warmup_steps, tokens, losses=[log.loss for log in known]))
        return values

    def _write(self) -> None:
        assert self.record is not None and self.out is not None
        self.run_dir = new_run_dir(self.out, self.name)
        suite_text = f'# written by memprof.track\n[suite]\nname = {json.dumps(self.name)}\n'
        writer = RunWriter(self.run_dir, suite_text, {"suite": self.name, "suite_digest": "",
                                                      "cell_keys": [self.record.key]}, env_mod.capture())
        steps = [{"cell_key": self.record.key, "repeat": 0, **vars(log)} for log in self.logs]
        timeline = [{"cell_key": self.record.key, **row} for row in self._sampler.timeline]
        writer.append(CellResult(self.record, steps, timeline))


def track(model: nn.Module, optimizer: torch.optim.Optimizer, out: str | Path | None = None, *,
          name: str = "track", batch_size: int = 0, seq_len: int = 0, grad_accum: int = 1, warmup_steps: int = 1,
          sample_interval_s: float | None = None, optimizer_spec: OptimizerSpec | None = None) -> Tracking:
    """Measure a training loop you already have.

    On the CPU the peak is the growth of resident memory, counted as ``memprof run`` counts it: from a process
    without the model, so the CPU tensors the model and optimizer hold when the block begins count as part of it.
    Memory an earlier run in the same process freed and the C allocator kept is reused without growing it: a second
    run in one process reads low (``memprof run`` gives each cell a fresh process).

    Args:
        model: the model being trained (a peft model is recognised as such, by its active adapter).
        optimizer: its optimizer; state bytes are counted exactly when the block exits.
        out: a results root: the run is written to ``out/<name>-<timestamp>/`` in the format of ``memprof run``;
            None writes nothing.
        name: the run's name (its "suite" in the results): letters, digits, ``_``, ``.`` and ``-``.
        batch_size, seq_len, grad_accum: recorded with the run (micro-batches of ``batch_size`` × ``seq_len``
            tokens, ``grad_accum`` of them a step); without them, the largest ``input_ids`` the model's forward took
            in training, which also counts each step's tokens where ``step`` is not given ``tokens``.
        warmup_steps: steps left out of the timing; activations and gradients are counted at the step after.
        sample_interval_s: memory sampling interval (default: 10 ms on the CPU, 50 ms on CUDA).
        optimizer_spec: what the optimizer was asked for, by name and settings (a Trainer's ``args.optim``);
            without it the record names the optimizer by its class path and its defaults.

    Returns:
        A context manager; call ``.step(loss=..., tokens=...)`` after every optimizer step.

    Raises:
        TypeError, ValueError: arguments it cannot measure with, in one line, before anything trains.
    """
    return Tracking(model, optimizer, out, name=name, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                    warmup_steps=warmup_steps, sample_interval_s=sample_interval_s, optimizer_spec=optimizer_spec)


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that keeps the state: the one inside accelerate's wrapper (which a Trainer steps), any other
    as it is (a Lookahead's own state counts)."""
    return optimizer.optimizer if type(optimizer).__name__ == "AcceleratedOptimizer" else optimizer


def _check(model: Any, optimizer: Any, name: Any, sample_interval_s: Any, optimizer_spec: Any, **counts: Any) -> None:
    """Refuse, in one line, what ``track`` cannot measure with."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memprof.track(model, optimizer): model is a {type(model).__name__}, not a torch.nn.Module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"memprof.track(model, optimizer): optimizer is a {type(optimizer).__name__}, not a "
                        f"torch.optim.Optimizer")
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError("memprof.track: the model has no parameters, so nothing trains")
    if first.device.type == "meta":
        raise ValueError("memprof.track: the model is on the meta device, where it cannot train")
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise ValueError(f"memprof.track: name {name!r} is not letters, digits, '_', '.' and '-' (it names the "
                         f"results folder)")
    least = {"grad_accum": 1}
    for key, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least.get(key, 0):
            raise ValueError(f"memprof.track: {key} must be an integer of at least {least.get(key, 0)}, got {value!r}")
    if optimizer_spec is not None and not isinstance(optimizer_spec, OptimizerSpec):
        raise TypeError(f"memprof.track: optimizer_spec is a {type(optimizer_spec).__name__}, not a "
                        f"memprof.config.spec.OptimizerSpec")
    if sample_interval_s is not None and not (isinstance(sample_interval_s, (int, float))
                                              and 0 < sample_interval_s < math.inf):
        raise ValueError(f"memprof.track: sample_interval_s must be positive seconds, got {sample_interval_s!r}")


def _held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of the model's weights and buffers, its gradients and the optimizer's state, as they are now."""
    weights = accounting.weight_bytes(model)
    return (weights.frozen.total + weights.trainable.total + weights.buffers.total
            + accounting.gradient_bytes(model).total + accounting.optimizer_state_bytes(optimizer).total)


def _outer_saved_tensors_hooks() -> bool:
    """Whether saved_tensors_hooks are active here (torch's own stack; a torch without the call: none known)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _warn(message: str) -> None:
    """A warning pointing at the user's ``with`` statement (``_warn`` <- ``__exit__`` <- it)."""
    warnings.warn(f"memprof.track: {message}", stacklevel=3)
