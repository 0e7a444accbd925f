"""The measured part of `memprof plan`: what the analytic model of a step leaves to measurement, per kind of device,
and the fitted fallback for cells that model does not cover. Fitting them is ``memprof.plan.calibrate``'s job.

Per device kind (``DeviceCalibration``, fitted to runs measured there): the median unnamed remainder of the peak,
the allocator's cache beyond the peak (CUDA) and the memory outside PyTorch (CUDA context, libraries).

The fallback: two small linear models per precision and adapter kind (``bf16/qlora``), fitted to memprof's own
measured runs:

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

Everything lives in ``memprof/plan/calibration.json`` with the machine, library versions and runs it came from. The
shipped fallback comes from CPU runs of the ``calibrate`` suite (fp32 and bf16, tiny Llama shapes), the CUDA device
calibration from the H200 runs in ``results/gpu/h200-2026-11-27``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from memprof.errors import UserError
from memprof.measure import step_memory
from memprof.measure.step_memory import StepShape

DEFAULT_PATH = Path(__file__).parent / "calibration.json"
SCHEMA_VERSION = 2  # 2: per-device calibrations beside the fallback groups
ACTIVATION_FEATURES = ("layers*hidden", "layers*intermediate", "layers*kv_width", "hidden", "vocab",
                       "adapted_weight_numel/tokens")
TEMPORARY_FEATURES = ("activation_bytes", "tokens*vocab", "constant")
OTHER_FEATURES = ("constant", "tokens*layers*(hidden+intermediate)")
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
    model_type: str = ""
    experts: int = 0  # a mixture of experts' experts per layer

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        """The widths of ``config``; a mixture of experts' MLP width is what each token passes through: its
        experts per token times one expert's width."""
        from memprof.train.models import experts as experts_of

        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        experts = experts_of(config)
        if experts:
            expert = getattr(config, "moe_intermediate_size", None) or intermediate
            intermediate = (getattr(config, "num_experts_per_tok", None) or 1) * expert
        return cls(layers=config.num_hidden_layers, hidden=hidden, intermediate=intermediate,
                   kv_width=kv_heads * head_dim, vocab=config.vocab_size,
                   max_positions=getattr(config, "max_position_embeddings", None) or 0, heads=heads,
                   model_type=config.model_type, experts=experts)

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
class DeviceCalibration:
    """What the analytic model of a step leaves to measurement on one kind of device, fitted to cells measured
    there: the plan's fitted and measured parts, each with where it came from.

    Attributes:
        other: the unnamed remainder of the peak (allocator peak on CUDA, RSS growth on the CPU) as
            c + d · tokens · layers · (hidden + intermediate) (``OTHER_FEATURES``): on the CPU, glibc keeps freed
            pages of the step's per-layer transients (64-68 MB + 15-17 B per unit there); on CUDA d fits ~0.
        other_by_adapter: per adapter kind (``StepShape.adapter``) with enough cells, the median of what
            ``other`` leaves of its cells' remainders, added to it (negative where the kind's remainder is smaller):
            on the CPU a full fine-tune's remainder runs ~18 MB below the fit and DoRA's ~10 MB above it.
        other_spread: the largest |remainder - fit| as a fraction of its cell's peak: the fitted part's error.
        cache: the allocator's reserved-but-not-allocated bytes at its peak, as a · peak + b · ``cache_pressure``
            + c (CUDA).
        cache_max_error: the largest error of ``cache`` over the cells, as a fraction of their NVML peak.
        non_pytorch_bytes: the median of NVML's figure for the process minus the allocator's reserved (CUDA).
    """

    device: str
    machine: str
    runs: tuple[str, ...]
    cells: int
    other: tuple[float, float]
    other_spread: float
    other_by_adapter: dict[str, float] = field(default_factory=dict)
    cache: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cache_max_error: float = 0.0
    non_pytorch_bytes: int = 0

    @property
    def source(self) -> str:
        return f"{self.cells} cells on {self.machine} ({', '.join(self.runs)})"

    def other_bytes(self, feature: int, adapter: str) -> int:
        """The unnamed remainder of a step with ``other_feature`` ``feature`` under an ``adapter`` kind."""
        c, d = self.other
        return round(c + d * feature + self.other_by_adapter.get(adapter, 0.0))

    def cache_bytes(self, peak_bytes: int, pressure_bytes: int) -> int:
        a, b, c = self.cache
        return max(0, round(a * peak_bytes + b * pressure_bytes + c))


def other_feature(tokens: int, layers: int, hidden: int, intermediate: int) -> int:
    """What the unnamed remainder grows with: the step's per-layer working widths over its tokens."""
    return tokens * layers * (hidden + intermediate)


def cache_pressure(shape: StepShape) -> int:
    """Freed blocks the caching allocator keeps beside its peak: the loss's two fp32 [T, V] gradients and an
    attention backward's score-shaped transients come at different moments and, being of other sizes, cannot
    reuse each other's blocks, so the smaller of the two stays reserved (H200: 0.75-1.2x of it)."""
    layer = step_memory.attention_backward_parts(shape)
    attention = layer.get("softmax_bwd_transient", 0) + layer.get("flash_bwd_transient", 0)
    return min(sum(step_memory.loss_backward_transient(shape).values()), attention)


@dataclass(frozen=True)
class Calibration:
    """Fitted groups and per-device calibrations, and where they came from."""

    groups: dict[str, Group]
    source: dict[str, Any]
    cuda_context_bytes: int = ASSUMED_CUDA_CONTEXT_BYTES
    cuda_context_source: str = ASSUMED_CUDA_CONTEXT_SOURCE
    note: str = ""
    path: str = ""
    devices: dict[str, DeviceCalibration] = field(default_factory=dict)
    features: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "activation_per_token": ACTIVATION_FEATURES, "temporaries": TEMPORARY_FEATURES, "other": OTHER_FEATURES})

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

    def with_device(self, device: DeviceCalibration) -> Calibration:
        return replace(self, devices={**self.devices, device.device: device})


def load(path: Path = DEFAULT_PATH) -> Calibration:
    """Read a calibration file, every field checked against its type.

    Raises:
        UserError: when it cannot be read or is not a memprof calibration, naming the field at fault.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("schema_version") not in (1, SCHEMA_VERSION):
            raise ValueError(f"schema_version {data.get('schema_version')} (this memprof reads 1 and "
                             f"{SCHEMA_VERSION})")
        fields = {k: v for k, v in data.items() if k != "schema_version"}
        calibration = TypeAdapter(Calibration).validate_python({**fields, "path": str(path)}, strict=False)
        expected = Calibration({}, {}).features
        if "features" not in data or calibration.features != expected:
            raise ValueError(f"features {data.get('features')} are not the ones this memprof fits")
        for name, group in calibration.groups.items():
            for part, features in (("activation", ACTIVATION_FEATURES), ("temporaries", TEMPORARY_FEATURES)):
                if len(getattr(group, part)) != len(features):
                    raise ValueError(f"groups.{name}.{part}: {len(features)} coefficients, one per feature")
        return calibration
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise UserError(str(path), f"not a memprof calibration file: {where}: {first['msg']}") from None
    except (OSError, ValueError) as err:
        raise UserError(str(path), f"not a memprof calibration file: {err}") from None


def save(calibration: Calibration, path: Path) -> None:
    try:
        path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise UserError(str(path), f"cannot write: {err}") from None


