"""Capacity planning: a fine-tuning run's peak memory, predicted part by part without weights, a download or a GPU.

Every part says how it was obtained, and how far it may be off:
- exact, from the model built on the meta device (shapes and dtypes, no memory): frozen weights (4-bit ones with
  their bitsandbytes quant state, and what peft's k-bit preparation casts to fp32 apart), trainable weights,
  buffers, gradients, optimizer state (``memprof.measure.formulas`` over the optimizer transformers' factory builds
  on the meta model) and the part of it a paged optimizer keeps outside the allocator;
- analytic, from ``memprof.measure.step_memory`` (checked to the byte on an H200): the step's moment with the most
  bytes and what is alive then: saved activations, the loss's fp32 logits gradients, the layer at work, cuBLAS
  workspaces;
- fitted or measured on the device kind the plan is for (``memprof.plan.calibration``): the small unnamed
  remainder, and on CUDA the allocator's cache and the memory outside PyTorch;
- for cells the analytic model does not cover, saved activations and temporaries fitted to CPU runs.
``tests/test_plan.py`` checks the exact parts against measured cells byte for byte; ``benchmarks/plan_accuracy.py``
holds the whole plan against the H200 runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError
from torch import nn

from memprof.measure import meta_step, step_memory
from memprof.measure.attribution import OUTSIDE, PARTS, name_parts
from memprof.plan.calibration import Calibration, DeviceCalibration, Shape, cache_pressure, other_feature
from memprof.config.spec import (ADAPTER_KINDS, AXES, AXIS_BY_NAME, LORA_DEFAULTS, MAX_BATCH_SIZE, MAX_SEQ_LEN,
                                 MAX_WORLD_SIZE, AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec,
                                 ParallelSpec, ShapeSpec)
from memprof.errors import UserError
from memprof.plan.gpus import Gpu
from memprof.train.fourbit import is_four_bit
from memprof.train.models import LeverUnavailable
from memprof.train.sharding import Gathered
from memprof.train.meta import adapted_numel, four_bit_bytes, frozen_weight_bytes, meta_model



@dataclass(frozen=True)
class RankParts:
    """What one rank holds of the exact parts (every rank holds everything when nothing is sharded)."""

    frozen_weight_bytes: int
    trainable_weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int | None


@dataclass(frozen=True)
class Exact:
    """The parts of the peak that are known exactly from shapes and formulas; for a sharded request, the
    fullest rank's (``ranks`` has each rank's)."""

    shape: Shape
    total_params: int
    trainable_params: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int | None
    optimizer_state_note: str
    frozen_four_bit_bytes: int     # the part of frozen_weight_bytes that is 4-bit (with quant state)
    paged_state_bytes: int | None  # the part of optimizer_state_bytes a paged optimizer keeps outside the allocator
    adapted_numel: int       # base weight elements under an adapter
    residual_itemsize: int   # element size of the hidden states between layers (what checkpointing keeps)
    ranks: tuple[RankParts, ...] = ()
    gathered: Gathered = Gathered()  # FSDP2: what a rank all-gathers (none for another strategy)


# Parts a plan has beyond those of a measured peak (memprof.measure.attribution.PARTS and OUTSIDE)
PLAN_PARTS = {"temporaries": "temporaries (fitted)", "ddp_buckets": "DDP gradient buckets"}


def part_label(name: str) -> str:
    """How tables name a part of a plan."""
    known = {**PARTS, **OUTSIDE}
    return known[name].label if name in known else PLAN_PARTS[name]


@dataclass(frozen=True)
class Part:
    """One line of a plan: its bytes (None when no formula covers it), how they were obtained (exact, analytic,
    fitted, measured, assumed, and from what), how far they may be off (a fraction of the bytes), and whether the
    torch allocator holds them (paged state, the allocator's cache and what lies outside PyTorch it does not)."""

    name: str
    bytes: int | None
    how: str
    error: float = 0.0
    allocated: bool = True

    @property
    def kind(self) -> str:
        return self.how.split(" ", 1)[0].rstrip(":,")


@dataclass(frozen=True)
class Plan:
    """The predicted peak of one request, part by part, on ``device`` (cuda: the allocator's peak and the card's
    whole use; cpu: the growth of resident memory), at ``moment`` of the step (none where fitted), got by
    ``method``."""

    request: CellConfig
    exact: Exact
    parts: tuple[Part, ...]
    calibration: str
    device: str = "cuda"
    moment: str = ""
    method: str = "analytic"  # analytic (step_memory's formulas), meta (the step on the meta device) or fitted

    @property
    def complete(self) -> bool:
        """False when a part is unknown: the total is then a lower bound."""
        return all(p.bytes is not None for p in self.parts)

    @property
    def allocated_bytes(self) -> int:
        """What the torch allocator holds at the peak (on the CPU: the RSS growth a run measures)."""
        return sum(p.bytes or 0 for p in self.parts if p.allocated)

    @property
    def total_bytes(self) -> int:
        """Everything the card (or host) holds at the peak."""
        return sum(p.bytes or 0 for p in self.parts)

    @property
    def pageable_bytes(self) -> int:
        """Paged optimizer state: CUDA managed memory, which the driver moves to host memory when the card is full
        (slower steps, no OOM)."""
        return sum(p.bytes or 0 for p in self.parts if p.name == "optimizer_state_paged_bytes")

    @property
    def needed_bytes(self) -> int:
        """What must be on the card: the total less the pageable state."""
        return self.total_bytes - self.pageable_bytes

    @property
    def uncertainty_bytes(self) -> int:
        """How far the total may be off: each part's bytes times its error, summed (the worst case)."""
        return round(sum((p.bytes or 0) * p.error for p in self.parts))

    def to_dict(self) -> dict[str, Any]:
        return {**_axes(self.request), "config": self.request.model_dump(mode="json"),
                "total_params": self.exact.total_params, "trainable_params": self.exact.trainable_params,
                "calibration": self.calibration, "device": self.device, "moment": self.moment, "method": self.method,
                "parts": {p.name: {"bytes": p.bytes, "how": p.how, "error": p.error, "allocated": p.allocated}
                          for p in self.parts},
                "ranks": [vars(rank) for rank in self.exact.ranks], "allocated_bytes": self.allocated_bytes,
                "total_bytes": self.total_bytes, "pageable_bytes": self.pageable_bytes,
                "uncertainty_bytes": self.uncertainty_bytes, "complete": self.complete}


def _axes(request: CellConfig) -> dict[str, Any]:
    """A request's axes as ``--json`` gives them (as cells.csv does; a plan has no LR nor schedule)."""
    return {key: value for axis in AXES if axis.name not in ("lr", "schedule")
            for key, value in axis.columns(request).items()}


@dataclass(frozen=True)
class GpuFit:
    """A plan against one GPU: does it fit, with what headroom, and the largest batch and length that would."""

    gpu: Gpu
    total_bytes: int
    uncertainty_bytes: int   # the plan's: the answer is "yes" or "no" only when the total is that far from the card
    pageable_bytes: int      # paged optimizer state: may move to host memory, so not needed on the card
    max_batch_size: int      # at the request's sequence length (surely fitting); 0 when not even one sequence fits
    max_seq_len: int         # at the request's batch size; 0 when nothing fits
    seq_len_capped: bool     # max_seq_len stopped at the model's max_position_embeddings

    @property
    def needed_bytes(self) -> int:
        """What must be on the card: the total less the paged state the driver may move to host memory."""
        return self.total_bytes - self.pageable_bytes

    @property
    def fits(self) -> bool:
        """Fits even if every part is off by its error the wrong way."""
        return self.needed_bytes + self.uncertainty_bytes <= self.gpu.capacity_bytes

    @property
    def answer(self) -> str:
        """yes (fits even at the plan's worst), no (does not fit even at its best) or borderline."""
        if self.fits:
            return "yes"
        return "no" if self.needed_bytes - self.uncertainty_bytes > self.gpu.capacity_bytes else "borderline"

    @property
    def headroom_bytes(self) -> int:
        return self.gpu.capacity_bytes - self.needed_bytes

    @property
    def headroom_fraction(self) -> float:
        return self.headroom_bytes / self.gpu.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "capacity_bytes": self.gpu.capacity_bytes, "fits": self.answer,
                "uncertainty_bytes": self.uncertainty_bytes, "pageable_bytes": self.pageable_bytes,
                "headroom_bytes": self.headroom_bytes, "headroom_fraction": self.headroom_fraction,
                "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
                "seq_len_capped": self.seq_len_capped}


