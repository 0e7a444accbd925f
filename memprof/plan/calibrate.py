"""Fitting the plan's coefficients to measured runs (``memprof plan --calibrate RUN_DIR...``).

Two fits, each from runs memprof measured: the per-token activation and temporaries coefficients the plan falls back
on for cells the analytic model (``memprof.measure.step_memory``) does not cover, and, per kind of device, what the
analytic model leaves to measurement (``DeviceCalibration``: the unnamed remainder, the allocator's cache, the memory
outside PyTorch). Enters: result folders. Leaves: a ``Calibration`` (``memprof.plan.calibration``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from memprof.errors import UserError
from memprof.plan.calibration import (ACTIVATION_FEATURES, ASSUMED_CUDA_CONTEXT_BYTES, ASSUMED_CUDA_CONTEXT_SOURCE,
                                      SHAPES_NEEDED, Calibration, DeviceCalibration, Group, Shape,
                                      cache_pressure, other_feature)
from memprof.results import env as env_mod


@dataclass(frozen=True)
class Sample:
    """One measured cell as the fit sees it."""

    group: str
    shape: Shape
    tokens: int
    adapted_numel: int
    activation_bytes: int
    known_bytes: int             # weights, buffers, gradients, optimizer state: exact
    peak_bytes: int              # CPU: RSS growth; CUDA: reserved (+ paged state, outside the allocator)
    context_bytes: int | None    # CUDA only: memory outside PyTorch (context, workspaces)
    checkpointing: bool = False  # gradient checkpointing on: each layer kept only its input
    residual_itemsize: int = 4


def samples(run_dirs: Sequence[Path]) -> tuple[list[Sample], dict[str, Any]]:
    """The ok cells of result folders, with each cell's model shape read back from the run's suite copy.

    Raises:
        UserError: for a folder that is not a memprof run, or runs measured on different kinds of device.
    """
    from memprof.results.store import read_records
    from memprof.suite import parse
    from memprof.train import models
    from memprof.train.meta import adapted_numel, meta_model

    out: list[Sample] = []
    devices: set[str] = set()
    source: dict[str, Any] = {"runs": [d.name for d in run_dirs]}
    shapes: dict[str, Shape] = {}
    adapted: dict[str, int] = {}
    residual: dict[str, int] = {}
    for run_dir in run_dirs:
        records = read_records(run_dir)
        suite_path = run_dir / "suite.toml"
        try:
            cells = {c.key: c for c in parse(suite_path.read_text(encoding="utf-8"), suite_path).cells}
        except FileNotFoundError as err:
            raise UserError(str(run_dir), f"not a complete memprof result folder: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(str(suite_path), f"cannot read: {err}") from None
        env = _env(run_dir)
        source.update(host=env.get("host"), machine=env_mod.machine_label(env), versions=env.get("versions", {}))
        for r in records:
            cell = cells.get(r.key)  # the suite's own cell: a schema-1 record kept only the names of its tables
            if r.status.value != "ok" or cell is None or r.activation_bytes is None \
                    or cell.levers.attn_implementation != "sdpa":
                continue
            key = cell.model.model_dump_json()
            if key not in shapes:
                shapes[key] = Shape.from_config(models.build_config(cell.model))
            precision = cell.shape.precision
            build = json.dumps([key, cell.adapter.model_dump_json(), precision])
            if build not in adapted:
                model = meta_model(cell.model, cell.adapter, precision)
                adapted[build] = adapted_numel(model)
                residual[build] = model.get_input_embeddings().weight.element_size()  # fp32 under k-bit prep
            cuda = r.peak_reserved_bytes is not None
            devices.add("cuda" if cuda else "cpu")
            if cuda:
                source["device_name"] = r.device_name
            known = (r.frozen_weight_bytes + r.trainable_weight_bytes + r.buffer_bytes + r.gradient_bytes
                     + r.optimizer_state_bytes)
            paged = r.optimizer_state_paged_bytes or 0
            out.append(Sample(f"{precision}/{cell.adapter.kind}", shapes[key], cell.shape.tokens,
                              adapted[build], r.activation_bytes, known,
                              r.peak_reserved_bytes + paged if cuda else r.peak_rss_delta_bytes,
                              r.non_pytorch_bytes if cuda else None, cell.levers.gradient_checkpointing != "off",
                              residual[build]))
    if len(devices) > 1:
        raise UserError(", ".join(map(str, run_dirs)), "runs from a CPU and a GPU cannot be fitted together")
    source["device"] = devices.pop() if devices else "?"
    return out, source


def nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: drop the most negative feature and refit until none is.

    (A plain active-set elimination: enough for a handful of features, and it keeps each coefficient's meaning.)
    """
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        solution = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        if (solution >= 0).all():
            coef[active] = solution
            break
        active.pop(int(np.argmin(solution)))
    return coef


