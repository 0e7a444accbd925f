"""The fitted part of `memprof plan`: saved activations and temporaries as linear functions of a model's shape.

Two small linear models per precision and adapter kind (``bf16/qlora``), fitted to memprof's own measured runs:

- saved activations = tokens · c · (layers·hidden, layers·intermediate, layers·kv_width, hidden, vocab)
  + d · adapted weight elements: bytes autograd keeps per token for each unit of each width (per layer, and once
  for the embeddings, final norm and logits), and per forward for each adapted weight element (DoRA saves a
  weight-sized tensor per adapted layer; the fit gives the other kinds ~0 there);
- temporaries = t · (saved activations, tokens·vocab, 1): what the peak holds beyond the exactly known parts
  (gradients of activations in backward, the fp32 logits and their gradient, and on the CPU the pages the process
  touches for the first time), signed in measurement but fitted with non-negative coefficients so that it
  extrapolates sensibly. The optimizer step's own scratch (torch's foreach AdamW: one param-sized tensor) is not a
  feature: in tiny calibration models it is lost in the constant, and at scale the step runs after activations
  are freed; a full fine-tune at a small batch can peak there instead, above the plan.

Coefficients live in ``memprof/plan/calibration.json`` with the device, library versions and run they came from. The
shipped file comes from CPU runs of the ``calibrate`` suite (fp32 and bf16, tiny Llama shapes): on a GPU the
activations are close (the same tensors are saved) but temporaries and the allocator's cache differ, so GPU
figures are estimates until calibrated on a GPU: ``memprof run calibrate --device cuda`` then
``memprof plan --calibrate results/<run>``.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memprof.errors import UserError

DEFAULT_PATH = Path(__file__).parent / "calibration.json"
SCHEMA_VERSION = 1
ACTIVATION_FEATURES = ("layers*hidden", "layers*intermediate", "layers*kv_width", "hidden", "vocab",
                       "adapted_weight_numel/tokens")
TEMPORARY_FEATURES = ("activation_bytes", "tokens*vocab", "constant")
# Without a measurement on a GPU: a CUDA 12 context with lazy module loading and cuBLAS's workspace, as commonly
# reported for PyTorch (a few hundred MiB); a GPU calibration replaces it with NVML's non-PyTorch figure.
SHAPES_NEEDED = 5  # distinct model shapes: the per-token widths must vary independently to be told apart
ASSUMED_CUDA_CONTEXT_BYTES = 512 << 20
ASSUMED_CUDA_CONTEXT_SOURCE = "assumed (512 MiB), not measured"
# fp16 keeps the same element sizes as bf16: its runs are not needed to plan it.
PRECISION_FALLBACK = {"fp16": "bf16"}


@dataclass(frozen=True)
class Shape:
    """The widths of a decoder-only transformer that activations scale with."""

    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    max_positions: int
    heads: int = 0  # query heads: eager attention keeps one seq × seq matrix per head and layer

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(layers=config.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   kv_width=kv_heads * head_dim, vocab=config.vocab_size,
                   max_positions=getattr(config, "max_position_embeddings", None) or 0, heads=heads)

    def activation_features(self) -> tuple[int, ...]:
        """The per-token features: the first five of ``ACTIVATION_FEATURES``."""
        return (self.layers * self.hidden, self.layers * self.intermediate, self.layers * self.kv_width,
                self.hidden, self.vocab)


@dataclass(frozen=True)
class Group:
    """Coefficients for one precision/adapter kind, and how well they reproduced the runs they came from."""

    activation: tuple[float, ...]
    temporaries: tuple[float, ...]
    records: int
    activation_max_error: float
    peak_max_error: float

    def activation_bytes(self, shape: Shape, tokens: int, adapted_numel: int, checkpointing: bool = False,
                         residual_itemsize: int = 4) -> int:
        """Saved activations at the end of forward for ``tokens`` tokens in one micro-batch, ``adapted_numel``
        base weight elements under an adapter. With gradient checkpointing each layer keeps only its input
        (derived from the fitted widths; what one layer's recomputation adds in backward is
        ``recompute_bytes``)."""
        c = self.activation
        outside = c[3] * shape.hidden + c[4] * shape.vocab
        if checkpointing:
            return round(tokens * (shape.layers * shape.hidden * residual_itemsize + outside))
        return round(tokens * (shape.layers * self._per_layer(shape) + outside) + c[5] * adapted_numel)

    def recompute_bytes(self, shape: Shape, tokens: int, adapted_numel: int) -> int:
        """One layer's activations, alive again while gradient checkpointing recomputes it in backward."""
        return round(tokens * self._per_layer(shape) + self.activation[5] * adapted_numel / max(shape.layers, 1))

    def _per_layer(self, shape: Shape) -> float:
        c = self.activation
        return c[0] * shape.hidden + c[1] * shape.intermediate + c[2] * shape.kv_width

    def temporary_bytes(self, activation_bytes: int, tokens: int, vocab: int) -> int:
        features = (activation_bytes, tokens * vocab, 1)
        return round(sum(t * x for t, x in zip(self.temporaries, features)))


