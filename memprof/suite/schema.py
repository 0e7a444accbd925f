"""A suite file's tables, validated field by field (pydantic): the user's words, before they become cells.

The grid's schema is made from ``memprof.config.spec.AXES``: each axis takes the type and constraints of the
field it sets, one value or a list of them. Adapter tables are peft's own ``LoraConfig`` keywords (checked by
peft itself before a run, see ``memprof.run.preflight``) beside memprof's few of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, create_model, field_validator,
                      model_validator)

from memprof.config import catalogue
from memprof.config.spec import (AXES, LORA_DEFAULTS, MIN_MEMORY_BUDGET, AdapterSpec, Axis, Budget, CellConfig,
                                 DataSpec, ModelSpec, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                                 Probability, QuantSpec, Spec, TimeoutSeconds, TrainingSpec)
from memprof.errors import UserError
from memprof.results.metrics import resolve_rules


# A suite's name: also the start of its result folders' names, so one path component
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SuiteSettings(Spec):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: PositiveInt = 10
    warmup_steps: NonNegativeInt = 2
    seed: int = 0
    repeats: PositiveInt = 1
    timeout_s: TimeoutSeconds = 600.0
    memory_budget_bytes: NonNegativeInt = 0
    lr_warmup_steps: NonNegativeInt = 0
    max_grad_norm: NonNegativeFloat = 1.0
    lr_warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0  # of the steps, rounded up (as transformers)
    eval_every: NonNegativeInt = 0  # steps between evaluations; 0: only after the last step
    eval_batches: NonNegativeInt = 4  # fixed held-out batches per evaluation; 0: no evaluation
    target_loss: PositiveFloat | None = None  # for steps_to_target / seconds_to_target

    @field_validator("memory_budget_bytes")
    @classmethod
    def _a_budget_a_worker_starts_in(cls, budget: int) -> int:
        """Checked where a suite sets it (records of any budget still load)."""
        if 0 < budget < MIN_MEMORY_BUDGET:
            raise ValueError(f"must be 0 (none) or at least {MIN_MEMORY_BUDGET:,} (8 MiB, a thread's stack): a 1 MB "
                             "budget hung its worker in Python's thread start")
        return budget

    @model_validator(mode="after")
    def _measured_steps_remain(self) -> SuiteSettings:
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be smaller than steps (no step would be measured)")
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("give lr_warmup_steps or lr_warmup_ratio, not both")
        return self


def in_folder(path: str, info: ValidationInfo) -> str:
    """A path as a suite wrote it, a relative one joined to the folder the suite's paths start from (the validation
    context's ``folder``, see ``memprof.suite.load``): a suite means the same files from any working directory."""
    folder = (info.context or {}).get("folder")
    return str(Path(folder, path)) if path and folder else path


class DataTable(DataSpec):
    @field_validator("path")
    @classmethod
    def _a_file(cls, path: str, info: ValidationInfo) -> str:
        path = in_folder(path, info)
        if path and Path(path).is_dir():
            raise ValueError(f"is a directory, not a file: {path}")
        if path and not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
        if path and Path(path).stat().st_size == 0:
            raise ValueError(f"empty file: {path}")
        return path

    @model_validator(mode="after")
    def _path_for_file(self) -> DataTable:
        if (self.source == "file") != bool(self.path):
            raise ValueError("'path' is required with source = \"file\" and only then")
        return self


class ModelTable(ModelSpec):
    """A ``[models.NAME]`` table: the fields of ``ModelSpec`` but its name, which is the table's key, with exactly
    one of a preset, a local folder or an inline transformers config."""

    @model_validator(mode="before")
    @classmethod
    def _name_is_the_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data:
            raise ValueError("'name' is the table's key ([models.NAME]), not one of its fields")
        return data

    @field_validator("path")
    @classmethod
    def _a_folder(cls, path: str, info: ValidationInfo) -> str:
        path = in_folder(path, info)
        if path and not Path(path).exists():
            raise ValueError(f"no such folder: {path}")
        if path and not Path(path).is_dir():
            raise ValueError(f"not a folder: {path} (a local checkpoint is the folder from_pretrained reads)")
        if path and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path} has no config.json (a local checkpoint is the folder from_pretrained reads)")
        return path

    @model_validator(mode="after")
    def _a_source(self) -> ModelTable:
        if not self.known:
            raise ValueError("give exactly one of 'preset', 'path' or 'config'")
        return self

    def to_spec(self, name: str) -> ModelSpec:
        return ModelSpec(name=name, **self.model_dump(exclude={"name"}))