@dataclass(frozen=True)
class StatePlan:
    """Predicted optimizer state: its bytes (None without a formula), how, and the param groups and settings
    it was sized from (what a sharded plan re-partitions)."""

    bytes: int | None
    note: str
    groups: list[dict[str, Any]]
    settings: dict[str, Any]


def optimizer_state(model: nn.Module, optimizer: OptimizerSpec) -> StatePlan:
    """Predicted optimizer-state bytes and how: the optimizer is built on the meta model by transformers'
    factory (so param groups, GaLore's projected groups and Adam-mini's names are the real ones), then
    ``memprof.measure.formulas`` sizes its state. A library that is not installed still gets its formula.

    Raises:
        OptimizerRefused: the optimizer does not build with its kwargs (as every cell's setup would fail).
    """
    from memprof.measure import formulas
    from memprof.train.optim import check_builds

    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    settings = dict(optimizer.kwargs)
    built = check_builds(optimizer, model)
    if built is not None:
        groups, settings = built.param_groups, formulas.optimizer_settings(built)
    specs = [{**g, "params": [formulas.ParamSpec(tuple(p.shape), p.dtype, p.requires_grad) for p in g["params"]]}
             for g in groups]
    predicted = formulas.predict_state_bytes(optimizer.name, specs, settings)
    note = "exact (memprof.measure.formulas)" if predicted is not None else \
        formulas.why_unpredictable(optimizer.name) or "no formula covers this configuration"
    return StatePlan(predicted, note, specs, settings)