def fit_activations(full: Sequence[Sample], checkpointed: Sequence[Sample]) -> np.ndarray:
    """The per-token activation coefficients (``ACTIVATION_FEATURES``), fitted per token so that large and small
    cells weigh alike.

    With checkpointed cells the split between the layers and what lies outside them is measured rather than
    inferred: a checkpointed layer keeps exactly its input, so those cells give the outside coefficients
    (hidden, vocab) directly, and the cells without checkpointing then give the per-layer ones. Without them
    all six come from one fit, where layer count and the outside widths are nearly collinear.
    """
    features = [(*s.shape.activation_features(), s.adapted_numel / s.tokens) for s in full]
    y = np.array([s.activation_bytes / s.tokens for s in full])
    if len({(s.shape.hidden, s.shape.vocab) for s in checkpointed}) < 2:
        return nonnegative_lstsq(np.array(features, dtype=float), y)
    outside = nonnegative_lstsq(
        np.array([(s.shape.hidden, s.shape.vocab) for s in checkpointed], dtype=float),
        np.array([s.activation_bytes / s.tokens - s.shape.layers * s.shape.hidden * s.residual_itemsize
                  for s in checkpointed]))
    x = np.array(features, dtype=float)
    per_layer = nonnegative_lstsq(x[:, [0, 1, 2, 5]], y - x[:, [3, 4]] @ outside)
    return np.array([*per_layer[:3], *outside, per_layer[3]])


