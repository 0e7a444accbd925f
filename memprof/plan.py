"""Capacity planning: a fine-tuning run's peak memory, predicted without weights, a download or a GPU.

The exact parts come from the model built on the meta device (shapes and dtypes, no memory):
- frozen weights, 4-bit ones with their bitsandbytes quant state (``memprof.meta.four_bit_bytes``);
- adapter (trainable) weights and buffers, after peft wrapped the meta model as a cell would be wrapped;
- gradients: one per trainable parameter, in its dtype;
- optimizer state: ``memprof.formulas`` over the optimizer that transformers' factory builds on the meta model.
Saved activations and temporaries come from the coefficients fitted to measured runs (``memprof.calibration``);
on a GPU the CUDA context is added. ``tests/test_plan.py`` checks the exact parts against measured cells byte for
byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from memprof.calibration import Calibration, Group, Shape
from memprof.cell import Cell
from memprof.errors import UserError
from memprof.gpus import Gpu
from memprof.meta import adapted_numel, frozen_weight_bytes, meta_model

MAX_SEARCH = 1 << 24              # no batch or sequence search goes beyond this


@dataclass(frozen=True)
class Request:
    """One configuration to plan: what a cell fixes, minus what does not change memory (lr, schedule, seed)."""

    model: str
    model_spec: dict[str, Any]
    adapter: str
    adapter_spec: dict[str, Any]
    optimizer: str
    optim: str
    batch_size: int
    seq_len: int
    precision: str = "bf16"
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    optim_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_cell(cls, cell: Cell) -> Request:
        return cls(cell.model, cell.model_spec, cell.adapter, cell.adapter_spec, cell.optimizer, cell.optim,
                   cell.batch_size, cell.seq_len, cell.precision, cell.grad_accum, False, cell.optim_kwargs)

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch: what activations scale with (gradient accumulation does not add any)."""
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Exact:
    """The parts of the peak that are known exactly from shapes and formulas."""

    shape: Shape
    total_params: int
    trainable_params: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int | None
    optimizer_state_note: str
    adapted_numel: int       # base weight elements under an adapter
    residual_itemsize: int   # element size of the hidden states between layers (what checkpointing keeps)


@dataclass(frozen=True)
class Part:
    """One line of a plan: its bytes (None when no formula covers it) and how they were obtained."""

    name: str
    bytes: int | None
    how: str


@dataclass(frozen=True)
class Plan:
    """The predicted peak of one request on a GPU, part by part."""

    request: Request
    exact: Exact
    parts: tuple[Part, ...]
    calibration: str

    @property
    def complete(self) -> bool:
        """False when a part is unknown: the total is then a lower bound."""
        return all(p.bytes is not None for p in self.parts)

    @property
    def training_bytes(self) -> int:
        """Everything but the CUDA context: what a CPU run's RSS growth measures."""
        return sum(p.bytes or 0 for p in self.parts if p.name != "CUDA context")

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes or 0 for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {"model": r.model, "adapter": r.adapter, "optimizer": r.optimizer, "batch_size": r.batch_size,
                "seq_len": r.seq_len, "precision": r.precision, "grad_accum": r.grad_accum,
                "gradient_checkpointing": r.gradient_checkpointing, "total_params": self.exact.total_params,
                "trainable_params": self.exact.trainable_params, "calibration": self.calibration,
                "parts": {p.name: {"bytes": p.bytes, "how": p.how} for p in self.parts},
                "total_bytes": self.total_bytes, "complete": self.complete}


@dataclass(frozen=True)
class Verdict:
    """A plan against one GPU: does it fit, with what headroom, and the largest batch and length that would."""

    gpu: Gpu
    total_bytes: int
    max_batch_size: int      # at the request's sequence length; 0 when not even one sequence fits
    max_seq_len: int         # at the request's batch size; 0 when nothing fits
    seq_len_capped: bool     # max_seq_len stopped at the model's max_position_embeddings

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu.capacity_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.gpu.capacity_bytes - self.total_bytes

    @property
    def headroom_fraction(self) -> float:
        return self.headroom_bytes / self.gpu.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "capacity_bytes": self.gpu.capacity_bytes, "fits": self.fits,
                "headroom_bytes": self.headroom_bytes, "headroom_fraction": self.headroom_fraction,
                "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                "seq_len_capped": self.seq_len_capped}


