"""CellProbe: connects the training loop's events to the trackers, and remembers where the loop is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

from torch import nn

from memprof.measure.accounting import gradient_bytes
from memprof.measure.activations import SavedActivations
from memprof.measure.allocator import CudaAllocator
from memprof.measure.sampler import Sampler
from memprof.results.record import StepLog


class CellProbe:
    """Marks the sampler's timeline, splits allocator peaks by phase, and takes the exact snapshots that
    only exist mid-step (saved activations, gradients) at one chosen step, so the other steps run bare.

    Attributes:
        where: (phase, step) the loop was last in; a fault is reported there.
    """

    def __init__(self, model: nn.Module, sampler: Sampler, allocator: CudaAllocator | None,
                 snapshot_step: int, on_step: Callable[[int, float], None] | None = None) -> None:
        self.model = model
        self.sampler = sampler
        self.allocator = allocator
        self.snapshot_step = snapshot_step
        self.on_step = on_step
        self.where: tuple[str, int] = ("setup", -1)
        self.logs: list[StepLog] = []
        self.activation_bytes: int | None = None
        self.gradient_bytes: int | None = None

    @contextmanager
    def phase(self, step: int, name: str) -> Iterator[None]:
        self.where = (name, step)
        self.sampler.mark(step, name)
        snapshot = step == self.snapshot_step
        # the allocator's peak split by phase at the snapshot step only: memory_stats() costs a launch-bound step
        split = self.allocator.phase(name) if self.allocator and snapshot else nullcontext()
        saved = SavedActivations(self.model) if name == "forward" and snapshot else None
        with split, (saved or nullcontext()):
            yield
        if saved is not None:
            # with gradient accumulation each micro-batch's activations are freed by its backward
            self.activation_bytes = max(self.activation_bytes or 0, saved.bytes)

    def gradients_ready(self, step: int) -> None:
        if step == self.snapshot_step:
            self.gradient_bytes = gradient_bytes(self.model).total

    def step_done(self, log: StepLog) -> None:
        self.logs.append(log)
        if self.on_step is not None:
            self.on_step(log.step, log.loss)