@dataclass(frozen=True)
class Calibration:
    """Fitted groups and where they came from."""

    groups: dict[str, Group]
    source: dict[str, Any]
    cuda_context_bytes: int = ASSUMED_CUDA_CONTEXT_BYTES
    cuda_context_source: str = ASSUMED_CUDA_CONTEXT_SOURCE
    note: str = ""
    path: str = ""
    features: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "activation_per_token": ACTIVATION_FEATURES, "temporaries": TEMPORARY_FEATURES})

    @property
    def device(self) -> str:
        return str(self.source.get("device", "?"))

    def group(self, precision: str, adapter_kind: str) -> Group:
        """The coefficients for a precision and adapter kind.

        Raises:
            UserError: when the calibration has none for them.
        """
        for p in (precision, PRECISION_FALLBACK.get(precision)):
            if p and f"{p}/{adapter_kind}" in self.groups:
                return self.groups[f"{p}/{adapter_kind}"]
        raise UserError(self.path or "calibration", f"no coefficients for {precision}/{adapter_kind} (calibrated: "
                        f"{', '.join(sorted(self.groups))}); run that combination and refit with "
                        "`memprof plan --calibrate`")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return {"schema_version": SCHEMA_VERSION, **data}


def load(path: Path = DEFAULT_PATH) -> Calibration:
    """Read a calibration file.

    Raises:
        UserError: when it cannot be read or is not a memprof calibration.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version {data.get('schema_version')} (this memprof reads {SCHEMA_VERSION})")
        if {k: tuple(v) for k, v in data["features"].items()} != Calibration({}, {}).features:
            raise ValueError(f"features {data['features']} are not the ones this memprof fits")
        groups = {name: Group(tuple(g["activation"]), tuple(g["temporaries"]), g["records"],
                              g["activation_max_error"], g["peak_max_error"]) for name, g in data["groups"].items()}
        return Calibration(groups, data["source"], data["cuda_context_bytes"], data["cuda_context_source"],
                           data.get("note", ""), str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(str(path), f"not a memprof calibration file: {err}") from None


def save(calibration: Calibration, path: Path) -> None:
    try:
        path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(str(path), f"cannot write: {err}") from None


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
    from memprof.results import env as env_mod
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
            env = json.loads((run_dir / "env.json").read_text(encoding="utf-8"))
        except OSError as err:
            raise UserError(str(run_dir), f"not a complete memprof result folder: {err}") from None
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
    note = (f"Fitted by `memprof plan --calibrate` to {len(found)} cells memprof measured on {source['device']} "
            f"({source.get('machine', '?')}), runs {', '.join(source['runs'])}: {', '.join(sorted(groups))}.")
    if source["device"] == "cpu":
        note += (" The peak there is RSS growth; GPU figures differ until calibrated on a GPU (allocator cache, "
                 "CUDA context, kernels' workspaces): memprof run calibrate --device cuda, then memprof plan "
                 "--calibrate results/<run>.")
    source["cells"] = len(found)
    return Calibration(groups, source, context, context_source, note)