def optimizer_state(model: nn.Module, optim: str, optim_kwargs: dict[str, Any]) -> tuple[int | None, str]:
    """Predicted optimizer-state bytes and how: the optimizer is built on the meta model by transformers'
    factory (so param groups, GaLore's projected groups and Adam-mini's names are the real ones), then
    ``memprof.formulas`` sizes its state. A library that is not installed still gets its formula."""
    from memprof import formulas, optim as optim_mod

    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        built = optim_mod.build_optimizer(optim, optim_kwargs, 1e-3, model, torch.device("cpu"))
        predicted = formulas.predict_for_optimizer(optim, built)
    except optim_mod.OptimizerUnavailable:
        predicted = formulas.predict_state_bytes(optim, trainable, optim_kwargs)
    if predicted is not None:
        return predicted, "exact (memprof.formulas)"
    return None, formulas.why_unpredictable(optim) or "no formula covers this configuration"


def exact_parts(request: Request, model: nn.Module | None = None) -> Exact:
    """The exact parts of a request (``model``: its meta model, when the caller already built it)."""
    from memprof import models
    from memprof.trackers.accounting import weight_bytes

    if model is None:
        model = meta_model(request.model_spec, request.adapter_spec, request.precision)
    weights = weight_bytes(model)
    state, note = optimizer_state(model, request.optim, request.optim_kwargs)
    shape = Shape.from_config(models.build_config(request.model_spec))
    return Exact(shape=shape, total_params=weights.frozen_params + weights.trainable_params,
                 trainable_params=weights.trainable_params, frozen_weight_bytes=frozen_weight_bytes(model),
                 trainable_weight_bytes=weights.trainable.total, buffer_bytes=weights.buffers.total,
                 gradient_bytes=weights.trainable.total, optimizer_state_bytes=state, optimizer_state_note=note,
                 adapted_numel=adapted_numel(model),
                 residual_itemsize=model.get_input_embeddings().weight.element_size())


# --- predictions ----------------------------------------------------------------------------------------------


def predict(request: Request, exact: Exact, calibration: Calibration) -> Plan:
    """The plan for ``request`` from its exact parts and the calibrated activations and temporaries."""
    group = calibration.group(request.precision, request.adapter_spec["kind"])
    return _assemble(request, exact, group, calibration)


def _assemble(request: Request, exact: Exact, group: Group, calibration: Calibration) -> Plan:
    tokens = request.tokens
    act = group.activation_bytes(exact.shape, tokens, exact.adapted_numel, request.gradient_checkpointing,
                                 exact.residual_itemsize)
    temp = max(0, group.temporary_bytes(act, tokens, exact.shape.vocab))
    fitted = f"fitted ({calibration.device} calibration)"
    quant = " (4-bit + quant state)" if request.adapter_spec["kind"] == "qlora" else ""
    parts = (
        Part("frozen weights", exact.frozen_weight_bytes, "exact" + quant),
        Part("adapter weights" if request.adapter_spec["kind"] != "none" else "trainable weights",
             exact.trainable_weight_bytes, "exact"),
        Part("buffers", exact.buffer_bytes, "exact"),
        Part("gradients", exact.gradient_bytes, "exact"),
        Part("optimizer state", exact.optimizer_state_bytes, exact.optimizer_state_note),
        Part("activations", act, fitted + (", derived for checkpointing" if request.gradient_checkpointing else "")),
        Part("temporaries", temp, fitted),
        Part("CUDA context", calibration.cuda_context_bytes, calibration.cuda_context_source),
    )
    return Plan(request, exact, parts, calibration.path or calibration.device)