def exact_parts(request: CellConfig, model: nn.Module | None = None) -> Exact:
    """The exact parts of a request (``model``: its meta model, when the caller already built it); for a
    sharded request, each rank's and the fullest rank's.

    Raises:
        OptimizerRefused: the optimizer does not build with the request's kwargs (``optimizer_state``).
    """
    from memprof.measure import formulas
    from memprof.measure.accounting import weight_bytes
    from memprof.train import models, sharding

    if model is None:
        model = meta_model(request.model, request.adapter, request.shape.precision)
    weights = weight_bytes(model)
    state = optimizer_state(model, request.optimizer)
    shape = Shape.from_config(models.build_config(request.model))
    ranks = rank_parts(request, model, state)
    fullest = {name: max(getattr(r, name) for r in ranks) if all(getattr(r, name) is not None for r in ranks)
               else None for name in ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes",
                                      "optimizer_state_bytes")}
    four_bit = sum(four_bit_bytes(p.numel(), p.blocksize, p.compress_statistics)
                   for p in model.parameters() if is_four_bit(p))
    paged = formulas.predict_paged_bytes(request.optimizer.name, state.groups, state.settings)
    return Exact(shape=shape, total_params=weights.frozen_params + weights.trainable_params,
                 trainable_params=weights.trainable_params, buffer_bytes=weights.buffers.total,
                 optimizer_state_note=state.note, frozen_four_bit_bytes=four_bit, paged_state_bytes=paged,
                 adapted_numel=adapted_numel(model),
                 residual_itemsize=model.get_input_embeddings().weight.element_size(),
                 ranks=ranks if request.levers.parallel.world_size > 1 else (),
                 gathered=sharding.gathered(model) if request.levers.parallel.strategy == "fsdp2" else Gathered(),
                 **fullest)


def rank_parts(request: CellConfig, model: nn.Module, state: StatePlan) -> tuple[RankParts, ...]:
    """What each rank holds: zero1 partitions the optimizer state by whole parameters; fsdp2 shards every
    parameter on dim 0, its storage padded to the full chunk, and its state sized on the unpadded local shard
    (QLoRA's 4-bit base weights stay whole, see ``memprof.train.sharding``)."""
    from memprof.measure import formulas
    from memprof.train import sharding

    n, strategy = request.levers.parallel.world_size, request.levers.parallel.strategy
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    four_bit = frozen_weight_bytes(model) - sum(p.numel() * p.element_size() for p in frozen if not is_four_bit(p))

    def held(params: list[nn.Parameter]) -> int:
        if strategy != "fsdp2":
            return sum(p.numel() * p.element_size() for p in params)
        return sum(sharding.padded_shard_numel(p.shape, n) * p.element_size() for p in params)

    plain_frozen = held([p for p in frozen if not is_four_bit(p)])
    states: list[int | None] = [state.bytes] * n
    if strategy == "zero1":
        parts = sharding.zero1_partition([[math.prod(p.shape) for p in g["params"]] for g in state.groups], n)
        states = [formulas.predict_state_bytes(request.optimizer.name, [
            {**g, "params": [g["params"][i] for i in owned[k]]} for k, g in enumerate(state.groups)],
            state.settings) for owned in parts]
    elif strategy == "fsdp2":
        states = [formulas.predict_state_bytes(request.optimizer.name, [
            {**g, "params": [replace(p, shape=sharding.local_shapes(p.shape, n)[rank]) for p in g["params"]]}
            for g in state.groups], state.settings) for rank in range(n)]
    return tuple(RankParts(four_bit + plain_frozen, held(trainable), held(trainable), s) for s in states)


# --- predictions ----------------------------------------------------------------------------------------------

ANALYTIC_ERROR = 0.002       # the analytic moments matched the H200's allocator peaks within 0.103%
ESTIMATE_ERROR = 0.15        # moments estimated from CPU replays, never checked against a measured peak
NON_PYTORCH_ERROR = 0.05     # NVML's non-PyTorch figure moved 2% between the H200's cells
ASSUMED_ERROR = 0.5          # nothing measured
# the step measured on the meta device (memprof.measure.meta_step): on the CPU its peak is a replay's less the CPU
# kernels' own scratch, which no op makes (up to 17% on a small Phi-3's recomputed layer, tests/test_meta_step.py); on
# CUDA it follows the kernel rules of the analytic model, and planned this way the H200's cells come out within 0.1%
# of their allocator peaks (benchmarks/plan_accuracy.py), though other architectures' kernels were never measured
META_ERROR = {"cpu": 0.2, "cuda": ESTIMATE_ERROR}
# the fitted activations on architectures outside the analytic model, whose layers they were not fitted to (where
# the meta device cannot run them): the largest miss in benchmarks/fallback_accuracy.py (Gemma2 +86% of the
# prediction; Qwen3-MoE's QLoRA +169%)
ARCHITECTURE_ERROR = 0.9
MOE_ERROR = 1.7
# the temporaries fitted to CPU runs (RSS growth, glibc's heap included) on CUDA: planned with the fitted
# coefficients, the H200's and the H100's cells' allocator peaks are off by up to 90% and 143% of those temporaries'
# bytes (mostly over; benchmarks/plan_accuracy.py, results/benchmarks and results/benchmarks/h100)
FITTED_TEMPORARIES_CUDA_ERROR = 1.45


