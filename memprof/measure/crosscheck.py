"""Cross-check memprof's exact accounting against a peer memprof did not write: PyTorch's memory profiler.

One cell is built as a worker builds it (``worker.Training``) and trained under ``torch.profiler.profile``
(``profile_memory``, ``record_shapes``, ``with_stack``); ``torch.profiler._memory_profiler`` then sorts every
storage it saw into categories (PARAMETER, GRADIENT, OPTIMIZER_STATE, ACTIVATION, ...). Each category is read at
the instant memprof takes its own figure, not as a maximum over the timeline, so that both describe one moment:

- optimizer state: at the end of the profile, after the last optimizer step; ``optimizer_state_bytes`` is read
  after training, and nothing touches the state after the last step. (A maximum would also count state the
  optimizer replaced and freed on the way.)
- gradients: at the last step's ``gradients_ready`` (after backward and clipping, before ``optimizer.step``), where
  ``CellProbe`` reads ``gradient_bytes``; the instant is marked in the profile with a ``record_function``.
- weights: at the end of the profile, against memprof's frozen + trainable weight bytes. Information only: the
  profiler does not class bitsandbytes' 4-bit weights and their quant states as parameters.
- activations: at the end of the last forward, against the bytes autograd saved in it. Information only: the
  profiler counts every live tensor computed from the input in forward, memprof what autograd keeps for backward.

Tolerance: gradients must agree exactly. Optimizer state must agree exactly once one thing is set aside: what the
profiler cannot see. Its Python tracer records an optimizer's ``state`` once, at the first ``step``, and only the
top-level tensors of each parameter's state dict; a state tensor the optimizer replaces later (Adafactor's
per-parameter ``RMS`` scalar, 4 bytes each) or nests deeper (low-rank projectors, tensor subclasses) is invisible
to it. memprof names those bytes itself (state storages that were not top-level state after step 1) and reports
them; they are not guessed from the difference. Both sides count shared storages once: bitsandbytes' quantisation
maps (one per optimizer, referenced by every parameter's state) agree exactly. Step counters are 4-byte tensors in
torch's AdamW (both count them) and Python ints in bitsandbytes and Adafactor (neither does).

This reads ``torch.profiler._memory_profiler`` (a private module, read against torch 2.13) and the profile's event
tree; the CLI's ``crosscheck`` command is its user.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from memprof.config.spec import CellConfig
from memprof.measure.accounting import count_bytes, gradient_bytes, optimizer_state_bytes, weight_bytes
from memprof.measure.activations import SavedActivations
from memprof.results.record import StepLog
from memprof.train.loop import NullProbe

GRADIENTS_READY = "memprof::gradients_ready"
FORWARD_DONE = "memprof::forward_done"


@dataclass(frozen=True)
class CategoryCheck:
    """One category, as the profiler and memprof count it.

    Attributes:
        required: whether the two must agree (optimizer state, gradients) or the row is information.
        unseen_bytes: the part of memprof's figure the profiler cannot see, as memprof names it.
    """

    category: str
    profiler_bytes: int
    memprof_bytes: int
    required: bool
    unseen_bytes: int = 0
    note: str = ""

    @property
    def diff_bytes(self) -> int:
        return self.profiler_bytes - self.memprof_bytes

    @property
    def agrees(self) -> bool:
        return self.diff_bytes + self.unseen_bytes == 0

    @property
    def verdict(self) -> str:
        if self.diff_bytes == 0:
            return "exact"
        if self.agrees:
            return "agrees (unseen set aside)"
        return "DISAGREES" if self.required else "differs (info)"


def exit_code(rows: list[CategoryCheck]) -> int:
    """1 when a category that must agree does not."""
    return 1 if any(row.required and not row.agrees for row in rows) else 0


class _Witness(NullProbe):
    """The loop bare (a ``NullProbe``) but on the last step, where it takes memprof's readings at the instants
    ``CellProbe`` takes them and marks each instant in the profile; after step 1 it notes which state tensors the
    profiler's tracer has recorded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, last_step: int) -> None:
        self.model, self.optimizer, self.last_step = model, optimizer, last_step
        self.gradient_bytes = 0
        self.activation_bytes = 0
        # weak, so that holding them changes no lifetime the profiler sees
        self.first_state: dict[int, weakref.ref[torch.Tensor]] = {}

    @contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        if name != "forward" or step != self.last_step:
            yield
            return
        with SavedActivations(self.model) as saved:
            yield
        # with gradient accumulation each micro-batch's activations are freed by its backward
        self.activation_bytes = max(self.activation_bytes, saved.bytes)
        with torch.profiler.record_function(FORWARD_DONE):
            pass

    def gradients_ready(self, step: int) -> None:
        if step == self.last_step:
            with torch.profiler.record_function(GRADIENTS_READY):
                pass
            self.gradient_bytes = gradient_bytes(self.model).total

    def step_done(self, log: StepLog) -> None:
        if log.step == 0:
            self.first_state = {id(t): weakref.ref(t) for t in _top_level_state(self.optimizer)}

    def visible_state(self) -> list[torch.Tensor]:
        """The state tensors the profiler recorded at the first step and that are still the optimizer's."""
        return [t for t in _top_level_state(self.optimizer)
                if (ref := self.first_state.get(id(t))) is not None and ref() is t]


