"""Run one cell: build → warm up → measured steps → Record. Every fault becomes a field of the Record."""

from __future__ import annotations

import socket
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprof.measure.attribution import attribute
from memprof.config.cell import Cell
from memprof.errors import one_line
from memprof.results.record import CellResult, Record, Status
from memprof.measure.host import rss_bytes

if TYPE_CHECKING:
    from torch import nn

    from memprof.train.loop import Probe, StepLog


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


_DATA_STRIDE = 1_000_003  # ranks of a sharded cell draw disjoint batch streams: seed + stride * rank


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Training:
    """A cell's model, optimizer, schedule and data, built the one way every caller builds them (``run_cell``,
    ``memprof crosscheck``, the tracker-overhead benchmark). Fields fill in as they are built, so after a fault
    part-way what was built can still be measured."""

    cell: Cell
    device: torch.device
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    batches: Iterator[torch.Tensor] | None = None
    held_out: Sequence[torch.Tensor] = ()
    entropy_floor_nats: float | None = None

    def build(self) -> Training:
        from memprof.train import data, models, optim

        cell, device = self.cell, self.device
        torch.manual_seed(cell.seed)
        self.model = models.build_model(cell.model_spec, cell.adapter_spec, cell.precision, device,
                                        cell.attn_implementation, cell.gradient_checkpointing)
        construct = None
        if cell.strategy != "none":
            from memprof.train import sharding

            self.model, construct = sharding.shard(self.model, cell.strategy, device)
        self.optimizer = optim.build_optimizer(cell.optim, cell.optim_kwargs, cell.lr, self.model, device, construct)
        self.scheduler = optim.build_schedule(cell.schedule, self.optimizer, cell.lr_warmup_steps, cell.steps,
                                              cell.schedule_kwargs)
        if optim.is_schedule_free(self.optimizer):
            self.optimizer.train()
        corpus = data.load_corpus(cell.data_spec, cell.data_spec.get("seed", 0))
        self.entropy_floor_nats = corpus.entropy_floor_nats
        self.batches = data.batches(corpus.train, cell.batch_size, cell.seq_len, cell.seed + _DATA_STRIDE * _rank())
        self.held_out = data.eval_batches(corpus.eval, cell.batch_size, cell.seq_len, cell.eval_batches)
        return self

    def train(self, probe: Probe) -> list[StepLog]:
        """The cell's steps (and held-out evaluation) with ``probe`` observing; raises what ``train`` raises."""
        from memprof.train.loop import train

        cell = self.cell
        return train(self.model, self.optimizer, self.scheduler, self.batches, cell.steps, cell.grad_accum,
                     cell.max_grad_norm, self.device, probe, self.held_out, cell.eval_every)


def run_cell(cell: Cell, sample_interval_s: float = 0.01) -> CellResult:
    """Build the cell's model and optimizer, train it, and measure everything on the way; a sharded cell on
    each of its ranks (``memprof.run.ranks``, which forks them before anything here computes).

    Never raises for a fault inside the cell (OOM, divergence, a library error, Ctrl-C): those are the
    Record's ``status``.
    """
    if cell.strategy != "none":
        from memprof.run.ranks import run_ranks

        return run_ranks(cell, sample_interval_s)
    return measure_cell(cell, resolve_device(cell.device), sample_interval_s)


def measure_cell(cell: Cell, device: torch.device, sample_interval_s: float = 0.01) -> CellResult:
    """``run_cell`` on one device: the only rank, or one of a sharded cell's ranks."""
    from memprof.analysis import convergence
    from memprof.measure import formulas
    from memprof.train import models, optim
    from memprof.measure.readings import exact_values, memory_sources, peak_values, step_summary
    from memprof.measure.probe import CellProbe
    from memprof.measure.sampler import Sampler
    from memprof.train.loop import Diverged

    t_start = time.perf_counter()
    baseline = rss_bytes()
    measured = memory_sources(device)
    allocator = measured.allocator
    values: dict[str, Any] = {"host": socket.gethostname(), "device": str(device), "device_name": measured.device_name}

    status, probe, built = Status.OK, None, Training(cell, device)
    sampler = Sampler(measured.sources, sample_interval_s)
    with ExitStack() as stack:
        stack.enter_context(sampler)
        if allocator is not None:
            stack.enter_context(allocator)
        try:
            built.build()
            probe = CellProbe(built.model, sampler, allocator, snapshot_step=max(cell.warmup_steps - 1, 0))
            values["setup_s"] = time.perf_counter() - t_start
            built.train(probe)
        except Diverged as err:
            status, values["error"], values["fail_step"] = Status.DIVERGED, str(err), err.step
            values["fail_phase"] = "forward"  # where the non-finite loss came from; it is checked after the step
        except (optim.OptimizerUnavailable, models.LeverUnavailable) as err:
            status, values["error"] = Status.UNAVAILABLE, str(err)
        except KeyboardInterrupt:
            status, values["error"] = Status.INTERRUPTED, "interrupted"
        except Exception as err:  # noqa: BLE001 - any library error is this cell's result
            status = Status.OOM if is_oom(err) else Status.CRASHED
            values["error"] = one_line(err)
            if status is Status.CRASHED:
                traceback.print_exc()  # into the cell's log, for the user who wants more than one line
        if status is not Status.OK and status is not Status.UNAVAILABLE and probe is not None:
            phase, step = probe.where
            values.setdefault("fail_phase", phase)
            values.setdefault("fail_step", step if step >= 0 else None)
        elif probe is None and status in (Status.OOM, Status.CRASHED):
            values["fail_phase"] = "setup"

    if callable(getattr(built.model, "reshard", None)):
        built.model.reshard()  # FSDP2 keeps the root unit gathered after a forward: count the rank's shards
    values.update(exact_values(built.model, built.optimizer))
    if built.optimizer is not None:
        values["predicted_state_bytes"] = formulas.predict_for_optimizer(cell.optim, built.optimizer)
    values.update(peak_values(sampler, allocator, baseline))
    logs = probe.logs if probe is not None else []
    if probe is not None:
        values.update(activation_bytes=probe.activation_bytes, gradient_bytes=probe.gradient_bytes)
    values.update(step_summary(logs, cell.warmup_steps, cell.tokens_per_step))
    if status in (Status.OK, Status.DIVERGED):  # a curve cut short by a crash or OOM says nothing about learning
        values.update(convergence.summarise(logs, built.entropy_floor_nats, cell.target_loss))
    values["adapter_r"] = cell.adapter_spec.get("r") if cell.adapter_spec.get("kind", "none") != "none" else None
    values["cell_wall_s"] = time.perf_counter() - t_start
    record = attribute(Record.for_cell(cell, status=status, **values))
    steps = [{"cell_key": cell.key, "repeat": cell.repeat, **vars(log)} for log in logs]
    return CellResult(record, steps, [{"cell_key": cell.key, **row} for row in sampler.timeline])
