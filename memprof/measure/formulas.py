"""Exact optimizer-state bytes for every catalogue entry, read off each library's source.

A formula predicts what ``memprof.measure.accounting.optimizer_state_bytes`` measures once ``step()`` has run:
every tensor the optimizer keeps, each storage once. Sources read: torch 2.13, transformers 5.23, bitsandbytes
0.50, schedulefree 1.4, torchao 0.18, galore-torch 1.0, apollo-torch 1.0.3, came-pytorch 0.1.3, adam-mini 1.1.1,
torch-optimi 0.3.3, grokadamw 0.1.2; ``tests/test_formulas.py`` checks each against the real optimizer, byte for
byte. A parameter that trains is assumed to get a gradient: libraries create state only on a gradient (Adagrad
aside, which creates it up front for every parameter it is given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)
BNB_BLOCK = 256                 # bitsandbytes' block-wise 8-bit: one fp32 absmax per 256 elements
BNB_MIN_8BIT_SIZE = 4096        # smaller tensors keep 32-bit state
BNB_QMAP_BYTES = 256 * 4        # a dynamic quantisation map: 256 fp32 codes, one tensor shared by all params
BNB_PAGED_MIN_SIZE = 100_000    # paged optimizers page a state buffer only for tensors this large (CUDA only)
# paged optimizers whose paged bytes are claimed: the number of param-sized state buffers each keeps
BNB_PAGED_STATES = {"paged_adamw_8bit": 2, "paged_adamw_32bit": 2, "paged_lion_8bit": 1, "paged_lion_32bit": 1}
TORCHAO_MIN_SIZE = 4096         # torchao follows bitsandbytes: smaller tensors keep full-precision state
TORCHAO_BLOCK = 256             # transformers passes block_size=256 to both AdamW4bit and AdamW8bit
TORCHAO_QMAP_BYTES = {8: 256 * 4, 4: 16 * 4}  # a fresh qmap per quantised state tensor, not shared
# Adam-mini 1.1.1 partitions parameters by substrings of their (lower-cased) names, in this order.
ADAM_MINI_ADAM = ("bias",)
ADAM_MINI_HEADS = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ADAM_MINI_ROWS = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value",
                  "feed_forward", "linear", "mlp", "o_proj", "wo", "attn.proj")


class Unpredictable(Exception):
    """The formula does not cover this configuration; the message says why."""


@dataclass(frozen=True)
class ParamSpec:
    """A parameter as a formula sees it: shape, dtype and whether it trains (gets a gradient)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class ParamGroup:
    """A param group: its parameters, its own options, and the settings the optimizer was built with."""

    params: tuple[ParamSpec, ...]
    options: Mapping[str, Any]
    settings: Mapping[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """The group's option, else the optimizer-wide setting, else the library default."""
        if key in self.options:
            return self.options[key]
        return self.settings.get(key, default)

    @property
    def trainable(self) -> list[ParamSpec]:
        return [p for p in self.params if p.trainable]


@dataclass(frozen=True)
class Formula:
    """How to predict one entry's state bytes; ``predict`` is None (with the reason) where memprof claims none."""

    predict: Callable[[list[ParamGroup]], int] | None
    reason: str = ""


# --- shared pieces ----------------------------------------------------------------------------------------


def _scalar_bytes() -> int:
    """torch's 0-dim ``step`` tensors: float32, float64 when that is the default dtype."""
    return 8 if torch.get_default_dtype() == torch.float64 else 4


def _upcast(dtype: torch.dtype) -> int:
    """Item size after the fp16/bf16 → fp32 upcast that Adafactor-style optimizers apply to gradients."""
    return 4 if dtype in HALF else dtype.itemsize


def _factored_numel(shape: tuple[int, ...]) -> int:
    """Row plus column factors of a >= 2-D second moment: reduce the last dim, then the one before it."""
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def _adafactor_param(p: ParamSpec, beta1: float | None) -> int:
    """transformers' Adafactor (and GaLore's copy): moments in the upcast dtype, plus the 0-dim RMS tensor."""
    size = _upcast(p.dtype)
    second = _factored_numel(p.shape) if len(p.shape) >= 2 else p.numel
    first = p.numel if beta1 is not None else 0
    return (first + second) * size + size


# --- torch ------------------------------------------------------------------------------------------------


def _torch_adam(groups: list[ParamGroup]) -> int:
    """exp_avg, exp_avg_sq (+ max_exp_avg_sq with amsgrad) like the param, and a 0-dim ``step``: float32 on the
    param's device when fused, else the default scalar dtype (on the CPU, or the device when capturable)."""
    total = 0
    for g in groups:
        step = 4 if g.get("fused") else _scalar_bytes()
        moments = 3 if g.get("amsgrad") else 2
        total += sum(moments * p.nbytes + step for p in g.trainable)
    return total


def _torch_sgd(groups: list[ParamGroup]) -> int:
    """A momentum buffer (a clone of the gradient) only when momentum != 0; nothing at all otherwise."""
    return sum(p.nbytes for g in groups if g.get("momentum", 0) != 0 for p in g.trainable)


def _torch_adagrad(groups: list[ParamGroup]) -> int:
    """``sum`` and ``step``, created in ``__init__`` for every parameter it is given, gradient or not."""
    return sum(p.nbytes + (4 if g.get("fused") else _scalar_bytes()) for g in groups for p in g.params)


def _torch_rmsprop(groups: list[ParamGroup]) -> int:
    """square_avg, + momentum_buffer when momentum > 0, + grad_avg when centered, and ``step``."""
    total = 0
    for g in groups:
        copies = 1 + (g.get("momentum", 0) > 0) + bool(g.get("centered", False))
        total += sum(copies * p.nbytes + _scalar_bytes() for p in g.trainable)
    return total


def _torch_adafactor(groups: list[ParamGroup]) -> int:
    """torch.optim.Adafactor: row_var/col_var (>= 2-D) or variance (1-D) like the gradient, and ``step``."""
    return sum((_factored_numel(p.shape) if len(p.shape) > 1 else p.numel) * p.itemsize + _scalar_bytes()
               for g in groups for p in g.trainable)


# --- transformers / schedule-free / small libraries ---------------------------------------------------------


def _hf_adafactor(groups: list[ParamGroup]) -> int:
    """transformers' Adafactor: ``step`` is an int; exp_avg only when beta1 is set (transformers leaves it None)."""
    return sum(_adafactor_param(p, g.get("beta1")) for g in groups for p in g.trainable)


def _copies(n: int) -> Callable[[list[ParamGroup]], int]:
    """``n`` tensors shaped like each param; counters (if any) are Python numbers in the group, not state."""
    def formula(groups: list[ParamGroup]) -> int:
        return sum(n * p.nbytes for g in groups for p in g.trainable)
    formula.__doc__ = f"{n} param-sized tensor(s) per parameter."
    return formula


def _came(groups: list[ParamGroup]) -> int:
    """CAME: exp_avg, and for >= 2-D two factored pairs (second moment, residual) else one full exp_avg_sq, in
    the upcast dtype; ``RMS`` is taken of the param itself, so it has the param's dtype."""
    total = 0
    for p in (p for g in groups for p in g.trainable):
        size = _upcast(p.dtype)
        second = 2 * _factored_numel(p.shape) if len(p.shape) >= 2 else p.numel
        total += (p.numel + second) * size + p.itemsize
    return total


def _stable_adamw(groups: list[ParamGroup]) -> int:
    """optimi StableAdamW: exp_avg, exp_avg_sq and a 0-dim eps_sq like the param; a Kahan compensation buffer
    for fp16/bf16 params unless kahan_sum=False; Triton (CUDA) adds 1-element scratch tensors."""
    total = 0
    for g in groups:
        kahan, triton = g.get("kahan_sum"), bool(g.get("triton"))
        for p in g.trainable:
            total += 2 * p.nbytes + p.itemsize
            if (kahan or kahan is None) and p.dtype in HALF:
                total += p.nbytes
            elif triton:
                total += 1
            total += 4 * triton + 4 * bool(g.get("gradient_release"))
    return total


def _adam_mini(groups: list[ParamGroup]) -> int:
    """Adam-mini: one group per named param. ``m`` like the param; ``v`` full for biases, one value per head for
    q/k (``dim**2 / n_heads`` elements a head), one per row for embeddings, output, v, o and MLP, else one."""
    total = 0
    for g in groups:
        name = str(g.options.get("name", "")).lower()
        head_numel = g.get("dim", 2048) ** 2 // g.get("n_heads", 32)
        for p in g.trainable:
            if any(key in name for key in ADAM_MINI_ADAM):
                second = p.numel
            elif any(key in name for key in ADAM_MINI_HEADS):
                if p.numel % head_numel:
                    raise Unpredictable(f"{name}: {p.numel} elements do not split into heads of {head_numel}; "
                                        "Adam-mini itself fails on this parameter")
                second = p.numel // head_numel
            elif any(key in name for key in ADAM_MINI_ROWS):
                second = p.shape[0]
            else:
                second = 1
            total += p.nbytes + second * p.itemsize
    return total


# --- bitsandbytes -------------------------------------------------------------------------------------------


def _bnb(states: int, bits: int, ademamix: bool = False) -> Callable[[list[ParamGroup]], int]:
    """bitsandbytes ``Optimizer1State``/``Optimizer2State``/AdEMAMix: ``states`` param-sized buffers (AdEMAMix
    keeps m1 and m2 in one (2, *shape) buffer, so 3), fp32 below ``min_8bit_size`` or at 32 bits regardless of
    the param's dtype; at 8 bits uint8 plus one fp32 absmax per 256-element block each, and the signed (and, with
    two moments, unsigned) qmap shared by every parameter. On the CPU paged variants get ordinary buffers."""
    def formula(groups: list[ParamGroup]) -> int:
        total, quantised = 0, False
        for g in groups:
            eight = g.get("optim_bits", bits) == 8
            min_size = g.get("min_8bit_size", BNB_MIN_8BIT_SIZE)
            for p in g.trainable:
                if eight and p.numel >= min_size:
                    quantised = True
                    total += states * (p.numel + 4 * math.ceil(p.numel / BNB_BLOCK))
                else:
                    total += states * 4 * p.numel
                if not ademamix and g.get("max_unorm", 0.0) > 0:
                    total += 4  # unorm_vec
        return total + (min(states, 2) * BNB_QMAP_BYTES if quantised else 0)
    formula.__doc__ = _bnb.__doc__
    return formula


# --- torchao ------------------------------------------------------------------------------------------------


def _torchao(bits: int) -> Callable[[list[ParamGroup]], int]:
    """torchao AdamW4bit/AdamW8bit: a 0-dim ``step`` (default dtype); each moment is a tensor subclass holding
    uint8 codes (4-bit: two per byte), one fp32 scale per block and its own qmap, but only for params with
    >= 4096 elements that split into whole blocks; other params keep moments like the param."""
    def formula(groups: list[ParamGroup]) -> int:
        total = 0
        for g in groups:
            block = int(g.get("block_size", TORCHAO_BLOCK))
            moments = 3 if g.get("amsgrad") else 2
            for p in g.trainable:
                total += _scalar_bytes()
                if p.numel >= TORCHAO_MIN_SIZE and p.numel % block == 0:
                    codes = p.numel if bits == 8 else p.numel // 2
                    total += moments * (codes + 4 * (p.numel // block) + TORCHAO_QMAP_BYTES[bits])
                else:
                    total += moments * p.nbytes
        return total
    formula.__doc__ = _torchao.__doc__
    return formula


# --- low-rank projection (GaLore, APOLLO) -------------------------------------------------------------------


def _side(shape: tuple[int, ...], proj_type: str) -> str:
    """Which side the projector multiplies: 'left' gives (r, n) states, 'right' gives (m, r)."""
    m, n = shape
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    raise Unpredictable(f"proj_type '{proj_type}' is not covered")


def _galore_projection(shape: tuple[int, ...], dtype: torch.dtype, rank: int,
                       proj_type: str) -> tuple[int, tuple[int, int]]:
    """Bytes of GaLore's projector and the projected shape. The projector slices the SVD of the gradient:
    for fp32 gradients the slice is a view, so the whole U (m × k) or Vh (k × n), k = min(m, n), stays alive;
    other dtypes get a rank-sized copy."""
    m, n = shape
    k = min(m, n)
    r = min(rank, k)
    if _side(shape, proj_type) == "left":
        kept = m * k * 4 if dtype == torch.float32 else m * r * dtype.itemsize
        return kept, (r, n)
    kept = k * n * 4 if dtype == torch.float32 else r * n * dtype.itemsize
    return kept, (m, r)


def _low_rank(groups: list[ParamGroup], projected: Callable[[ParamSpec, ParamGroup], int],
              plain: Callable[[ParamSpec, ParamGroup], int]) -> int:
    """GaLore's and APOLLO's shared layout: params in a group with ``rank`` get the ``projected`` state, the rest
    the ``plain`` one."""
    return sum(projected(p, g) if "rank" in g.options else plain(p, g) for g in groups for p in g.trainable)


def _galore_adamw(groups: list[ParamGroup]) -> int:
    """GaLore AdamW: params in a group with ``rank`` keep Adam moments of the projected gradient and the
    projector; the others plain exp_avg, exp_avg_sq. ``step`` is an int."""
    def projected(p: ParamSpec, g: ParamGroup) -> int:
        kept, low = _galore_projection(p.shape, p.dtype, g.options["rank"], g.options.get("proj_type", "std"))
        return kept + 2 * math.prod(low) * p.itemsize

    return _low_rank(groups, projected, lambda p, g: 2 * p.nbytes)


def _galore_adafactor(groups: list[ParamGroup]) -> int:
    """GaLore Adafactor: fp16/bf16 gradients are upcast to fp32 before projection (so the projector is an SVD
    view), then Adafactor's factored moments of the projected gradient and the RMS of the upcast param; params
    outside the projected group as transformers' Adafactor."""
    def projected(p: ParamSpec, g: ParamGroup) -> int:
        grad = torch.float32 if p.dtype in HALF else p.dtype
        kept, low = _galore_projection(p.shape, grad, g.options["rank"], g.options.get("proj_type", "std"))
        first = math.prod(low) if g.get("beta1") is not None else 0
        return kept + (first + _factored_numel(low) + 1) * grad.itemsize

    return _low_rank(groups, projected, lambda p, g: _adafactor_param(p, g.get("beta1")))


def _apollo_adamw(groups: list[ParamGroup]) -> int:
    """APOLLO AdamW (random projection): a seeded Gaussian projector of exactly rank × side (not capped by the
    matrix), Adam moments of the projected gradient, and a 0-dim ``scaled_grad`` norm (unless disable_nl)."""
    def projected(p: ParamSpec, g: ParamGroup) -> int:
        if g.options.get("proj", "random") != "random":
            raise Unpredictable(f"APOLLO proj '{g.options.get('proj')}' is not covered (only 'random')")
        m, n = p.shape
        rank = g.options["rank"]
        if _side(p.shape, g.options.get("proj_type", "std")) == "left":
            proj, low = m * rank, rank * n
        else:
            proj, low = rank * n, m * rank
        norm = 0 if g.get("disable_nl", False) else 1
        return (proj + 2 * low + norm) * p.itemsize

    return _low_rank(groups, projected, lambda p, g: 2 * p.nbytes)


def _grokadamw(groups: list[ParamGroup]) -> int:
    """GrokAdamW: exp_avg, exp_avg_sq and grok_ema like the param, kept on the CPU in ``param_groups[i]['state']``
    (not ``optimizer.state``) and moved to the device only inside ``step()``."""
    return sum(3 * p.nbytes for g in groups for p in g.trainable)


_NO_TORCHDISTX = ("torchdistx has no release on PyPI for this torch: its source was not read and nothing was "
                  "measured, so no formula is claimed")
_GALORE_8BIT = ("GaLore's AdamW8bit calls torch.cuda.synchronize() inside step(), so it cannot run, nor be "
                "measured, without CUDA; no formula is claimed")

FORMULAS: dict[str, Formula] = {
    "adamw_torch": Formula(_torch_adam),
    "adamw_torch_fused": Formula(_torch_adam),
    "adafactor": Formula(_hf_adafactor),
    "adamw_anyprecision": Formula(None, _NO_TORCHDISTX),
    "adamw_torch_4bit": Formula(_torchao(4)),
    "adamw_torch_8bit": Formula(_torchao(8)),
    "ademamix": Formula(_bnb(3, 32, ademamix=True)),
    "ademamix_8bit": Formula(_bnb(3, 8, ademamix=True)),
    "sgd": Formula(_torch_sgd),
    "adagrad": Formula(_torch_adagrad),
    "adamw_bnb_8bit": Formula(_bnb(2, 8)),
    "adamw_8bit": Formula(_bnb(2, 8)),
    "lion_8bit": Formula(_bnb(1, 8)),
    "lion_32bit": Formula(_bnb(1, 32)),
    "paged_adamw_32bit": Formula(_bnb(2, 32)),
    "paged_adamw_8bit": Formula(_bnb(2, 8)),
    "paged_ademamix_32bit": Formula(_bnb(3, 32, ademamix=True)),
    "paged_ademamix_8bit": Formula(_bnb(3, 8, ademamix=True)),
    "paged_lion_32bit": Formula(_bnb(1, 32)),
    "paged_lion_8bit": Formula(_bnb(1, 8)),
    "rmsprop": Formula(_torch_rmsprop),
    "rmsprop_bnb": Formula(_bnb(1, 32)),
    "rmsprop_bnb_8bit": Formula(_bnb(1, 8)),
    "rmsprop_bnb_32bit": Formula(_bnb(1, 32)),
    "galore_adamw": Formula(_galore_adamw),
    "galore_adamw_8bit": Formula(None, _GALORE_8BIT),
    "galore_adafactor": Formula(_galore_adafactor),
    "apollo_adamw": Formula(_apollo_adamw),
    "grokadamw": Formula(_grokadamw),
    "schedule_free_adamw": Formula(_copies(2)),
    "schedule_free_radam": Formula(_copies(2)),
    "schedule_free_sgd": Formula(_copies(1)),
    "stable_adamw": Formula(_stable_adamw),
    "torch_adafactor": Formula(_torch_adafactor),
    "came": Formula(_came),
    "adam_mini": Formula(_adam_mini),
}


# --- public helpers -----------------------------------------------------------------------------------------


def _spec(item: Any) -> ParamSpec:
    if isinstance(item, ParamSpec):
        return item
    if isinstance(item, torch.Tensor):
        return ParamSpec(tuple(item.shape), item.dtype, item.requires_grad)
    shape, dtype = item
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return ParamSpec(tuple(int(d) for d in shape), dtype)


def _groups(params_or_shapes: Iterable[Any], kwargs: Mapping[str, Any]) -> list[ParamGroup]:
    items = list(params_or_shapes)
    if not items or not isinstance(items[0], Mapping):
        items = [{"params": items}]
    return [ParamGroup(tuple(_spec(p) for p in g["params"]), {k: v for k, v in g.items() if k != "params"},
                  dict(kwargs)) for g in items]


def predict_state_bytes(optim_name: str, params_or_shapes: Iterable[Any],
                        kwargs: Mapping[str, Any] | None = None) -> int | None:
    """Optimizer-state bytes of ``optim_name`` once ``step()`` has run, or None where no formula is claimed.

    Args:
        optim_name: a catalogue name.
        params_or_shapes: parameters (tensors; frozen ones get no state), ``(shape, dtype)`` pairs, or param
            groups as optimizers hold them (``{"params": [...], **options}``; GaLore/APOLLO mark the projected
            group with ``rank``, Adam-mini names each group).
        kwargs: the optimizer's settings over the library defaults as transformers builds it (``min_8bit_size``,
            ``block_size``, ``momentum``, ``amsgrad``, ...).
    """
    formula = FORMULAS.get(optim_name)
    if formula is None or formula.predict is None:
        return None
    try:
        return formula.predict(_groups(params_or_shapes, kwargs or {}))
    except Unpredictable:
        return None


def predict_paged_bytes(optim_name: str, params_or_shapes: Iterable[Any],
                        kwargs: Mapping[str, Any] | None = None) -> int | None:
    """The part of ``predict_state_bytes`` a paged bitsandbytes optimizer keeps in CUDA managed memory (outside the
    torch allocator): its param-sized state buffers (uint8 at 8 bits, fp32 at 32) of tensors of at least
    ``BNB_PAGED_MIN_SIZE`` elements; absmax, qmaps and smaller tensors' buffers are ordinary allocations. 0 for an
    optimizer that pages nothing, None for a paged one without a claim (AdEMAMix). On the CPU nothing pages."""
    if not optim_name.startswith("paged_"):
        return 0
    states = BNB_PAGED_STATES.get(optim_name)
    if states is None:
        return None
    total = 0
    for g in _groups(params_or_shapes, kwargs or {}):
        eight = g.get("optim_bits", 8 if optim_name.endswith("8bit") else 32) == 8
        min_size = g.get("min_8bit_size", BNB_MIN_8BIT_SIZE)
        total += sum(states * p.numel * (1 if eight and p.numel >= min_size else 4)
                     for p in g.trainable if p.numel >= BNB_PAGED_MIN_SIZE)
    return total


def why_unpredictable(optim_name: str) -> str | None:
    """The reason an entry has no formula (None when it has one)."""
    formula = FORMULAS.get(optim_name)
    if formula is None:
        return f"'{optim_name}' is not in the catalogue"
    return formula.reason or None


def optimizer_settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Settings that change state sizes but live on the optimizer object rather than in its param groups."""
    out: dict[str, Any] = {}
    args = getattr(optimizer, "args", None)  # bitsandbytes
    for key in ("optim_bits", "min_8bit_size", "max_unorm"):
        if hasattr(args, key):
            out[key] = getattr(args, key)
    for key in ("block_size", "dim", "n_heads", "disable_nl"):  # torchao; Adam-mini; APOLLO
        if hasattr(optimizer, key):
            out[key] = getattr(optimizer, key)
    return out


def predict_for_optimizer(optim_name: str, optimizer: torch.optim.Optimizer) -> int | None:
    """``predict_state_bytes`` for a built optimizer: its param groups and settings, none of its state (for a
    ZeroRedundancyOptimizer, this rank's partition; for FSDP2's DTensor parameters, their local shards)."""
    from memprof.measure.accounting import local, local_optimizer

    optimizer = local_optimizer(optimizer)
    groups = [{**g, "params": [ParamSpec(tuple(local(p).shape), p.dtype, p.requires_grad) for p in g["params"]]}
              for g in optimizer.param_groups]
    return predict_state_bytes(optim_name, groups, optimizer_settings(optimizer))
