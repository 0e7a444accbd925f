"""Suite files: TOML validated into typed settings, then expanded into the grid of Cells.

A suite is data, never code: it is parsed with ``tomllib`` and checked field by field; every error names the
file and the key path. Nothing heavy is imported here, so ``--dry-run`` and validation are instant.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memprof.config import catalogue
from memprof.config.cell import AXES, Cell
from memprof.errors import UserError
from memprof.config.presets import PRESETS

PACKAGED_SUITES = Path(__file__).parent.parent / "suites"

PositiveInt = Annotated[int, Field(gt=0)]
# Every transformers.SchedulerType; the metric-driven ones step on the eval loss (so they need eval_every > 0).
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
             "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
             "warmup_stable_decay", "greedy")
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
# Schedules transformers cannot build without one of these keys in their [schedules.<name>] table.
SCHEDULE_NEEDS = {"cosine_with_min_lr": ("min_lr", "min_lr_rate"),
                  "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
                  "warmup_stable_decay": ("num_decay_steps",)}
PRECISIONS = ("fp32", "bf16", "fp16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SuiteSettings(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: PositiveInt = 10
    warmup_steps: Annotated[int, Field(ge=0)] = 2
    seed: int = 0
    repeats: PositiveInt = 1
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    memory_budget_bytes: Annotated[int, Field(ge=0)] = 0
    lr_warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    lr_warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0  # of the steps, rounded up (as transformers)
    eval_every: Annotated[int, Field(ge=0)] = 0  # steps between evaluations; 0: only after the last step
    eval_batches: Annotated[int, Field(ge=0)] = 4  # fixed held-out batches per evaluation; 0: no evaluation
    target_loss: Annotated[float, Field(gt=0)] | None = None  # for steps_to_target / seconds_to_target

    @model_validator(mode="after")
    def _measured_steps_remain(self) -> SuiteSettings:
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be smaller than steps (no step would be measured)")
        if self.lr_warmup_steps and self.lr_warmup_ratio:
            raise ValueError("give lr_warmup_steps or lr_warmup_ratio, not both")
        return self


class DataSettings(_Strict):
    source: Literal["stdlib", "synthetic", "file"] = "stdlib"
    path: str = ""
    seed: int = 0  # of the synthetic chain: the same task for every repeat (repeats vary init and batch order)

    @model_validator(mode="after")
    def _path_for_file(self) -> DataSettings:
        if (self.source == "file") != bool(self.path):
            raise ValueError("'path' is required with source = \"file\" and only then")
        if self.path and not Path(self.path).is_file():
            raise ValueError(f"path: no such file: {self.path}")
        return self


class ModelSettings(_Strict):
    preset: str = ""
    path: str = ""
    config: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        sources = [s for s in ("preset", "path", "config") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'preset', 'path' or 'config'")
        if self.preset and self.preset not in PRESETS:
            raise ValueError(f"unknown preset '{self.preset}'; known: {', '.join(PRESETS)}")
        if self.config and "model_type" not in self.config:
            raise ValueError("an inline config needs 'model_type' (e.g. \"llama\")")
        return self


class AdapterSettings(_Strict):
    kind: Literal["none", "lora", "qlora", "dora"] = "lora"
    r: PositiveInt = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] | Literal["all-linear", "attention"] = "attention"
    use_rslora: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class OptimizerSettings(_Strict):
    optim: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("optim")
    @classmethod
    def _known(cls, name: str) -> str:
        if not catalogue.is_custom(name):
            try:
                catalogue.lookup(name)
            except KeyError as err:
                raise ValueError(err.args[0]) from None
        return name


class ParallelSettings(_Strict):
    """How many ranks a cell runs on and what they shard: ddp replicates everything, zero1 partitions the
    optimizer state (ZeroRedundancyOptimizer), fsdp2 shards parameters, gradients and state (``fully_shard``)."""

    strategy: Literal["none", "ddp", "zero1", "fsdp2"] = "none"
    world_size: PositiveInt = 1

    @model_validator(mode="after")
    def _ranks_match(self) -> ParallelSettings:
        if self.strategy == "none" and self.world_size != 1:
            raise ValueError("world_size > 1 needs a strategy (ddp, zero1 or fsdp2)")
        return self


class GridSettings(_Strict):
    model: list[str] = Field(min_length=1)
    adapter: list[str] = Field(default_factory=lambda: ["lora"], min_length=1)
    optimizer: list[str] = Field(min_length=1)
    batch_size: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    seq_len: list[PositiveInt] = Field(default_factory=lambda: [128], min_length=1)
    grad_accum: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    precision: list[Literal["fp32", "bf16", "fp16"]] = Field(default_factory=lambda: ["fp32"], min_length=1)
    lr: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [1e-3], min_length=1)
    schedule: list[str] = Field(default_factory=lambda: ["constant"], min_length=1)
    # off, on (non-reentrant, torch's recommendation) or reentrant; true/false mean on/off
    gradient_checkpointing: list[Literal["off", "on", "reentrant"]] = Field(default_factory=lambda: ["off"],
                                                                           min_length=1)
    attn_implementation: list[Literal["eager", "sdpa", "flash_attention_2"]] = Field(
        default_factory=lambda: ["sdpa"], min_length=1)
    parallel: list[ParallelSettings] = Field(default_factory=lambda: [ParallelSettings()], min_length=1)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _bools_are_on_off(cls, values: Any) -> Any:
        if isinstance(values, (bool, str)):
            values = [values]
        if not isinstance(values, list):
            return values
        return [{True: "on", False: "off"}[v] if isinstance(v, bool) else v for v in values]

    @field_validator("attn_implementation", mode="before")
    @classmethod
    def _one_attn(cls, values: Any) -> Any:
        return [values] if isinstance(values, str) else values

    @field_validator("parallel", mode="before")
    @classmethod
    def _one_table(cls, values: Any) -> Any:
        return [values] if isinstance(values, dict) else values

    @field_validator("lr", mode="before")
    @classmethod
    def _ints_are_floats(cls, values: Any) -> Any:
        if not isinstance(values, list):
            return values  # pydantic reports the wrong type
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in SCHEDULES:
                raise ValueError(f"unknown schedule '{name}'; known: {', '.join(SCHEDULES)}")
        return names


class Override(_Strict):
    match: dict[str, Any]
    set: dict[str, Any]


class SuiteFile(_Strict):
    suite: SuiteSettings
    data: DataSettings = DataSettings()
    grid: GridSettings
    models: dict[str, ModelSettings] = Field(default_factory=dict)
    adapters: dict[str, AdapterSettings] = Field(default_factory=dict)
    optimizers: dict[str, OptimizerSettings] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    override: list[Override] = Field(default_factory=list)
    schedules: dict[str, dict[str, Any]] = Field(default_factory=dict)  # a schedule's own kwargs, by name
    # `memprof compare` rules when a run of this suite is the current side: metric = "rule" (e.g. "10%")
    compare: dict[str, str] = Field(default_factory=dict)

    @field_validator("compare")
    @classmethod
    def _known_rules(cls, rules: dict[str, str]) -> dict[str, str]:
        from memprof.results.metrics import resolve_rules

        try:
            resolve_rules(rules.items(), "compare")
        except UserError as err:
            raise ValueError(err.what) from None
        return rules


BUILTIN_ADAPTERS: dict[str, AdapterSettings] = {
    "none": AdapterSettings(kind="none"),
    "lora": AdapterSettings(kind="lora"),
    "qlora": AdapterSettings(kind="qlora"),
    "dora": AdapterSettings(kind="dora"),
}


class Suite:
    """A validated suite: its source file, its settings and the cells it expands to."""

    def __init__(self, path: Path, text: str, spec: SuiteFile) -> None:
        self.path = path
        self.text = text
        self.spec = spec
        self.cells = _expand(path, spec)

    @property
    def name(self) -> str:
        return self.spec.suite.name

    @property
    def digest(self) -> str:
        """Hash of the suite text, used to check that a resumed run is the same suite."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def preflight_pairs(self) -> list[dict[str, Any]]:
        """The distinct (model, adapter) pairs of the cells, for the checks that need the libraries
        (``memprof.run.preflight``: does the model build, do the adapter's target modules match)."""
        pairs: dict[tuple[str, str], dict[str, Any]] = {}
        for c in self.cells:
            pairs.setdefault((c.model, c.adapter), {"model": c.model, "model_spec": c.model_spec,
                                                    "adapter": c.adapter, "adapter_spec": c.adapter_spec})
        return list(pairs.values())

    def preflight_error(self, problem: dict[str, str]) -> UserError:
        """A problem ``memprof.run.preflight`` found, as a UserError naming the key that defines the culprit."""
        model, adapter = problem["model"], problem["adapter"]
        if problem["field"] == "model":
            return UserError(str(self.path), f"{self._defined_at('model', model)}: model '{model}' does not build: "
                                             f"{problem['error']}")
        where = self._defined_at("adapter", adapter)
        if adapter in self.spec.adapters:
            where += ".target_modules"
        return UserError(str(self.path), f"{where}: adapter '{adapter}' does not fit model '{model}': "
                                         f"{problem['error']}")

    def _defined_at(self, axis: str, name: str) -> str:
        tables = self.spec.models if axis == "model" else self.spec.adapters
        if name in tables:
            return f"{axis}s.{name}"
        names = getattr(self.spec.grid, axis)
        return f"grid.{axis}[{names.index(name)}]" if name in names else f"grid.{axis}"