def predict(request: CellConfig, exact: Exact, calibration: Calibration, device: str = "cuda") -> Plan:
    """The plan for ``request`` on ``device`` (cuda or cpu): analytic where ``memprof.measure.step_memory`` covers
    the request and the calibration holds the device kind's measured parts, else from the step run on the meta
    device, else fitted."""
    measured = calibration.devices.get(device)
    shape = step_memory.step_shape(request, device) if measured is not None else None
    if shape is not None:
        return _analytic(request, exact, shape, calibration, measured)
    return meta_plan(request, exact, calibration, device) or fitted_plan(request, exact, calibration, device)


def _weights(request: CellConfig, exact: Exact) -> list[Part]:
    """The exact parts every plan has: weights (4-bit and k-bit's fp32 casts apart), buffers and optimizer state."""
    strategy = request.levers.parallel.strategy
    per_rank = f", per rank ({strategy} shards it)" if strategy in ("zero1", "fsdp2") else ""
    sharded = per_rank if strategy == "fsdp2" else ""
    kbit = request.adapter.kind == "qlora" and request.adapter.quant.prepare_for_kbit_training
    cast = exact.frozen_weight_bytes - exact.frozen_four_bit_bytes if kbit else 0
    parts = [Part("frozen_weights", exact.frozen_weight_bytes - cast,
                  "exact" + (" (4-bit + quant state)" if exact.frozen_four_bit_bytes else "") + sharded)]
    if cast:
        parts.append(Part("kbit_fp32_weights", cast, "exact: embeddings, norms and head that peft's "
                                                     "prepare_model_for_kbit_training casts to fp32"))
    state = exact.optimizer_state_bytes
    paged = exact.paged_state_bytes or 0
    parts += [Part("trainable_weights", exact.trainable_weight_bytes, "exact" + sharded),
              Part("buffers", exact.buffer_bytes, "exact"),
              Part("optimizer_state", None if state is None else state - paged, exact.optimizer_state_note + per_rank)]
    if paged:
        parts.append(Part("optimizer_state_paged_bytes", paged, "exact: state buffers of tensors >= 1e5 elements, in "
                          "CUDA managed memory", allocated=False))
    return parts


def _ddp_buckets(request: CellConfig, exact: Exact) -> list[Part]:
    """DDP's flat copies of the gradients, under ddp and zero1."""
    if request.levers.parallel.strategy in ("ddp", "zero1"):
        return [Part("ddp_buckets", exact.gradient_bytes, "derived: DDP's flat copies of the gradients")]
    return []


def _gathered_part(gathered: Gathered, layers: int) -> Part:
    """FSDP2's all-gathered weights: the root unit's and ``layers`` decoder layers' (0 to 2)."""
    named = ("", " and one layer", " and two layers")[layers]
    return Part("gathered_weights", gathered.with_layers(layers), f"derived: the root unit{named} unsharded")


def _analytic(request: CellConfig, exact: Exact, shape: step_memory.StepShape, calibration: Calibration,
              measured: DeviceCalibration) -> Plan:
    weights = _weights(request, exact)
    held = sum(p.bytes or 0 for p in weights if p.allocated and p.name != "optimizer_state")
    state = next(p.bytes for p in weights if p.name == "optimizer_state")
    moments = step_memory.with_gathered(step_memory.moments(
        shape, weights=held, optimizer=state or 0, gradients=exact.gradient_bytes), exact.gathered)
    moment = max(moments, key=lambda name: sum(moments[name].values()))
    error = ESTIMATE_ERROR if moment in step_memory.ESTIMATES else ANALYTIC_ERROR
    how = "analytic" + (" (an estimate from CPU replays)" if error == ESTIMATE_ERROR else "")
    exact_names = {p.name for p in weights}
    parts = weights + [_gathered_part(exact.gathered, step_memory.gathered_layers(moment))
                       if name == "gathered_weights" else Part(name, nbytes, how, error)
                       for name, nbytes in name_parts(moments[moment]).items() if name not in exact_names]
    parts += _ddp_buckets(request, exact)
    peak = sum(p.bytes or 0 for p in parts if p.allocated)
    parts.append(_other(measured, other_feature(shape.tokens, shape.layers, shape.hidden, shape.intermediate),
                        shape.adapter, peak))
    if measured.device == "cuda":
        parts += _outside_pytorch(calibration, peak, cache_pressure(shape))
    return Plan(request, exact, tuple(parts), measured.source, measured.device, moment)


