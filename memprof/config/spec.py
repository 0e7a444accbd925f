"""A cell's configuration as nested frozen specs: what one measurement trains, and nothing about how it went.

Enters: values from a suite file (``memprof.suite``), the command line (``memprof plan`` / ``fit``), or a live
model and optimizer (``memprof.api``). Leaves: a ``CellConfig`` that the worker builds from, that every Record
carries, that ``plan`` sizes, and whose ``repeat_key`` ``compare`` and ``report`` group repeats by.

The axes a suite's grid can vary are listed once, in ``AXES``: each names the field it sets and its part of a cell's
key. A new axis is a field of a spec here and an entry in ``AXES``; the suite's grid schema, cell keys and hashes,
the records, their CSV columns and the tables' varying columns all follow from those two.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from memprof.config.presets import PRESETS

# Every transformers.SchedulerType; the metric-driven ones step on the eval loss (so they need eval_every > 0).
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
             "warmup_stable_decay", "greedy")
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
ADAPTER_KINDS = ("none", "lora", "qlora", "dora")
# What memprof's adapters are when a suite says nothing (peft's own defaults differ: lora_alpha 8, q/v only).
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "attention"}


def _on_off(value: Any) -> Any:
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


def _int_to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, BeforeValidator(_int_to_float), Field(gt=0)]
NonNegativeFloat = Annotated[float, BeforeValidator(_int_to_float), Field(ge=0)]
Probability = Annotated[float, BeforeValidator(_int_to_float), Field(ge=0, le=1)]
# A cell's wall-clock limit, at most a week: far beyond the few steps a cell measures, and within what enforces it
# (the zygote's poll takes whole milliseconds in a C int: 24 days; torch.distributed's timeout a timedelta).
MAX_TIMEOUT_S = 7 * 24 * 3600.0
TimeoutSeconds = Annotated[float, BeforeValidator(_int_to_float), Field(gt=0, le=MAX_TIMEOUT_S)]
# A micro-batch's bounds: far past any real run (a million sequences; 16M tokens each), and where a batch's logits
# (batch × seq × a vocabulary up to 2**18) still count in int64. Beyond them torch fails in C++ at setup instead of
# running out of memory, which is a result.
MAX_BATCH_SIZE = 2**20
MAX_SEQ_LEN = 2**24
# Ranks a plan is drawn for; a run forks one process per rank, at most one per GPU or CPU core of its machine
# (memprof.run.ranks).
MAX_WORLD_SIZE = 1024
MIN_MEMORY_BUDGET = 8 << 20  # a thread's stack reserves this much address space
Precision = Literal["fp32", "bf16", "fp16"]
Checkpointing = Annotated[Literal["off", "on", "reentrant"], BeforeValidator(_on_off)]  # true/false: on/off
Attention = Literal["eager", "sdpa", "flash_attention_2"]


class Spec(BaseModel):
    """Frozen, strict and closed: an unknown key or a wrong type is an error naming the field. Every float is finite:
    a NaN or an infinity passes no bound (a NaN timeout, an infinite target loss) and is no setting of a run."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class ModelSpec(Spec):
    """The model: a preset (``memprof.config.presets``), an inline transformers config, or a local folder."""

    name: str = ""
    preset: str = ""
    path: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(bool(s) for s in (self.preset, self.path, self.config)) > 1:
            raise ValueError("give exactly one of 'preset', 'path' or 'config'")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset '{self.preset}'; known: {', '.join(PRESETS)}")
        if self.config and "model_type" not in self.config:
            raise ValueError("an inline config needs 'model_type' (e.g. \"llama\")")
        return self

    @property
    def known(self) -> bool:
        """False for a model read back from a schema-1 record, which kept only its name."""
        return bool(self.preset or self.path or self.config)