# memprof's short names for peft.LoraConfig's keywords
LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
# LoraConfig keywords whose values peft takes as they are and only a model build refuses (r <= 0, a dropout
# probability over 1) or that make no sense (a negative scaling): checked at load, without importing peft.
LORA_VALUES: dict[str, Any] = {"r": PositiveInt, "lora_alpha": NonNegativeFloat, "lora_dropout": Probability}
# QLoRA's settings, refused on another kind of adapter (where they do nothing). Not compute_dtype: the shipped
# levers-gpu suite sets it on a LoRA adapter, and calibration reads that suite back from the GPU runs made with it.
QUANT_KEYS = ("quant_type", "double_quant", "prepare_for_kbit_training")


class AdapterTable(BaseModel):
    """An ``[adapters.NAME]`` table: ``kind``, QLoRA's quantisation (for ``qlora`` only), and any
    ``peft.LoraConfig`` keyword (``alpha`` and ``dropout`` are accepted for ``lora_alpha`` and ``lora_dropout``)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    kind: Literal["none", "lora", "qlora", "dora"] = "lora"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prepare_for_kbit_training: bool = True

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for ours, peft in LORA_ALIASES.items():
                if ours in data and peft in data:
                    raise ValueError(f"give '{ours}' or '{peft}', not both")
        return data

    def to_spec(self, name: str) -> AdapterSpec:
        lora = dict(LORA_DEFAULTS)
        for key, value in (self.model_extra or {}).items():
            lora[LORA_ALIASES.get(key, key)] = value
        quant = QuantSpec(quant_type=self.quant_type, double_quant=self.double_quant,
                          compute_dtype=self.compute_dtype, prepare_for_kbit_training=self.prepare_for_kbit_training)
        return AdapterSpec(name=name, kind=self.kind, lora=lora if self.kind != "none" else {}, quant=quant)


BUILTIN_ADAPTERS: dict[str, AdapterTable] = {kind: AdapterTable(kind=kind) for kind in ("none", "lora", "qlora",
                                                                                       "dora")}


class OptimizerTable(Spec):
    optim: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("optim")
    @classmethod
    def _known(cls, name: str) -> str:
        error = catalogue.unknown(name)
        if error:
            raise ValueError(error)
        return name


def _listed(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


def _axis_field(axis: Axis) -> tuple[Any, Any]:
    """The grid field of an axis: one value or a list of the type of the field it sets (names for named axes)."""
    if axis.named:
        default = Field(min_length=1) if axis.name != "adapter" else Field(default=["lora"], min_length=1)
        return Annotated[list[str], BeforeValidator(_listed)], default
    parent, _, leaf = axis.path.rpartition(".")
    spec: type[Spec] = CellConfig
    for name in parent.split("."):
        spec = spec.model_fields[name].annotation  # type: ignore[assignment]
    info = spec.model_fields[leaf]
    item = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    if axis.minimum is not None:
        item = Annotated[item, Field(ge=axis.minimum)]
    return Annotated[list[item], BeforeValidator(_listed)], Field(default=[axis.default()], min_length=1)


GridSettings = create_model("GridSettings", __base__=Spec, **{axis.name: _axis_field(axis) for axis in AXES})


class Override(Spec):
    match: dict[str, Any]
    set: dict[str, Any]


class SuiteFile(Spec):
    suite: SuiteSettings
    data: DataTable = DataTable()
    grid: GridSettings  # type: ignore[valid-type]
    models: dict[str, ModelTable] = Field(default_factory=dict)
    adapters: dict[str, AdapterTable] = Field(default_factory=dict)
    optimizers: dict[str, OptimizerTable] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    override: list[Override] = Field(default_factory=list)
    schedules: dict[str, dict[str, Any]] = Field(default_factory=dict)  # a schedule's own kwargs, by name
    # `memprof compare` rules when a run of this suite is the current side: metric = "rule" (e.g. "10%")
    compare: dict[str, str] = Field(default_factory=dict)

    @field_validator("compare")
    @classmethod
    def _known_rules(cls, rules: dict[str, str]) -> dict[str, str]:
        try:
            resolve_rules(rules.items(), "compare")
        except UserError as err:
            raise ValueError(err.what) from None
        return rules


# [suite] settings an [[override]] may set, and the field each sets in a cell.
OVERRIDABLE: dict[str, str] = {"steps": "training.steps", "warmup_steps": "training.warmup_steps",
                               "lr_warmup_steps": "training.lr_warmup_steps", "timeout_s": "budget.timeout_s",
                               "memory_budget_bytes": "budget.memory_budget_bytes",
                               "max_grad_norm": "training.max_grad_norm"}
TRAINING_SETTINGS = tuple(name for name in TrainingSpec.model_fields if name in SuiteSettings.model_fields)
BUDGET_SETTINGS = tuple(name for name in Budget.model_fields if name in SuiteSettings.model_fields)