def fit(run_dirs: Sequence[Path]) -> Calibration:
    """Fit every precision/adapter group present in the runs with enough shapes (the others are listed in
    ``source["skipped"]``).

    Raises:
        UserError: when no group can be fitted.
    """
    found, source = samples(run_dirs)
    where = ", ".join(map(str, run_dirs))
    if not found:
        raise UserError(where, "no ok cell with measured activations to fit")
    groups: dict[str, Group] = {}
    skipped: dict[str, str] = {}
    for name in sorted({s.group for s in found}):
        rows = [s for s in found if s.group == name]
        distinct_shapes = {s.shape for s in rows}
        if len(distinct_shapes) < SHAPES_NEEDED or len(rows) < len(ACTIVATION_FEATURES):
            skipped[name] = f"{len(rows)} cells over {len(distinct_shapes)} shapes (needs {SHAPES_NEEDED})"
            continue
        full = [s for s in rows if not s.checkpointing]
        activation = fit_activations(full, [s for s in rows if s.checkpointing])
        temp_x = np.array([(s.activation_bytes, s.tokens * s.shape.vocab, 1) for s in full], dtype=float)
        temp_y = np.array([s.peak_bytes - s.known_bytes - s.activation_bytes for s in full], dtype=float)
        temporaries = nonnegative_lstsq(temp_x, temp_y)
        group = Group(tuple(float(c) for c in activation), tuple(float(t) for t in temporaries), len(rows), 0.0, 0.0)
        act_err, peak_err = [], []
        for s in rows:
            act = group.activation_bytes(s.shape, s.tokens, s.adapted_numel, s.checkpointing, s.residual_itemsize)
            act_err.append(abs(act - s.activation_bytes) / s.activation_bytes)
            if not s.checkpointing:
                peak = s.known_bytes + act + group.temporary_bytes(act, s.tokens, s.shape.vocab)
                peak_err.append(abs(peak - s.peak_bytes) / s.peak_bytes)
        groups[name] = Group(group.activation, group.temporaries, len(rows), max(act_err), max(peak_err))
    if not groups:
        raise UserError(where, "too few shapes to fit any group: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                        + " (the `calibrate` suite has enough)")
    source["skipped"] = skipped
    contexts = [s.context_bytes for s in found if s.context_bytes is not None]
    if contexts:
        context, context_source = int(statistics.median(contexts)), f"median non-PyTorch bytes of {len(contexts)} cells"
    else:
        context, context_source = ASSUMED_CUDA_CONTEXT_BYTES, ASSUMED_CUDA_CONTEXT_SOURCE
    note = (f"Fallback coefficients fitted by `memprof plan --calibrate` to {len(found)} cells measured on "
            f"{source['device']} ({source.get('machine', '?')}), runs {', '.join(source['runs'])}: "
            f"{', '.join(sorted(groups))}.")
    if source["device"] == "cpu":
        note += " The peak there is RSS growth: on a GPU these are estimates."
    source["cells"] = len(found)
    return Calibration(groups, source, context, context_source, note)



MIN_KIND_CELLS = 3  # an adapter kind's own offset to the remainder needs this many cells; fewer share the fit's


def fit_device(run_dirs: Sequence[Path]) -> DeviceCalibration | None:
    """What the analytic model leaves to measurement, from the runs' ok cells it covers (None when it covers none):
    the unnamed remainder (attribution at the peak) as a constant and a per-token-width slope, the allocator cache
    model and the memory outside PyTorch (CUDA runs).

    Raises:
        UserError: runs from a CPU and a GPU together, or a folder that is not a memprof run.
    """
    from memprof.measure import step_memory
    from memprof.measure.attribution import attribute_run

    cells, machines = [], set()
    for run_dir in run_dirs:
        for r in attribute_run(run_dir):
            cuda = r.peak_allocated_bytes is not None
            if r.status.value == "ok" and r.breakdown and r.peak_moment and (not cuda or r.peak_reserved_bytes):
                cells.append(r)
                machines.add(r.device_name if cuda else env_mod.machine_label(_env(run_dir)))
    if not cells:
        return None
    devices = {"cuda" if r.peak_allocated_bytes is not None else "cpu" for r in cells}
    if len(devices) > 1:
        raise UserError(", ".join(map(str, run_dirs)), "runs from a CPU and a GPU cannot be fitted together")
    device = devices.pop()
    peaks = [r.peak_bytes for r in cells]
    shapes = [step_memory.step_shape(r.config, device) for r in cells]
    # what the analytic model leaves to measurement: the remainder and, on the CPU, glibc's free heap (the plan
    # predicts both as one fitted part)
    others = np.array([r.breakdown["other"] + r.breakdown.get("heap_free", 0) for r in cells], float)
    features = [other_feature(s.tokens, s.layers, s.hidden, s.intermediate) for s in shapes]
    x = np.array([(1.0, f) for f in features])
    c, d = (float(v) for v in nonnegative_lstsq(x, others)) if len(set(features)) > 1 \
        else (float(np.median(others)), 0.0)
    residuals: dict[str, list[float]] = {}
    for o, s, f in zip(others, shapes, features):
        residuals.setdefault(s.adapter, []).append(o - (c + d * f))
    by_adapter = {kind: float(np.median(v)) for kind, v in sorted(residuals.items()) if len(v) >= MIN_KIND_CELLS}
    out = DeviceCalibration(device, ", ".join(sorted(machines)), tuple(r.name for r in run_dirs), len(cells),
                            (c, d), 0.0, by_adapter)
    spread = max(abs(o - out.other_bytes(f, s.adapter)) / p for o, s, f, p in zip(others, shapes, features, peaks))
    out = replace(out, other_spread=spread)
    if device != "cuda":
        return out
    pressure = [cache_pressure(s) for s in shapes]
    x = np.array([(p, u, 1.0) for p, u in zip(peaks, pressure)])
    cache = tuple(float(c) for c in nonnegative_lstsq(x, np.array([r.allocator_cache_bytes for r in cells], float)))
    non_pytorch = int(statistics.median(r.non_pytorch_bytes for r in cells if r.non_pytorch_bytes is not None))
    calibrated = replace(out, cache=cache, non_pytorch_bytes=non_pytorch)
    errors = [abs(p + calibrated.cache_bytes(p, u) + non_pytorch - r.nvml_peak_process_used_bytes)
              / r.nvml_peak_process_used_bytes for r, p, u in zip(cells, peaks, pressure)
              if r.nvml_peak_process_used_bytes]
    return replace(calibrated, cache_max_error=max(errors, default=0.0))


def _env(run_dir: Path) -> dict[str, Any]:
    """The run's env.json (``env_mod.read_env``: one line naming it when it does not read), {} without one."""
    return env_mod.read_env(run_dir / "env.json") or {}


def calibrate(run_dirs: Sequence[Path], base: Calibration) -> Calibration:
    """``base`` refitted to the runs: the device calibration of the runs' device kind, and the fallback groups when
    the runs are CPU runs with enough shapes (the ``calibrate`` suite); the rest of ``base`` is kept.

    Raises:
        UserError: nothing in the runs could be fitted.
    """
    device = fit_device(run_dirs)
    out = base.with_device(device) if device is not None else base
    try:
        groups = fit(run_dirs)
    except UserError:
        if device is None:
            raise
        return out
    return replace(groups, devices=out.devices)