def meta_plan(request: CellConfig, exact: Exact, calibration: Calibration, device: str) -> Plan | None:
    """The plan of a model outside the analytic model from its step run on the meta device: the step's peak (its
    activations, the loss's logits, the layer at work and the gradients made by then), the end of backward or the
    optimizer step, whichever holds most, with cuBLAS's workspaces, the batch and the device's fitted remainder.
    None where the meta device cannot run the step, or for FSDP2 (whose shards one process does not hold)."""
    found = meta_step.moments(request, device, exact.gradient_bytes)
    if found is None:
        return None
    step, by_moment = found
    measured = calibration.devices.get(device)
    gradients = exact.gradient_bytes
    at_peak = dict(by_moment[step.moment])
    dequantised = at_peak.pop(meta_step.DEQUANTISED, 0)  # inside bitsandbytes' kernel: the layer at work's
    how = "measured on the meta device" + (" (a later micro-batch, beside every gradient)"
                                           if request.shape.grad_accum > 1 else "")
    moments = {
        f"{step.moment} (meta device)": [
            Part(name, nbytes + (dequantised if name == "layer" else 0),
                 how + (f" + {meta_step.DEQUANTISED} (derived)" if name == "layer" and dequantised else ""),
                 META_ERROR[device]) for name, nbytes in at_peak.items()],
        "backward end": [Part("gradients", gradients, "exact")],
        "optimizer step": [Part("gradients", gradients, "exact"), Part(
            "optimizer_temporaries", by_moment["optimizer step"]["foreach_temporaries"],
            "derived: the optimizer's own")]}
    moment = max(moments, key=lambda name: sum(p.bytes or 0 for p in moments[name]))
    weights = _weights(request, exact)
    parts = weights + [p for p in moments[moment] + [
        Part("workspaces", step_memory.cublas_workspace_bytes(device), "derived: cuBLAS's, one per thread"),
        Part("input", request.shape.tokens * 8, "exact")] if p.bytes] + _ddp_buckets(request, exact)
    peak = sum(p.bytes or 0 for p in parts if p.allocated)
    if measured is not None:
        widths = exact.shape
        parts.append(_other(measured, other_feature(request.shape.tokens, widths.layers, widths.hidden,
                                                    widths.intermediate), request.adapter.kind, peak))
    if device == "cuda":
        parts += _outside_pytorch(calibration, peak, step.pressure)
    return Plan(request, exact, tuple(parts), measured.source if measured else calibration.path or calibration.device,
                device, moment, "meta")


def _other(measured: DeviceCalibration, feature: int, adapter: str, peak: int) -> Part:
    """The unnamed remainder a device's cells left beside a ``peak`` of named parts (on the CPU with glibc's free
    heap). Its error is the calibration's spread s, a fraction of a cell's measured peak (the named parts and the
    remainder, which on the CPU is half of it or more): a measured peak that is s of itself over the planned one
    is over by s / (1 - s) of the plan's."""
    other = measured.other_bytes(feature, adapter)
    heap = "" if measured.device == "cuda" else " (with glibc's free heap, which the RSS peak holds)"
    spread = measured.other_spread
    return Part("other", other, f"fitted to {measured.cells} cells{heap}",
                spread / (1 - spread) * (peak + other) / max(other, 1))


def _outside_pytorch(calibration: Calibration, peak: int, pressure: int) -> list[Part]:
    """Beside a CUDA allocator's ``peak``: its cache (fitted, with the freed blocks of ``pressure`` it cannot reuse)
    and the memory outside PyTorch (the CUDA context, libraries: measured, else assumed)."""
    measured = calibration.devices.get("cuda")
    if measured is None:
        return [Part("non_pytorch_bytes", calibration.cuda_context_bytes, calibration.cuda_context_source,
                     ASSUMED_ERROR, allocated=False)]
    cache = measured.cache_bytes(peak, pressure)
    return [Part("allocator_cache_bytes", cache, f"fitted to {measured.cells} cells",
                 measured.cache_max_error * (peak + cache) / max(cache, 1), allocated=False),
            Part("non_pytorch_bytes", measured.non_pytorch_bytes, f"measured: the median of {measured.cells} cells",
                 NON_PYTORCH_ERROR, allocated=False)]