def resolve_path(name_or_path: str) -> Path:
    """A path to a suite file, or the name of a suite shipped in the package (``quick``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    packaged = PACKAGED_SUITES / f"{name_or_path.removesuffix('.toml')}.toml"
    if packaged.exists():
        return packaged
    raise UserError(str(path), "no such suite file (shipped suites: "
                    + ", ".join(p.stem for p in sorted(PACKAGED_SUITES.glob("*.toml"))) + ")")


def load(name_or_path: str) -> Suite:
    """Read, validate and expand a suite.

    Raises:
        UserError: naming the file and the key path of the first problem.
    """
    path = resolve_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Suite:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(str(path), f"malformed TOML: {err}") from None
    try:
        spec = SuiteFile.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = _loc(first["loc"])
        raise UserError(str(path), f"{where}: {_message(first)}") from None
    return Suite(path, text, spec)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("list[str]", "literal['all-linear','attention']") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(error: dict[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return msg


def _expand(path: Path, spec: SuiteFile) -> list[Cell]:
    grid = spec.grid
    _check_names(path, spec)
    _check_schedules(path, spec)
    values = {axis: getattr(grid, axis) for axis in AXES}
    values["parallel"] = [p.model_dump() for p in grid.parallel]
    for i, rule in enumerate(spec.exclude):
        _check_axes(path, f"exclude[{i}]", rule)
    for i, rule in enumerate(spec.override):
        _check_axes(path, f"override[{i}].match", rule.match)
        _check_overridable(path, f"override[{i}].set", rule.set, spec)
    cells: list[Cell] = []
    s = spec.suite
    for combo in itertools.product(*(values[a] for a in AXES)):
        axes = dict(zip(AXES, combo))
        if any(_matches(axes, rule) for rule in spec.exclude):
            continue
        extra: dict[str, Any] = {}
        for rule in spec.override:
            if _matches(axes, rule.match):
                extra.update(rule.set)
        axes.update({k: v for k, v in extra.items() if k in AXES})
        settings = {k: v for k, v in extra.items() if k not in AXES}
        opt = spec.optimizers.get(axes["optimizer"])
        steps = settings.get("steps", s.steps)
        for repeat in range(s.repeats):
            cells.append(Cell(
                suite=s.name,
                index=len(cells),
                **axes,
                optim=opt.optim if opt else axes["optimizer"],
                optim_kwargs=dict(opt.kwargs) if opt else {},
                steps=steps,
                warmup_steps=settings.get("warmup_steps", s.warmup_steps),
                lr_warmup_steps=settings.get("lr_warmup_steps",
                                             s.lr_warmup_steps or math.ceil(s.lr_warmup_ratio * steps)),
                seed=s.seed + repeat,
                repeat=repeat,
                device=s.device,
                timeout_s=settings.get("timeout_s", s.timeout_s),
                memory_budget_bytes=settings.get("memory_budget_bytes", s.memory_budget_bytes),
                max_grad_norm=settings.get("max_grad_norm", s.max_grad_norm),
                model_spec=_model_spec(spec, axes["model"]),
                adapter_spec=_adapter_spec(spec, axes["adapter"]),
                data_spec=spec.data.model_dump(),
                eval_every=s.eval_every,
                eval_batches=s.eval_batches,
                target_loss=s.target_loss,
                schedule_kwargs=dict(spec.schedules.get(axes["schedule"], {})),
            ))
    if not cells:
        raise UserError(str(path), "exclude: every cell of the grid is excluded; nothing to run")
    return cells


def _check_names(path: Path, spec: SuiteFile) -> None:
    for axis in ("model", "adapter", "optimizer"):
        for i, name in enumerate(getattr(spec.grid, axis)):
            error = _name_error(spec, axis, name)
            if error:
                raise UserError(str(path), f"grid.{axis}[{i}]: {error}")


def _name_error(spec: SuiteFile, axis: str, name: str) -> str:
    """Why ``name`` is not a model, adapter or optimizer of this suite ('' when it is one)."""
    if axis == "model" and name not in spec.models and name not in PRESETS:
        return f"unknown model '{name}' (not a [models] table nor a preset; presets: {', '.join(PRESETS)})"
    if axis == "adapter" and name not in spec.adapters and name not in BUILTIN_ADAPTERS:
        return f"unknown adapter '{name}' (not an [adapters] table nor one of {', '.join(BUILTIN_ADAPTERS)})"
    if axis == "optimizer" and name not in spec.optimizers and not catalogue.is_custom(name):
        try:
            catalogue.lookup(name)
        except KeyError as err:
            return str(err.args[0])
    return ""


def _check_schedules(path: Path, spec: SuiteFile) -> None:
    for name in spec.schedules:
        if name not in SCHEDULES:
            raise UserError(str(path), f"schedules.{name}: unknown schedule; known: {', '.join(SCHEDULES)}")
    for i, name in enumerate(spec.grid.schedule):
        needs = SCHEDULE_NEEDS.get(name, ())
        if needs and not any(key in spec.schedules.get(name, {}) for key in needs):
            raise UserError(str(path), f"grid.schedule[{i}]: '{name}' needs {' or '.join(needs)} in a "
                            f"[schedules.{name}] table")
        if name in METRIC_SCHEDULES and not (spec.suite.eval_every and spec.suite.eval_batches):
            raise UserError(str(path), f"grid.schedule[{i}]: '{name}' steps on the eval loss; set suite.eval_every")


def _check_axes(path: Path, where: str, rule: dict[str, Any]) -> None:
    for key in rule:
        if key not in AXES:
            raise UserError(str(path), f"{where}.{key}: not a grid axis (axes: {', '.join(AXES)})")


_OVERRIDABLE = ("steps", "warmup_steps", "lr_warmup_steps", "timeout_s", "memory_budget_bytes", "max_grad_norm")


def _check_overridable(path: Path, where: str, values: dict[str, Any], spec: SuiteFile) -> None:
    """An override's values pass the same checks as the grid and [suite] values they replace."""
    for key, value in values.items():
        if key not in AXES and key not in _OVERRIDABLE:
            raise UserError(str(path), f"{where}.{key}: cannot be overridden (allowed: "
                            f"{', '.join(AXES + _OVERRIDABLE)})")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(str(path), f"{where}.{key}: must be a number or a string")
        error = _name_error(spec, key, value) if key in ("model", "adapter", "optimizer") else ""
        if error:
            raise UserError(str(path), f"{where}.{key}: {error}")
    axes = {k: [v] for k, v in values.items() if k in AXES}
    settings = {k: v for k, v in values.items() if k not in AXES}
    try:
        GridSettings.model_validate({"model": ["-"], "optimizer": ["-"], **axes})
        SuiteSettings.model_validate({**spec.suite.model_dump(), **settings})
    except ValidationError as err:
        first = err.errors()[0]
        key = first["loc"][0] if first["loc"] and first["loc"][0] in values else ""
        raise UserError(str(path), f"{where}{'.' + key if key else ''}: {_message(first)}") from None


def _matches(axes: dict[str, Any], rule: dict[str, Any]) -> bool:
    return all(axes.get(k) == v for k, v in rule.items())


def _model_spec(spec: SuiteFile, name: str) -> dict[str, Any]:
    if name in spec.models:
        return spec.models[name].model_dump()
    return ModelSettings(preset=name).model_dump()


def _adapter_spec(spec: SuiteFile, name: str) -> dict[str, Any]:
    settings = spec.adapters.get(name) or BUILTIN_ADAPTERS[name]
    out = settings.model_dump()
    if isinstance(out["target_modules"], tuple):
        out["target_modules"] = list(out["target_modules"])
    return out
