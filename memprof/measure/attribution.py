"""Attribution at the peak: a measured peak split into named parts, each what was alive at the peak's moment, and an
explicit signed remainder.

Enters: a Record (its exact parts, measured activations, peaks, and the phase the peak fell in). Leaves: the Record
with ``peak_moment`` and ``breakdown`` (``PARTS`` name -> bytes, summing to the peak), and on CUDA the allocator's
cache and the memory outside PyTorch. The moment is the one of ``memprof.measure.step_memory`` with the most bytes
among those of the peak's phase: at the loss's backward every saved activation and the loss's fp32 logits
gradients are alive but last step's gradients are not (``zero_grad(set_to_none=True)``); at a recomputed layer's
attention backward the checkpointed inputs and that layer's transients are. For a model the formulas do not cover,
the moments come from its step on the meta device (``meta_step.moments``: a second or so); where that cannot run,
the exact parts, every saved activation and the gradients are named and the rest is the remainder.

On the CPU the peak is the growth of resident memory over the worker's baseline, which also holds library pages
touched for the first time and the C allocator's slack: the remainder says how much.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from memprof.config.spec import CellConfig
from memprof.measure import step_memory
from memprof.results.record import Record

if TYPE_CHECKING:
    from torch import nn

    from memprof.train.sharding import Gathered


@dataclass(frozen=True)
class Part:
    """A part of a peak as tables name it: ``short`` in a column header, ``label`` where there is room."""

    short: str
    label: str


# Every part a peak is split into, and how tables, the report and plan name it. Their sum is the peak.
PARTS: dict[str, Part] = {
    "frozen_weights": Part("frozen", "frozen weights"),
    "kbit_fp32_weights": Part("fp32 cast", "frozen weights cast to fp32 by k-bit prep (QLoRA)"),
    "trainable_weights": Part("trainable", "trainable weights"),
    "buffers": Part("buffers", "buffers"),
    "gathered_weights": Part("gathered", "all-gathered weights (FSDP2)"),
    "gradients": Part("grads", "gradients"),
    "optimizer_state": Part("state", "optimizer state"),
    "activations": Part("act", "saved activations"),
    "loss_logits": Part("logits", "the loss's logits and their fp32 gradients"),
    "layer": Part("layer", "the layer at work (its transients)"),
    "optimizer_temporaries": Part("opt tmp", "optimizer step temporaries"),
    "workspaces": Part("cuBLAS", "cuBLAS workspaces"),
    "input": Part("input", "input batch"),
    "heap_free": Part("heap free", "freed memory glibc keeps (CPU)"),
    "other": Part("other", "unnamed remainder"),
}
# Beside the allocator's peak, on CUDA: memory the torch allocator does not hand out.
OUTSIDE: dict[str, Part] = {"optimizer_state_paged_bytes": Part("paged", "paged optimizer state (managed memory)"),
                            "allocator_cache_bytes": Part("cache", "allocator cache (reserved, not allocated)"),
                            "non_pytorch_bytes": Part("non-torch", "outside PyTorch (CUDA context, libraries)")}
# step_memory's part names -> ours (anything else belongs to the layer at work)
_NAMES = {"optimizer_state": "optimizer_state", "cublas_workspaces": "workspaces", "input_ids": "input",
          "activations": "activations", "activations_so_far": "activations", "other_layers_saved": "activations",
          "ckpt_kept": "activations", "rope_cos_sin": "activations", "minus_not_yet_saved": "activations",
          "layer_saved": "activations", "logits": "loss_logits", "logits_fp32_copy": "loss_logits",
          "nll_grad": "loss_logits", "log_softmax_grad": "loss_logits", "log_softmax_out": "loss_logits",
          "gradients": "gradients", "foreach_temporaries": "optimizer_temporaries",
          "hidden_grad": "loss_logits", "eval_hidden": "loss_logits", "head_grad_sum": "gradients",
          "gathered_weights": "gathered_weights", "loss_logits": "loss_logits"}


def attribute(record: Record, peak_phase: str = "") -> Record:
    """The record with ``peak_moment``, ``breakdown`` and, on CUDA, the allocator cache and the memory outside
    PyTorch filled in, where the figures exist. ``peak_phase`` (forward, backward, optimizer...) restricts the
    moments to those of the phase the peak was measured in; '' considers every moment."""
    exact = (record.frozen_weight_bytes, record.trainable_weight_bytes, record.buffer_bytes,
             record.optimizer_state_bytes, record.activation_bytes)
    cuda = record.peak_allocated_bytes is not None
    peak = record.peak_allocated_bytes if cuda else record.peak_rss_delta_bytes
    if any(part is None for part in exact) or peak is None:
        return record
    values: dict[str, object] = {}
    if cuda:
        values["allocator_cache_bytes"] = record.peak_reserved_bytes - record.peak_allocated_bytes
        if record.nvml_peak_bytes is not None:
            values["non_pytorch_bytes"] = record.nvml_peak_bytes - record.peak_reserved_bytes
    moment, breakdown = _parts(record, "cuda" if cuda else "cpu", peak_phase)
    if not cuda and record.heap_free_delta_bytes:  # inside the RSS peak, unlike CUDA's cache beyond the allocator's
        breakdown["heap_free"] = max(record.heap_free_delta_bytes, 0)
    breakdown["other"] = peak - sum(breakdown.values())
    return replace(record, peak_moment=moment, breakdown=breakdown, **values)


def _parts(record: Record, device: str, peak_phase: str) -> tuple[str, dict[str, int]]:
    """The moment and the named parts alive at it (without the remainder)."""
    frozen = _frozen_split(record)
    weights = {"frozen_weights": frozen[0], "kbit_fp32_weights": frozen[1],
               "trainable_weights": record.trainable_weight_bytes, "buffers": record.buffer_bytes}
    # paged state is CUDA managed memory: outside the allocator, so not part of its peak
    paged = (record.optimizer_state_paged_bytes or 0) if device == "cuda" else 0
    state = record.optimizer_state_bytes - paged
    shape = step_memory.step_shape(record.config, device)
    if shape is None:
        return _meta_parts(record, device, peak_phase, weights, state)
    moments = step_memory.moments(shape, weights=sum(weights.values()), optimizer=state,
                                  gradients=record.gradient_bytes or 0, activations=record.activation_bytes)
    gathered = _gathered(record.config)
    if gathered is not None:
        moments = step_memory.with_gathered(moments, gathered)
    moment, parts = _fullest(moments, peak_phase, step_memory.phase)
    return moment, {**weights, **name_parts(parts)}


def _meta_parts(record: Record, device: str, peak_phase: str, weights: dict[str, int],
                state: int) -> tuple[str, dict[str, int]]:
    """The moment and parts of a model the formulas do not cover, from its step on the meta device
    (``meta_step.moments``); where that cannot run, no moment and every saved activation with the gradients (FSDP2's
    all-gathered weights left in the remainder)."""
    from memprof.measure import meta_step  # torch and transformers: only where a record needs the meta device

    try:
        found = meta_step.moments(record.config, device, record.gradient_bytes or 0)
    except Exception:  # noqa: BLE001 - a model the meta device cannot step is attributed without a moment
        found = None
    if found is None:
        return "", {**weights, "gradients": record.gradient_bytes or 0, "optimizer_state": state,
                    "activations": record.activation_bytes}
    moment, parts = _fullest(found[1], peak_phase, meta_step.PHASES.__getitem__)
    return f"{moment} (meta device)", {**weights, "optimizer_state": state, **name_parts(parts)}


def _fullest(moments: dict[str, dict[str, int]], peak_phase: str,
             phase: Callable[[str], str]) -> tuple[str, dict[str, int]]:
    """The moment with the most bytes among those in ``peak_phase`` (every one where none is, or it is ''), and its
    parts."""
    candidates = {name: parts for name, parts in moments.items()
                  if not peak_phase or phase(name) == peak_phase} or moments
    moment = max(candidates, key=lambda name: sum(candidates[name].values()))
    return moment, candidates[moment]


def name_parts(moment_parts: dict[str, int]) -> dict[str, int]:
    """A ``step_memory`` moment's parts under the names of ``PARTS`` (its weights left out: the caller names them
    from exact figures), the zero ones dropped."""
    out = {name: 0 for name in PARTS}
    for name, nbytes in moment_parts.items():
        if name != "weights":
            out[_NAMES.get(name, "layer")] += nbytes
    return {name: nbytes for name, nbytes in out.items() if nbytes}


def _frozen_split(record: Record) -> tuple[int, int]:
    """(frozen weights, the part of them peft's k-bit preparation cast to fp32): under QLoRA everything frozen that
    bitsandbytes did not quantise (embeddings, norms, the head) is fp32 after ``prepare_model_for_kbit_training``."""
    config = record.config
    if config.adapter.kind != "qlora" or not config.adapter.quant.prepare_for_kbit_training:
        return record.frozen_weight_bytes, 0
    four_bit = record.frozen_four_bit_bytes
    if four_bit is None:  # a record from before the split was measured: the model on the meta device knows it
        four_bit = _four_bit_bytes(config)
    if four_bit is None:
        return record.frozen_weight_bytes, 0
    return four_bit, record.frozen_weight_bytes - four_bit


def _four_bit_bytes(config: CellConfig) -> int | None:
    from memprof.train import meta
    from memprof.train.fourbit import is_four_bit

    built = _meta_model(config)
    if built is None:
        return None
    return sum(meta.four_bit_bytes(p.numel(), p.blocksize, p.compress_statistics)
               for p in built.parameters() if is_four_bit(p))


def _gathered(config: CellConfig) -> Gathered | None:
    """What an FSDP2 rank all-gathers (``memprof.train.sharding.gathered``); None for another strategy, or a model
    that does not build on the meta device."""
    from memprof.train import sharding

    if config.levers.parallel.strategy != "fsdp2":
        return None
    built = _meta_model(config)
    return None if built is None else sharding.gathered(built)


def _meta_model(config: CellConfig) -> nn.Module | None:
    """A record's model on the meta device; None where it does not build."""
    return _meta_model_of(config.model.model_dump_json(), config.adapter.model_dump_json(), config.shape.precision)


@lru_cache(maxsize=32)
def _meta_model_of(model: str, adapter: str, precision: str) -> nn.Module | None:
    """``_meta_model`` by the specs' JSON, so that a run's records build each model once."""
    from memprof.config.spec import AdapterSpec, ModelSpec
    from memprof.train import meta

    spec = ModelSpec.model_validate_json(model)
    if not spec.known:
        return None
    try:
        return meta.meta_model(spec, AdapterSpec.model_validate_json(adapter), precision)
    except Exception:  # noqa: BLE001 - a model that trained may not build here: attributed without these
        return None


def attribute_run(run_dir: Path) -> list[Record]:
    """Every record of a result folder (any schema) attributed again, as a run measured now would be. A record
    without the allocator's phase peaks (the CPU, or memprof before they were kept) is attributed at the moment with
    the most bytes: a sampled timeline misses the loss's backward, which lasts a few milliseconds.

    Raises:
        UserError: not a result folder, or records this memprof cannot read.
    """
    from memprof.results.store import read_records
    from memprof.suite.restore import with_suite_configs

    records = with_suite_configs(read_records(run_dir), run_dir)
    return [attribute(record, record.peak_phase) for record in records]