class QuantSpec(Spec):
    """QLoRA's frozen base: bitsandbytes 4-bit weights, and peft's k-bit preparation."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # peft's prepare_model_for_kbit_training: every parameter that is not 4-bit (embeddings, norms, the head) cast
    # to fp32. False skips it, as users who keep them in the model's precision do.
    prepare_for_kbit_training: bool = True


class AdapterSpec(Spec):
    """What trains: ``none`` (every parameter), or a peft LoRA/DoRA adapter whose ``lora`` table holds
    ``peft.LoraConfig``'s own keyword arguments (``target_modules = "attention"`` is memprof's name for the four
    attention projections); ``qlora`` quantises the base as ``quant`` says."""

    name: str = ""
    kind: Literal["none", "lora", "qlora", "dora"] = "lora"
    lora: dict[str, Any] = Field(default_factory=lambda: dict(LORA_DEFAULTS))
    quant: QuantSpec = QuantSpec()

    @property
    def rank(self) -> int | None:
        """The adapter's rank (``r``; per-module ranks in ``rank_pattern`` aside); None without an adapter."""
        return None if self.kind == "none" else int(self.lora.get("r", LORA_DEFAULTS["r"]))


class OptimizerSpec(Spec):
    """``label``: the suite's name for it; ``name``: a catalogue name or ``module:Class``; ``kwargs`` on top."""

    label: str
    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ShapeSpec(Spec):
    """One optimizer step's work: micro-batches of ``batch_size`` × ``seq_len`` tokens, ``grad_accum`` of them."""

    # 0: not known (a tracked loop nobody told); a suite's cells have >= 1
    batch_size: Annotated[int, Field(ge=0, le=MAX_BATCH_SIZE)] = 1
    seq_len: Annotated[int, Field(ge=0, le=MAX_SEQ_LEN)] = 128
    grad_accum: PositiveInt = 1
    precision: Precision = "fp32"

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch: what activations scale with."""
        return self.batch_size * self.seq_len


class ParallelSpec(Spec):
    """How many ranks a cell runs on and what they shard: ddp replicates everything, zero1 partitions the
    optimizer state (ZeroRedundancyOptimizer), fsdp2 shards parameters, gradients and state (``fully_shard``)."""

    strategy: Literal["none", "ddp", "zero1", "fsdp2"] = "none"
    world_size: Annotated[int, Field(gt=0, le=MAX_WORLD_SIZE)] = 1

    @model_validator(mode="after")
    def _ranks_match(self) -> ParallelSpec:
        if self.strategy == "none" and self.world_size != 1:
            raise ValueError("world_size > 1 needs a strategy (ddp, zero1 or fsdp2)")
        return self


class Levers(Spec):
    """Memory levers: gradient checkpointing (off, on = non-reentrant, reentrant), the attention kernel, sharding, and
    the causal-LM loss in chunks of ``loss_chunk`` tokens (0: transformers' loss over the whole logits)."""

    gradient_checkpointing: Checkpointing = "off"
    attn_implementation: Attention = "sdpa"
    parallel: ParallelSpec = ParallelSpec()
    loss_chunk: NonNegativeInt = 0

    @model_validator(mode="after")
    def _chunked_loss_unsharded(self) -> Levers:
        if self.loss_chunk and self.parallel.strategy != "none":
            raise ValueError(f"loss_chunk with parallel {self.parallel.strategy}: the chunked loss calls the decoder "
                             f"and its head outside the forward that {self.parallel.strategy} wraps, so it runs "
                             f"unsharded only")
        return self


HELD_OUT_FRACTION = 0.1  # of a corpus's tokens, its end, never trained on: the held-out evaluation's


class DataSpec(Spec):
    """Training text: Python's standard library, a synthetic Markov chain (``seed``), or a local file."""

    source: Literal["stdlib", "synthetic", "file"] = "stdlib"
    path: str = ""
    seed: int = 0  # of the synthetic chain: the same task for every repeat (repeats vary init and batch order)


class TrainingSpec(Spec):
    """How the cell trains: LR and schedule, steps (the first ``warmup_steps`` left out of timing), clipping,
    held-out evaluation, the seed of this repeat and the data."""

    lr: NonNegativeFloat = 1e-3  # 0: a run that measures memory and moves no weight
    schedule: str = "constant"
    schedule_kwargs: dict[str, Any] = Field(default_factory=dict)
    lr_warmup_steps: NonNegativeInt = 0
    steps: NonNegativeInt = 10  # a suite's cells have at least one (memprof.suite); a tracked loop may have none
    warmup_steps: NonNegativeInt = 2
    max_grad_norm: NonNegativeFloat = 1.0
    eval_every: NonNegativeInt = 0  # steps between evaluations; 0: only after the last step
    eval_batches: NonNegativeInt = 4  # fixed held-out batches per evaluation; 0: no evaluation
    target_loss: PositiveFloat | None = None
    seed: int = 0
    repeat: NonNegativeInt = 0
    data: DataSpec = DataSpec()

    @model_validator(mode="after")
    def _known_schedule(self) -> TrainingSpec:
        if self.schedule not in SCHEDULES and self.schedule != "external":  # external: a user's own loop
            raise ValueError(f"unknown schedule '{self.schedule}'; known: {', '.join(SCHEDULES)}")
        return self


class Budget(Spec):
    """Where the cell runs and what it may use: the device, a wall-clock limit, and on the CPU an address-space
    budget beyond the worker's size (a real OOM)."""

    device: Literal["auto", "cpu", "cuda"] | str = "auto"
    timeout_s: TimeoutSeconds = 600.0
    memory_budget_bytes: NonNegativeInt = 0


LIMITS = ("timeout_s", "memory_budget_bytes")  # Budget fields that limit a cell without changing what it runs


class CellConfig(Spec):
    """Everything a worker needs to build and train one configuration; ``suite`` and ``index`` place it in a run."""

    suite: str = ""
    index: NonNegativeInt = 0
    model: ModelSpec
    adapter: AdapterSpec = AdapterSpec()
    optimizer: OptimizerSpec
    shape: ShapeSpec = ShapeSpec()
    levers: Levers = Levers()
    training: TrainingSpec = TrainingSpec()
    budget: Budget = Budget()

    @property
    def key(self) -> str:
        """Human-readable and stable: the same configuration gives the same key in any run. Lever axes appear
        only when they differ from their defaults, so keys from before a lever existed stay as they were."""
        head = [axis.token(axis.get(self)) for axis in AXES if not axis.lever]
        levers = [axis.token(axis.get(self)) for axis in AXES if axis.lever and not axis.is_default(self)]
        return "/".join([*head, f"seed{self.training.seed}", *levers])

    @property
    def repeat_key(self) -> str:
        """The key its repeats share: the seed of repeat 0 in place of this repeat's."""
        first = self.model_copy(update={"training": self.training.model_copy(
            update={"seed": self.training.seed - self.training.repeat, "repeat": 0})})
        return first.key

    def repeat_key_without(self, axis: str) -> str:
        """``repeat_key`` without ``axis``'s token: the configuration apart from that axis (a search's, a sweep's)."""
        searched = AXIS_BY_NAME[axis]
        return "/".join(part for part in self.repeat_key.split("/") if part != searched.token(searched.get(self)))

    @property
    def config_hash(self) -> str:
        """Hash of every field that defines the measurement: not where it sits in a run (suite, index) nor the
        limits it ran under (a wall-clock limit, a memory budget: what runs is the same, only whether it fits
        differs). Fields at their defaults stay out, so a field added later with a default leaves the hashes of
        earlier configurations as they were."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude={"suite", "index"})
        for limit in LIMITS:
            data.get("budget", {}).pop(limit, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tokens_per_step(self) -> int:
        return self.shape.tokens * self.shape.grad_accum

    @property
    def levers_label(self) -> str:
        """The levers pulled away from their defaults, for people ('' for none): ``ckpt eager fsdp2×8``."""
        return " ".join((axis.show or axis.token)(axis.get(self)) for axis in AXES
                        if axis.lever and not axis.is_default(self))

    def axis_values(self) -> dict[str, Any]:
        """Each axis's value as tables show it (a spec by its name)."""
        return {axis.name: axis.display(axis.get(self)) for axis in AXES}

    def with_values(self, values: Mapping[str, Any]) -> CellConfig:
        """A copy with fields replaced by dotted path (``{"shape.batch_size": 8}``), each validated."""
        data = self.model_dump()
        for path, value in values.items():
            *parents, leaf = path.split(".")
            node = data
            for name in parents:
                node = node[name]
            node[leaf] = value.model_dump() if isinstance(value, BaseModel) else value
        return CellConfig.model_validate(data, strict=False)


@dataclass(frozen=True)
class Axis:
    """One thing a suite's grid can vary.

    Attributes:
        name: its key in ``[grid]`` (and its column in cells.csv and the tables).
        path: the field it sets, dotted inside ``CellConfig`` (``shape.batch_size``; ``model`` for a named spec).
        token: its part of a cell's key.
        lever: a lever's token joins the key (after the seed) only when it is not the field's default.
        label: the column title in tables.
        show: how a lever is named for people, when not by its token.
        minimum: the least value a suite's grid takes, where it is more than the field's own (a size: 1).
        maximum: the field's own bound, for values checked before a cell is made of them (command-line flags).
        default_text: how a table cell names a lever at its default (sdpa, off).
    """

    name: str
    path: str
    token: Callable[[Any], str] = str
    lever: bool = False
    label: str = ""
    show: Callable[[Any], str] | None = None
    minimum: int | None = None
    maximum: int | None = None
    default_text: str = "–"

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def named(self) -> bool:
        """Model, adapter and optimizer: the grid names a spec (a preset or a suite table) instead of a value."""
        return "." not in self.path

    def get(self, config: CellConfig) -> Any:
        value: Any = config
        for name in self.path.split("."):
            value = getattr(value, name)
        return value

    def default(self) -> Any:
        parent, _, leaf = self.path.rpartition(".")
        spec: type[Spec] = CellConfig
        for name in filter(None, parent.split(".")):
            spec = spec.model_fields[name].annotation  # type: ignore[assignment]
        return spec.model_fields[leaf].get_default(call_default_factory=True)

    def is_default(self, config: CellConfig) -> bool:
        return self.get(config) == self.default()

    def text(self, config: CellConfig) -> str:
        """This axis of ``config`` as a table cell shows it: a lever at its default by ``default_text``."""
        value = self.get(config)
        if self.lever:
            return (self.show or self.token)(value) if not self.is_default(config) else self.default_text
        return f"{value:g}" if isinstance(value, float) else str(self.display(value))

    def columns(self, config: CellConfig) -> dict[str, Any]:
        """This axis of ``config`` as data (cells.csv, ``plan --json``): a spec-valued one by its fields
        (``parallel.strategy``, ``parallel.world_size``), any other by ``display`` (a number stays a number)."""
        value = self.get(config)
        if isinstance(value, Spec) and not self.named:
            return {f"{self.name}.{k}": v for k, v in value.model_dump(mode="json").items()}
        return {self.name: self.display(value)}

    def display(self, value: Any) -> Any:
        """The value as data shows it (a spec by its name)."""
        if isinstance(value, (ModelSpec, AdapterSpec)):
            return value.name
        if isinstance(value, OptimizerSpec):
            return value.label
        return self.token(value) if isinstance(value, Spec) else value


def _checkpointing(value: str) -> str:
    return "gc" if value == "on" else f"gc-{value}"


AXES: tuple[Axis, ...] = (
    Axis("model", "model", lambda m: m.name),
    Axis("adapter", "adapter", lambda a: a.name),
    Axis("optimizer", "optimizer", lambda o: o.label),
    Axis("batch_size", "shape.batch_size", "b{}".format, label="batch", minimum=1, maximum=MAX_BATCH_SIZE),
    Axis("seq_len", "shape.seq_len", "s{}".format, label="seq", minimum=2,  # one token leaves none to predict
         maximum=MAX_SEQ_LEN),
    Axis("grad_accum", "shape.grad_accum", "ga{}".format, label="accum"),
    Axis("precision", "shape.precision"),
    Axis("lr", "training.lr", lambda lr: f"lr{lr:g}"),
    Axis("schedule", "training.schedule"),
    Axis("gradient_checkpointing", "levers.gradient_checkpointing", _checkpointing, lever=True, label="ckpt",
         show=lambda v: "ckpt" if v == "on" else f"ckpt-{v}", default_text="off"),
    Axis("attn_implementation", "levers.attn_implementation", lever=True, label="attention", default_text="sdpa"),
    Axis("parallel", "levers.parallel", lambda p: f"{p.strategy}x{p.world_size}", lever=True,
         show=lambda p: f"{p.strategy}×{p.world_size}", default_text="none"),
    Axis("loss_chunk", "levers.loss_chunk", "lc{}".format, lever=True, label="loss chunk",
         show="chunked-loss-{}".format, default_text="off"),
)
AXIS_BY_NAME: dict[str, Axis] = {axis.name: axis for axis in AXES}


def varying(configs: Sequence[CellConfig], always: tuple[str, ...] = ()) -> list[Axis]:
    """The axes whose values differ between ``configs`` (and those named in ``always``), in ``AXES`` order: what
    tells one cell of a run from another."""
    return [axis for axis in AXES
            if axis.name in always or len({repr(axis.get(c)) for c in configs}) > 1]