def _top_level_state(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """What the profiler's tracer reads of an optimizer's state: each parameter's state dict, one level deep."""
    for state in optimizer.state.values():
        yield from (value for value in state.values() if isinstance(value, torch.Tensor))


def crosscheck(cell: CellConfig) -> list[CategoryCheck]:
    """Train ``cell`` under PyTorch's profiler and compare its memory categories with memprof's accounting.

    Raises:
        memprof.train.optim.OptimizerUnavailable: the cell's optimizer cannot run here.
        memprof.train.loop.Diverged: the cell's loss was not finite.
    """
    from torch.profiler import ProfilerActivity, profile

    from memprof.train.training import Training, resolve_device

    device = resolve_device(cell.budget.device)
    training = Training(cell, device).build()
    model, optimizer = training.model, training.optimizer
    witness = _Witness(model, optimizer, cell.training.steps - 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        training.train(witness)
    at = _CategoryBytes(prof._memory_profile(), device)

    state = optimizer_state_bytes(optimizer).total
    unseen = state - count_bytes(witness.visible_state()).total
    weights = weight_bytes(model)
    end = at.end()
    forward = [at.instant(t) for t in at.marks(FORWARD_DONE)]
    return [
        CategoryCheck("optimizer state", end.get("OPTIMIZER_STATE", 0), state, True, unseen,
                   f"{unseen:,} B of state made after step 1 or nested: the profiler records state once"
                   if unseen else ""),
        CategoryCheck("gradients", at.instant(at.marks(GRADIENTS_READY)[-1]).get("GRADIENT", 0),
                   witness.gradient_bytes, True),
        CategoryCheck("weights", end.get("PARAMETER", 0), weights.frozen.total + weights.trainable.total, False,
                   note="4-bit weights and quant states are not parameters to the profiler"
                   if cell.adapter.kind == "qlora" else ""),
        CategoryCheck("activations", max((f.get("ACTIVATION", 0) for f in forward), default=0),
                   witness.activation_bytes, False,
                   note="profiler: live forward outputs; memprof: what autograd saves"),
    ]


class _CategoryBytes:
    """Bytes per profiler category on one device at chosen instants of the profile."""

    def __init__(self, memory_profile: object, device: torch.device) -> None:
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        timeline = MemoryProfileTimeline(memory_profile)
        self._profile = memory_profile
        self._events = [e for e in timeline.timeline if _same_device(e[2][0].device, device)]
        self._categories = timeline.categories

    def marks(self, name: str) -> list[int]:
        """Start times (ns) of the ``record_function`` blocks called ``name``, in order."""
        from torch._C._profiler import _EventType

        # test the event type first: some other events' names are not valid UTF-8
        return sorted(e.start_time_ns for e in self._profile._op_tree.dfs()
                      if e.typed[0] == _EventType.TorchOp and e.name == name)

    def end(self) -> dict[str, int]:
        return self.instant(math.inf)

    def instant(self, t_ns: float) -> dict[str, int]:
        """Live bytes per category once every event up to ``t_ns`` happened (pre-existing storages included)."""
        from torch.profiler._memory_profiler import Action, TensorKey

        sizes: dict[str, int] = {}

        def add(key: object, version: int, n: int) -> None:
            category = self._categories.get(key, version) if isinstance(key, TensorKey) else None
            name = category.name if category is not None else "UNKNOWN"
            sizes[name] = sizes.get(name, 0) + n

        for t, action, (key, version), n in self._events:
            if t > t_ns:
                break
            if action in (Action.PREEXISTING, Action.CREATE):
                add(key, version, n)
            elif action == Action.INCREMENT_VERSION:
                add(key, version, -n)
                add(key, version + 1, n)
            elif action == Action.DESTROY:
                add(key, version, -n)
        return sizes


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)
