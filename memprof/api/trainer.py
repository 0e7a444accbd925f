"""memprof in Hugging Face training: a ``transformers.Trainer`` callback (and so every Trainer subclass, TRL's
``SFTTrainer`` included) that runs :func:`memprof.track` around the Trainer's own loop."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from transformers import TrainerCallback

from memprof.api.describe import optimizer_of, plain
from memprof.api.track import Tracking, inner_optimizer, track
from memprof.config.spec import OptimizerSpec
from memprof.measure.accounting import optimizer_state_bytes


class MemprofCallback(TrainerCallback):
    """Measures a Trainer run with the same trackers as ``memprof run`` and writes the same results folder.

    Key figures (optimizer-state bytes, peak memory) are added to the Trainer's own logs under ``memprof/``. A
    step's loss is the one the Trainer logs: the mean over its ``logging_steps``, given to the last step they
    cover; the steps between have none.

    A Trainer that raises never calls ``on_train_end``, and transformers' ``TrainerCallback`` has no event for a
    training that ends in an exception (no ``on_exception``), so a callback cannot see such a run end. Train inside
    the callback's ``with`` block: its exit ends the run and keeps its record (``crashed``, or ``interrupted`` on
    Ctrl-C)::

        with MemprofCallback(out="results") as callback:
            Trainer(..., callbacks=[callback]).train()

    Outside the block, a run whose Trainer raised stays measured: its sampler thread keeps sampling (a timeline row
    every 10 ms on the CPU) and its hooks stay on the model and the optimizer, and ``memprof.track`` refuses to
    start, until the next ``on_train_begin`` of a ``MemprofCallback`` in the process drops it or
    ``callback.tracking.discard()`` ends it; either way it leaves no record.

    Args:
        out: results root; the run goes to ``out/<name>-<timestamp>/``. None writes nothing.
        name: the run's name in the results.
        warmup_steps: steps left out of timing; activations and gradients are counted at the step after.
        seq_len: tokens per sequence to record (default: the longest ``input_ids`` the model's forward took, which
            dynamic padding varies from batch to batch).
    """

    _unfinished: ClassVar[Tracking | None] = None  # a run whose Trainer raised outside a ``with`` block

    def __init__(self, out: str | Path | None = "results", name: str = "trainer", warmup_steps: int = 1,
                 seq_len: int = 0) -> None:
        self.out, self.name, self.warmup_steps, self.seq_len = out, name, warmup_steps, seq_len
        self.tracking: Tracking | None = None
        self._tokens_seen = 0

    def __enter__(self) -> MemprofCallback:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.tracking is not None:
            self.tracking.__exit__(exc_type, exc, tb)  # only a run on_train_end did not finish: it raised
            MemprofCallback._unfinished = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if MemprofCallback._unfinished is not None:  # its hooks and sampler would measure this run too
            MemprofCallback._unfinished.discard()
        inner = inner_optimizer(optimizer)
        self.tracking = track(model, inner, self.out, name=self.name, batch_size=args.per_device_train_batch_size,
                              seq_len=self.seq_len, grad_accum=args.gradient_accumulation_steps,
                              warmup_steps=self.warmup_steps,
                              optimizer_spec=trainer_optimizer(args, model, inner)).__enter__()
        MemprofCallback._unfinished = self.tracking
        self._tokens_seen = state.num_input_tokens_seen or 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracking is None:
            return
        seen = state.num_input_tokens_seen or 0
        tokens, self._tokens_seen = (seen - self._tokens_seen) or None, seen
        self.tracking.step(loss=None, tokens=tokens)  # the Trainer logs the loss afterwards: see on_log

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.tracking is None or logs is None:
            return
        if "loss" in logs:
            self.tracking.set_last_loss(logs["loss"])
        logs["memprof/optimizer_state_bytes"] = optimizer_state_bytes(self.tracking.optimizer).total

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracking is None:
            return
        self.tracking.__exit__(None, None, None)
        MemprofCallback._unfinished = None
        r = self.tracking.record
        state.log_history.append({"step": state.global_step, "memprof/optimizer_state_bytes": r.optimizer_state_bytes,
                                  "memprof/peak_bytes": r.peak_bytes,
                                  "memprof/tokens_per_s": r.tokens_per_s})


def trainer_optimizer(args: Any, model: Any, optimizer: Any) -> OptimizerSpec:
    """The optimizer the Trainer was asked for: ``args.optim`` with the keyword arguments transformers' own factory
    gives it (``optim_args``, betas, epsilon, weight decay...); an optimizer the user built and handed the Trainer
    (another class, or the same class with other settings) is named by its class path and defaults instead."""
    from transformers import Trainer

    name = str(getattr(args.optim, "value", args.optim))
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ValueError, ImportError, RuntimeError):  # a factory that cannot answer here: the name and its args
        return OptimizerSpec(label=name, name=name, kwargs={"optim_args": args.optim_args} if args.optim_args
                             else {})
    if not isinstance(optimizer, cls) or not _built_as(optimizer, cls, kwargs):
        return optimizer_of(optimizer)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("params", "lr")}
    return OptimizerSpec(label=name, name=name, kwargs=plain(kwargs))


def _built_as(optimizer: Any, cls: type, kwargs: dict[str, Any]) -> bool:
    """Whether every setting ``optimizer`` keeps in ``defaults`` is what ``cls(**kwargs)`` gives it: ``kwargs``'
    value, else the class's own default (a setting the signature does not name is not compared)."""
    given = {key: p.default for key, p in inspect.signature(cls).parameters.items()
             if p.default is not inspect.Parameter.empty} | kwargs
    return all(plain(given[key]) == plain(value) for key, value in optimizer.defaults.items() if key in given)