def fitted_plan(request: CellConfig, exact: Exact, calibration: Calibration, device: str) -> Plan:
    """The last resort (a model neither the analytic formulas nor the meta device cover, or FSDP2 outside the analytic
    model): saved activations and the step's temporaries from coefficients fitted to CPU runs."""
    group = calibration.group(request.shape.precision, request.adapter.kind)
    tokens = request.shape.tokens
    act, act_how, act_error = fitted_activations(request, exact, calibration)
    fitted = f"fitted ({calibration.device} calibration, {calibration.source.get('machine', '?')})"
    parts = _weights(request, exact) + [
        Part("gradients", exact.gradient_bytes, "exact" + (", per rank" if request.levers.parallel.strategy ==
                                                            "fsdp2" else "")),
        Part("activations", act, act_how, act_error)]
    if request.levers.gradient_checkpointing != "off":
        recompute = group.recompute_bytes(exact.shape, tokens, exact.adapted_numel)
        if request.levers.attn_implementation == "eager":
            recompute += eager_attention_bytes(request, exact) // max(exact.shape.layers, 1)
        parts.append(Part("layer", recompute, "fitted: one layer's activations, alive again in backward", act_error))
    # the [tokens, vocab] logits of the loss: with loss_chunk, one chunk's at a time
    chunk = request.levers.loss_chunk
    logits = step_memory.logit_tokens(tokens, chunk)
    parts.append(Part("temporaries", max(0, group.temporary_bytes(act, logits, exact.shape.vocab)),
                      fitted + (f", the loss's logits {chunk} tokens at a time" if chunk else ""),
                      group.peak_max_error if device == "cpu" else
                      max(group.peak_max_error, FITTED_TEMPORARIES_CUDA_ERROR)))
    parts += _ddp_buckets(request, exact)
    if request.levers.parallel.strategy == "fsdp2":  # no moment to place them at: the most FSDP2 holds at once
        parts.append(_gathered_part(exact.gathered, 2))
    if device == "cuda":
        parts += _outside_pytorch(calibration, sum(p.bytes or 0 for p in parts if p.allocated), 0)
    return Plan(request, exact, tuple(parts), calibration.path or calibration.device, device, method="fitted")


def fitted_activations(request: CellConfig, exact: Exact, calibration: Calibration) -> tuple[int, str, float]:
    """Saved activations from the coefficients fitted to CPU runs of Llama-family layers, with how they were got
    and their error (wider for layers of another architecture: benchmarks/fallback_accuracy.py)."""
    group = calibration.group(request.shape.precision, request.adapter.kind)
    act = group.activation_bytes(exact.shape, request.shape.tokens, exact.adapted_numel,
                                 request.levers.gradient_checkpointing != "off", exact.residual_itemsize)
    how, error = f"fitted ({calibration.device} calibration)", group.activation_max_error
    if exact.shape.model_type not in step_memory.MODELLED:
        error = max(error, MOE_ERROR if exact.shape.experts else ARCHITECTURE_ERROR)
        how += f", not fitted to {exact.shape.model_type} layers"
    if request.levers.attn_implementation == "eager":
        act += eager_attention_bytes(request, exact)
        how += ", + eager attention's seq×seq matrices (derived)"
    return act, how, error


def _if_fsdp2(request: CellConfig, text: str) -> str:
    return text if request.levers.parallel.strategy == "fsdp2" else ""


def eager_attention_bytes(request: CellConfig, exact: Exact) -> int:
    """What eager attention saves beyond sdpa's kernels: each layer's softmax output, one seq × seq matrix per
    head (with checkpointing only the additive causal mask, which every checkpointed layer keeps as an input)."""
    square = request.shape.batch_size * request.shape.seq_len ** 2 * exact.residual_itemsize
    if request.levers.gradient_checkpointing != "off":
        return square
    return exact.shape.layers * exact.shape.heads * square


