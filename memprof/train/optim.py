"""Build a cell's optimizer and LR schedule with the libraries' own factories.

Catalogue names go through ``transformers.Trainer.get_optimizer_cls_and_kwargs``, so a name means here exactly
what it means in ``TrainingArguments.optim``; schedules go through ``transformers.get_scheduler``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memprof.config import catalogue
from memprof.config.spec import OptimizerSpec


# GaLore and APOLLO read their target modules and projection settings from TrainingArguments
# (optim_target_modules, optim_args), not from the optimizer's constructor.
_LOW_RANK = ("galore_", "apollo_")
_PROJECTION_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "proj", "scale_type")


# An LRScheduler, or a scheduler that steps on a metric (ReduceLROnPlateau, transformers' GreedyLR: no common base).
Scheduler = Any


# How an optimizer class becomes an optimizer: ``cls(params, **kwargs)``, or a wrapper around it (ZeRO-1's
# ZeroRedundancyOptimizer takes the class and builds this rank's partition of it).
Construct = Callable[..., torch.optim.Optimizer]


def _plain(cls: type, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return cls(params, **kwargs)


class OptimizerUnavailable(Exception):
    """The optimizer cannot run here: its library is not installed, or it needs CUDA (a cell's result)."""


class OptimizerRefused(Exception):
    """The optimizer does not build with the suite's kwargs: a mistake in the suite, found before any cell."""

    def __init__(self, label: str, message: str) -> None:
        super().__init__(message)
        self.label = label


def check_builds(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer | None:
    """The optimizer built over ``model``'s trainable parameters on the CPU, as a cell's setup builds it; None for
    one that cannot run here, which is a cell's result (unavailable), not a mistake.

    Raises:
        OptimizerRefused: its class, or transformers' factory, refuses the kwargs.
    """
    try:
        return build_optimizer(spec.name, spec.kwargs, 1e-3, model, torch.device("cpu"))
    except OptimizerUnavailable:
        return None
    except Exception as err:  # noqa: BLE001 - whatever the constructor raises, every cell's setup would raise
        raise OptimizerRefused(spec.label, " ".join(str(err).split()) or type(err).__name__) from err


def build_optimizer(name: str, kwargs: dict[str, Any], lr: float, model: nn.Module, device: torch.device,
                    construct: Construct | None = None, warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over the model's trainable parameters, with the suite's kwargs on top, made by
    ``construct(cls, params, **kwargs)`` (default: ``cls(params, **kwargs)``); ``warmup_steps`` is the LR
    warm-up, which transformers hands a schedule-free optimizer in place of the schedule it does not take."""
    params = [p for p in model.parameters() if p.requires_grad]
    if catalogue.is_custom(name):
        return _from_class_path(name, model, lr, kwargs, construct, custom=True)
    entry = catalogue.lookup(name)
    if not entry.installed:
        raise OptimizerUnavailable(f"{name} needs {entry.library}, which is not installed "
                                   f"(pip install {entry.install or entry.requires})")
    if entry.needs_cuda and device.type != "cuda":
        raise OptimizerUnavailable(f"{name} needs a CUDA device")
    if entry.factory != "transformers":
        return _from_class_path(entry.factory, model, lr, kwargs, construct)

    from transformers import Trainer, TrainingArguments

    kwargs, low_rank = dict(kwargs), {}
    if name.startswith(_LOW_RANK):
        projection = [f"{key}={kwargs.pop(key)}" for key in _PROJECTION_KEYS if key in kwargs]
        low_rank = {"optim_target_modules": kwargs.pop("target_modules", "all-linear"),
                    "optim_args": ",".join(projection) or None}
    # TrainingArguments makes cuda:0 the current device outside a launcher: a sharded rank's own card stays current
    keep = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with keep, tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, optim=name, learning_rate=lr, warmup_steps=warmup_steps,
                                 report_to="none", use_cpu=device.type == "cpu", **low_rank)
        cls, defaults = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = defaults.pop("params", params)  # GaLore/APOLLO: transformers split projected and plain groups
    return (construct or _plain)(cls, params, **{**defaults, **kwargs})


def _from_class_path(path: str, model: nn.Module, lr: float, kwargs: dict[str, Any],
                     construct: Construct | None, custom: bool = False) -> torch.optim.Optimizer:
    """The class at ``module:Class`` built over the model. One the suite names itself (``custom``) that is not
    there is a mistake (misspelled, or its package not installed), which the checks before any cell refuse; a
    catalogue entry's, whose library was found installed, is unavailable."""
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as err:
        raise (ImportError if custom else OptimizerUnavailable)(f"cannot import {module_name}: {err}") from err
    except AttributeError as err:
        raise (AttributeError if custom else OptimizerUnavailable)(f"{module_name} has no {class_name}") from err
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if next(iter(inspect.signature(cls).parameters), "") == "named_parameters":
        if construct is not None:
            raise OptimizerUnavailable(f"{class_name} takes named parameters, which cannot be partitioned by rank")
        return cls(named, **{"lr": lr, **_head_layout(model), **kwargs})
    return (construct or _plain)(cls, [p for _, p in named], **{"lr": lr, **kwargs})


def _head_layout(model: nn.Module) -> dict[str, Any]:
    """Adam-mini partitions its state by name and attention head, so it needs the model's width and heads."""
    config = model.config
    heads = config.num_attention_heads
    return {"dim": config.hidden_size, "n_heads": heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or heads, "verbose": False}


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and must be told train()/eval()."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def build_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                   kwargs: dict[str, Any] | None = None) -> Scheduler | None:
    """The LR schedule ``transformers.get_scheduler`` builds for ``name``; None for schedule-free optimizers,
    which need none. ``kwargs`` are the schedule's own (``min_lr_rate``, ``num_decay_steps``...)."""
    if is_schedule_free(optimizer):
        return None
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


# Schedules transformers.get_scheduler passes none of a suite's kwargs to: a kwarg for them would be dropped unread.
_NO_KWARGS = ("constant", "constant_with_warmup")
# What get_scheduler itself passes a schedule: a kwarg of the same name would be given twice.
_PASSED = ("optimizer", "num_warmup_steps", "num_training_steps")


class ScheduleRefused(Exception):
    """A schedule transformers does not build with the suite's kwargs; ``key`` names the kwarg at fault ('' where
    the schedule refuses the table as a whole)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_schedule(name: str, kwargs: dict[str, Any], warmup_steps: int, total_steps: int) -> None:
    """Schedule ``name`` with ``kwargs`` built as a cell's setup builds it, over a one-parameter SGD, after its kwargs
    were checked against the schedule function's parameters (which names the one at fault).

    Raises:
        ScheduleRefused: a kwarg the schedule does not take, or the schedule refusing the values.
    """
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
    takes = [] if name in _NO_KWARGS else [p for p in parameters if p not in _PASSED]
    if name in _NO_KWARGS or all(p.kind is not p.VAR_KEYWORD for p in parameters.values()):
        unknown = next((key for key in kwargs if key not in takes), None)
        if unknown is not None:
            said = f"it takes {', '.join(takes)}" if takes else "transformers passes it none"
            raise ScheduleRefused(unknown, f"no parameter '{unknown}' ({said})")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    try:
        build_schedule(name, optimizer, warmup_steps, total_steps, kwargs)
    except Exception as err:  # noqa: BLE001 - whatever the schedule raises, every cell's setup would raise
        raise ScheduleRefused("", " ".join(str(err).split()) or type(err).__name__) from err


def steps_on_metric(scheduler: Scheduler) -> bool:
    """ReduceLROnPlateau and GreedyLR step on a metric (the eval loss), not once per optimizer step."""
    from transformers.optimization import GreedyLR

    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))