def largest(fits: Callable[[int], bool], start: int = 1, limit: int = MAX_SEARCH) -> int:
    """The largest n in [start, limit] with ``fits(n)`` (0 when not even ``start`` fits), for a monotone
    ``fits``: doubling, then bisection."""
    if not fits(start):
        return 0
    good = start
    bad = None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if fits(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def verdict(plan: Plan, gpu: Gpu, calibration: Calibration) -> Verdict:
    """``plan`` against ``gpu``, with the largest batch (same length) and length (same batch) predicted to fit."""
    request, exact = plan.request, plan.exact
    group = calibration.group(request.precision, request.adapter_spec["kind"])

    def total(batch_size: int, seq_len: int) -> int:
        return _assemble(replace(request, batch_size=batch_size, seq_len=seq_len), exact, group,
                         calibration).total_bytes

    max_batch = largest(lambda b: total(b, request.seq_len) <= gpu.capacity_bytes)
    cap = exact.shape.max_positions or MAX_SEARCH
    max_seq = largest(lambda s: total(request.batch_size, s) <= gpu.capacity_bytes, limit=cap)
    return Verdict(gpu, plan.total_bytes, max_batch, max_seq, max_seq == cap)


def plan_requests(requests: Iterable[Request], calibration: Calibration) -> list[Plan]:
    """Plans for many requests, building each meta model (and each optimizer's state) once."""
    models: dict[str, nn.Module] = {}
    exacts: dict[str, Exact] = {}
    plans = []
    for request in requests:
        model_key = repr((request.model_spec, request.adapter_spec, request.precision))
        if model_key not in models:
            models[model_key] = meta_model(request.model_spec, request.adapter_spec, request.precision)
        exact_key = model_key + repr((request.optim, request.optim_kwargs))
        if exact_key not in exacts:
            exacts[exact_key] = exact_parts(request, models[model_key])
        plans.append(predict(request, exacts[exact_key], calibration))
    return plans


def requests_from_cells(cells: Iterable[Cell]) -> list[Request]:
    """One request per memory-distinct cell (repeats, learning rates, schedules and seeds collapse)."""
    seen: dict[str, Request] = {}
    for cell in cells:
        request = Request.from_cell(cell)
        seen.setdefault(repr(request), request)
    return list(seen.values())


def request_from_flags(model: str, adapter: str = "qlora", rank: int = 16, target_modules: str = "all-linear",
                       optimizer: str = "adamw_torch", batch_size: int = 1, seq_len: int = 2048,
                       precision: str = "bf16", grad_accum: int = 1, gradient_checkpointing: bool = False) -> Request:
    """A request from command-line values: ``model`` is a preset name or a local config/checkpoint folder.

    Raises:
        UserError: naming the flag that is wrong.
    """
    from pathlib import Path

    from memprof import catalogue
    from memprof.presets import PRESETS
    from memprof.suite import AdapterSettings, ModelSettings

    if model in PRESETS:
        model_spec = ModelSettings(preset=model).model_dump()
    elif (Path(model) / "config.json").is_file():
        model_spec = ModelSettings(path=model).model_dump()
    else:
        raise UserError("--model", f"'{model}' is neither a preset ({', '.join(PRESETS)}) nor a folder with a "
                        "config.json")
    if adapter not in ("none", "lora", "qlora", "dora"):
        raise UserError("--adapter", f"must be none, lora, qlora or dora, not '{adapter}'")
    for flag, value in (("--rank", rank), ("--batch-size", batch_size), ("--seq-len", seq_len),
                        ("--grad-accum", grad_accum)):
        if value <= 0:
            raise UserError(flag, f"must be positive, got {value}")
    targets: str | list[str] = target_modules
    if target_modules not in ("all-linear", "attention"):
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    adapter_spec = AdapterSettings(kind=adapter, r=rank, alpha=2.0 * rank, target_modules=targets).model_dump()
    adapter_spec["target_modules"] = list(targets) if isinstance(targets, list) else targets
    if not catalogue.is_custom(optimizer):
        try:
            catalogue.lookup(optimizer)
        except KeyError as err:
            raise UserError("--optimizer", err.args[0]) from None
    name = Path(model).name if model not in PRESETS else model
    return Request(name, model_spec, adapter, adapter_spec, optimizer, optimizer, batch_size, seq_len, precision,
                   grad_accum, gradient_checkpointing)