def _bracket(fits: Callable[[int], bool], start: int, limit: int,
             toward: Callable[[int, int], int | None] | None = None) -> tuple[int, int]:
    """(good, bad) around where ``fits`` stops holding in [1, limit], searched from ``start``: doubling while it fits,
    or halving until it does, or going where ``toward(last, n)`` points (the last two tried) when it names a point.
    bad is 0 when ``limit`` fits; good is 0 when not even 1 does."""
    last = None
    if fits(start):
        good = start
        while good < limit:
            guess = toward(last, good) if toward and last is not None else None
            nxt = min(max(2 * good if guess is None else guess + 1, good + 1), limit)
            last = good
            if not fits(nxt):
                return good, nxt
            good = nxt
        return good, 0
    bad = start
    while bad > 1:
        guess = toward(last, bad) if toward and last is not None else None
        nxt = max(min(bad // 2 if guess is None else guess, bad - 1), 1)
        last = bad
        if fits(nxt):
            return nxt, bad
        bad = nxt
    return 0, bad


def largest(fits: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """The largest n in [1, limit] with ``fits(n)`` (0 when not even 1 fits), for a monotone ``fits``, searched from
    ``start``: doubling while it fits, or halving until it does, then bisection."""
    good, bad = _bracket(fits, start, limit)
    while good and bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def largest_within(margin: Callable[[int], float], limit: int, start: int = 1) -> int:
    """The largest n in [1, limit] with ``margin(n) >= 0`` (0 when not even 1), for a decreasing ``margin`` (what a
    card has left). A plan's bytes grow smoothly with the batch and the length, so the search follows the line
    through the last two margins to where it crosses zero, bisecting whenever that does not halve the bracket: the
    same answer as ``largest``, in fewer plans (a plan outside the analytic model takes about a second)."""
    seen: dict[int, float] = {}

    def fits(n: int) -> bool:
        seen[n] = margin(n)
        return seen[n] >= 0

    def crossing(a: int, b: int) -> int | None:
        """Where the line through the margins at a and b crosses zero (rounded down), None where it does not fall."""
        slope = (seen[b] - seen[a]) / (b - a)
        return None if slope >= 0 else a + int(-seen[a] / slope) if seen[a] >= 0 else a - int(seen[a] / slope) - 1

    good, bad = _bracket(fits, start, limit, crossing)
    if not good or not bad:
        return good
    # regula falsi, Illinois' way: the end kept twice has its margin halved, so the line leans towards the other
    mg, mb, kept, slow = seen[good], seen[bad], 0, 0
    while bad - good > 1:
        width = bad - good
        guess = good + int(mg / (mg - mb) * width) if slow < 4 else (good + bad) // 2
        mid = min(max(guess, good + 1), bad - 1)
        if fits(mid):
            good, mg, mb, kept = mid, seen[mid], mb / 2 if kept == 1 else mb, 1
        else:
            bad, mb, mg, kept = mid, seen[mid], mg / 2 if kept == -1 else mg, -1
        slow = slow + 1 if bad - good > width // 2 else 0
    return good


def verdict(plan: Plan, gpu: Gpu, calibration: Calibration) -> GpuFit:
    """``plan`` against ``gpu``, with the largest batch (same length) and length (same batch) that surely fit
    (their plan's total plus its uncertainty within the card)."""
    request, exact = plan.request, plan.exact

    def left(batch_size: int, seq_len: int) -> int:
        sized = predict(request.with_values({"shape.batch_size": batch_size, "shape.seq_len": seq_len}), exact,
                        calibration, plan.device)
        return gpu.capacity_bytes - sized.needed_bytes - sized.uncertainty_bytes

    # searched from the request's own values: the answer is the same, in fewer plans
    max_batch = largest_within(lambda b: left(b, request.shape.seq_len), MAX_BATCH_SIZE,
                               start=request.shape.batch_size)
    cap = min(exact.shape.max_positions or MAX_SEQ_LEN, MAX_SEQ_LEN)
    max_seq = largest_within(lambda s: left(request.shape.batch_size, s), cap, start=min(request.shape.seq_len, cap))
    return GpuFit(gpu, plan.total_bytes, plan.uncertainty_bytes, plan.pageable_bytes, max_batch, max_seq,
                  max_seq == cap)


@dataclass(frozen=True)
class Refusal:
    """A request no plan is made for, ended as a run of it would end: ``unavailable`` (a lever its model or the
    machine lacks: a chunked loss over transformed logits, an attention kernel the architecture has no path for)
    or ``crashed`` (its step raises on its own, ``meta_step.StepFails``)."""

    request: CellConfig
    status: str
    error: str
    device: str = "cuda"

    @classmethod
    def of(cls, request: CellConfig, err: Exception, device: str) -> Refusal:
        return cls(request, "unavailable" if isinstance(err, LeverUnavailable) else "crashed", str(err), device)

    def to_dict(self) -> dict[str, Any]:
        return {**_axes(self.request), "config": self.request.model_dump(mode="json"), "device": self.device,
                "status": self.status, "error": self.error}


REFUSED = (LeverUnavailable, meta_step.StepFails)  # what a request's plan raises that a run records as its result


def plan_requests(requests: Iterable[CellConfig], calibration: Calibration,
                  device: str = "cuda") -> list[Plan | Refusal]:
    """Plans for many requests, building each meta model (and each optimizer's state) once; a request that would
    end unavailable or crashed is that ``Refusal``."""
    models: dict[str, nn.Module] = {}
    exacts: dict[str, Exact] = {}
    plans: list[Plan | Refusal] = []
    for request in requests:
        model_key = repr((request.model, request.adapter, request.shape.precision))
        if model_key not in models:
            models[model_key] = meta_model(request.model, request.adapter, request.shape.precision)
        exact_key = model_key + repr((request.optimizer.name, request.optimizer.kwargs))
        if exact_key not in exacts:
            exacts[exact_key] = exact_parts(request, models[model_key])
        try:
            plans.append(predict(request, exacts[exact_key], calibration, device))
        except REFUSED as err:
            plans.append(Refusal.of(request, err, device))
    return plans


def plan_with_verdicts(requests: Iterable[CellConfig], calibration: Calibration, device: str,
                       gpus: Iterable[Gpu]) -> tuple[list[Plan | Refusal], dict[int, list[GpuFit]]]:
    """``plan_requests``, and each plan's ``verdict`` on every GPU, keyed by its index (a request whose larger
    batches or lengths the search would refuse is that ``Refusal`` instead)."""
    gpus = list(gpus)
    results = plan_requests(requests, calibration, device)
    verdicts: dict[int, list[GpuFit]] = {}
    for i, result in enumerate(results):
        if isinstance(result, Plan):
            try:
                verdicts[i] = [verdict(result, gpu, calibration) for gpu in gpus]
            except REFUSED as err:
                results[i] = Refusal.of(result.request, err, device)
    return results, verdicts


def requests_from_cells(cells: Iterable[CellConfig]) -> list[CellConfig]:
    """One cell per memory-distinct configuration (repeats, learning rates, schedules and seeds collapse)."""
    seen: dict[str, CellConfig] = {}
    for cell in cells:
        key = repr((cell.model, cell.adapter, cell.optimizer.name, cell.optimizer.kwargs, cell.shape, cell.levers))
        seen.setdefault(key, cell)
    return list(seen.values())


def cell_from_flags(model: str, adapter: str = "qlora", rank: int = 16, target_modules: str = "all-linear",
                    optimizer: str = "adamw_torch", batch_size: int = 1, seq_len: int = 2048, precision: str = "bf16",
                    grad_accum: int = 1, gradient_checkpointing: bool = False, attn_implementation: str = "sdpa",
                    world_size: int = 1, strategy: str | None = None, loss_chunk: int = 0) -> CellConfig:
    """The cell that command-line values describe: ``model`` is a preset name or a local config/checkpoint folder;
    a LoRA adapter of rank ``rank`` gets ``lora_alpha = 2 * rank``.

    Raises:
        UserError: naming the flag that is wrong.
    """
    from pathlib import Path

    from memprof.config import catalogue
    from memprof.config.presets import PRESETS

    if model in PRESETS:
        spec = ModelSpec(name=model, preset=model)
    elif (Path(model) / "config.json").is_file():
        spec = ModelSpec(name=Path(model).name, path=model)
    else:
        raise UserError("--model", f"'{model}' is neither a preset ({', '.join(PRESETS)}) nor a folder with a "
                        "config.json")
    if adapter not in ADAPTER_KINDS:
        raise UserError("--adapter", f"must be {', '.join(ADAPTER_KINDS)}, not '{adapter}'")
    for flag, value in (("--rank", rank), ("--grad-accum", grad_accum)):
        if value <= 0:
            raise UserError(flag, f"must be positive, got {value}")
    for flag, value, axis in (("--batch-size", batch_size, "batch_size"), ("--seq-len", seq_len, "seq_len")):
        least, most = AXIS_BY_NAME[axis].minimum, AXIS_BY_NAME[axis].maximum
        if not least <= value <= most:
            raise UserError(flag, f"must be {least} to {most:,}, got {value:,}")
    if loss_chunk < 0:
        raise UserError("--loss-chunk", f"must be 0 (off) or a number of tokens, got {loss_chunk}")
    targets: str | list[str] = target_modules
    if target_modules not in ("all-linear", "attention"):
        targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    error = catalogue.unknown(optimizer)
    if error:
        raise UserError("--optimizer", error)
    lora = {**LORA_DEFAULTS, "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    parallel = sharding_flags(world_size, strategy)
    try:
        levers = Levers(gradient_checkpointing="on" if gradient_checkpointing else "off",
                        attn_implementation=attn_implementation, parallel=parallel, loss_chunk=loss_chunk)
    except ValidationError as err:  # each flag is checked above: what is left is two levers that do not go together
        raise UserError("--loss-chunk, --strategy", err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return CellConfig(model=spec, adapter=AdapterSpec(name=adapter, kind=adapter, lora=lora if adapter != "none"
                                                      else {}),
                      optimizer=OptimizerSpec(label=optimizer, name=optimizer),
                      shape=ShapeSpec(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                                      precision=precision),
                      levers=levers)


def sharding_flags(world_size: int, strategy: str | None) -> ParallelSpec:
    """``--world-size``/``--strategy`` as a cell's parallel lever: both or neither, as a suite's ``parallel``.

    Raises:
        UserError: naming the flag that is wrong.
    """
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise UserError("--world-size", f"must be 1 to {MAX_WORLD_SIZE:,}, got {world_size:,}")
    if strategy is None and world_size > 1:
        raise UserError("--world-size", f"{world_size} needs --strategy (ddp, zero1 or fsdp2)")
    if strategy is not None and world_size == 1:
        raise UserError("--strategy", f"{strategy} needs --world-size > 1")
    return ParallelSpec(strategy=strategy or "none", world_size=world_size)
