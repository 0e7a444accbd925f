"""A cell's training objects, built the one way every caller builds them: the worker, ``memprof crosscheck`` and
the tracker-overhead and sampler-cost benchmarks. Enters: a ``CellConfig`` and a device. Leaves: the model (adapted,
quantised, sharded), its loss, optimizer, schedule and batches, and ``train(probe)``, which runs the loop of
``memprof.train.loop``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprof.config.spec import CellConfig

if TYPE_CHECKING:
    from torch import nn

    from memprof.results.record import StepLog
    from memprof.train.loop import Loss, Probe

_DATA_STRIDE = 1_000_003  # ranks of a sharded cell draw disjoint batch streams: seed + stride * rank


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Training:
    """A cell's model, loss, optimizer, schedule and data. Fields fill in as they are built, so after a fault
    part-way what was built can still be measured."""

    cell: CellConfig
    device: torch.device
    model: nn.Module | None = None
    loss: Loss | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    batches: Iterator[torch.Tensor] | None = None
    held_out: Sequence[torch.Tensor] = ()
    entropy_floor_nats: float | None = None

    def build(self) -> Training:
        from memprof.train import data, models, optim

        cell, device, training = self.cell, self.device, self.cell.training
        torch.manual_seed(training.seed)
        self.model = models.build_model(cell.model, cell.adapter, cell.shape.precision, device, cell.levers)
        construct = None
        if cell.levers.parallel.strategy != "none":
            from memprof.train import sharding

            self.model, construct = sharding.shard(self.model, cell.levers.parallel.strategy, device)
        self.loss = models.loss_function(cell.levers)
        self.optimizer = optim.build_optimizer(cell.optimizer.name, cell.optimizer.kwargs, training.lr, self.model,
                                               device, construct, training.lr_warmup_steps)
        self.scheduler = optim.build_schedule(training.schedule, self.optimizer, training.lr_warmup_steps,
                                              training.steps, training.schedule_kwargs)
        if optim.is_schedule_free(self.optimizer):
            self.optimizer.train()
        corpus = data.load_corpus(training.data)
        self.entropy_floor_nats = corpus.entropy_floor_nats
        shape = cell.shape
        self.batches = data.batches(corpus.train, shape.batch_size, shape.seq_len,
                                    training.seed + _DATA_STRIDE * _rank())
        self.held_out = data.eval_batches(corpus.eval, shape.batch_size, shape.seq_len, training.eval_batches)
        return self

    def train(self, probe: Probe, steps: int | None = None) -> list[StepLog]:
        """The cell's steps (and held-out evaluation) with ``probe`` observing; raises what ``train`` raises. With
        ``steps``: that many more steps of what is built, without the schedule or the held-out evaluation (the
        benchmarks that time blocks of steps on one build)."""
        from memprof.train.loop import train

        training, shape = self.cell.training, self.cell.shape
        if steps is not None:
            return train(self.model, self.optimizer, None, self.batches, steps, shape.grad_accum,
                         training.max_grad_norm, self.device, probe, loss=self.loss)
        return train(self.model, self.optimizer, self.scheduler, self.batches, training.steps, shape.grad_accum,
                     training.max_grad_norm, self.device, probe, self.held_out, training.eval_every, self.loss)
