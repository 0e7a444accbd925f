"""Suite files: TOML validated into typed tables (``memprof.suite.schema``), then expanded into the grid of cells.

A suite is data, never code: it is parsed with ``tomllib`` and checked field by field; every error names the
file and the key path. Nothing heavy is imported here, so ``--dry-run`` and validation are instant.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from memprof.config import catalogue
from memprof.config.corpus import file_bytes
from memprof.config.presets import PRESETS
from memprof.config.spec import (AXES, AXIS_BY_NAME, HELD_OUT_FRACTION, METRIC_SCHEDULES, SCHEDULES, CellConfig,
                                 OptimizerSpec)
from memprof.errors import UserError
from memprof.suite.schema import (BUILTIN_ADAPTERS, LORA_ALIASES, LORA_VALUES, OVERRIDABLE, QUANT_KEYS, GridSettings,
                                  ModelTable, SuiteFile, SuiteSettings)

PACKAGED_SUITES = Path(__file__).parent.parent / "suites"
# Schedules transformers cannot build without one of these keys in their [schedules.<name>] table.
SCHEDULE_NEEDS = {"cosine_with_min_lr": ("min_lr", "min_lr_rate"),
                  "cosine_warmup_with_min_lr": ("min_lr", "min_lr_rate"),
                  "warmup_stable_decay": ("num_decay_steps",)}
OPTIMIZER_FIELD = "optimizer:"  # a preflight problem's field for an optimizer: this, then its label
SCHEDULE_FIELD = "schedule:"  # ... and for a schedule: this, its name, and where a kwarg is at fault, "." and its key
# The most cells a suite may expand to (its grid's product times its repeats, before [[exclude]]): ten thousand
# take seconds to expand and days to run; a million took minutes to expand, silently, before a mistake surfaced.
MAX_CELLS = 10_000


class Suite:
    """A validated suite: its source file, its tables and the cells it expands to."""

    def __init__(self, path: Path, text: str, spec: SuiteFile, folder: Path) -> None:
        self.path = path
        self.text = text
        self.spec = spec
        self.folder = folder  # where its relative paths start (``paths_folder``)
        self.cells = _expand(path, spec)

    @property
    def name(self) -> str:
        return self.spec.suite.name

    @property
    def digest(self) -> str:
        """Hash of the suite text, used to check that a resumed run is the same suite."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def preflight_pairs(self) -> list[CellConfig]:
        """One cell for each distinct (model, adapter, optimizer), for the checks that need the libraries
        (``memprof.run.preflight``: does the model build, does peft take the adapter and do its targets match, does
        the optimizer build with its kwargs: each optimizer over the first of its pairs that fits), the first cell
        of each schedule not among them (does it build with its kwargs), and for each [optimizers] table no cell
        uses, the first cell with that optimizer (its kwargs are checked over the first cell's model)."""
        cells: dict[tuple[str, str, str], CellConfig] = {}
        for c in self.cells:
            cells.setdefault((c.model.name, c.adapter.name, c.optimizer.label), c)
        first, used = self.cells[0], {c.optimizer.label for c in self.cells}
        for label in (label for label in self.spec.optimizers if label not in used):
            cells[(first.model.name, first.adapter.name, label)] = first.model_copy(
                update={"optimizer": _value(self.spec, "optimizer", label)})
        schedules = {c.training.schedule for c in cells.values()}
        for c in self.cells:
            if c.training.schedule not in schedules:
                schedules.add(c.training.schedule)
                cells[(c.model.name, c.adapter.name, c.optimizer.label, c.training.schedule)] = c
        return list(cells.values())

    def preflight_error(self, model: str, adapter: str, field: str, error: str) -> UserError:
        """A problem ``memprof.run.preflight`` found in ``model``, ``adapter`` or an optimizer (``field``:
        ``model`` or ``model.`` + the key of its table at fault, ``adapter``, the adapter's key at fault,
        ``OPTIMIZER_FIELD`` + the optimizer's label, or ``SCHEDULE_FIELD`` + the schedule's name and the kwarg at
        fault), as a UserError naming the key that defines the culprit."""
        if field.startswith(OPTIMIZER_FIELD):
            return self.optimizer_error(field.removeprefix(OPTIMIZER_FIELD), error)
        if field.startswith(SCHEDULE_FIELD):
            name, _, key = field.removeprefix(SCHEDULE_FIELD).partition(".")
            where = self._defined_at("schedule", name) + (f".{key}" if key and name in self.spec.schedules else "")
            return UserError(str(self.path), f"{where}: schedule '{name}' does not build: {error}")
        if field == "model" or field.startswith("model."):
            key = field.removeprefix("model") if model in self.spec.models else ""
            return UserError(str(self.path), f"{self._defined_at('model', model)}{key}: model '{model}' does not "
                                             f"build: {error}")
        where = self._defined_at("adapter", adapter)
        table = self.spec.adapters.get(adapter)
        if table is not None and field != "adapter":
            written = next((ours for ours, peft in LORA_ALIASES.items() if peft == field), field)
            where += f".{written if written in (table.model_extra or {}) else field}"
        if field == "target_modules":
            error = f"adapter '{adapter}' does not fit model '{model}': {error}"
        return UserError(str(self.path), f"{where}: {error}")

    def optimizer_error(self, label: str, error: str) -> UserError:
        """An optimizer that does not build (``memprof.train.optim.OptimizerRefused``), naming its kwargs where the
        suite gives some."""
        table = self.spec.optimizers.get(label)
        where = self._defined_at("optimizer", label) + (".kwargs" if table is not None and table.kwargs else "")
        name = f"'{label}'" + (f" ({table.optim})" if table is not None and table.optim != label else "")
        return UserError(str(self.path), f"{where}: optimizer {name} does not build: {error}")

    def _defined_at(self, axis: str, name: str) -> str:
        tables = {"model": self.spec.models, "adapter": self.spec.adapters, "optimizer": self.spec.optimizers,
                  "schedule": self.spec.schedules}[axis]
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
    folder = paths_folder(path)
    try:
        spec = SuiteFile.model_validate(raw, context={"folder": folder})
    except ValidationError as err:
        raise _first(path, err, "", raw) from None
    return Suite(path, text, spec, folder)


def paths_folder(path: Path) -> Path:
    """The folder a suite's relative paths (``data.path``, a model's ``path``) start from: the suite file's own, or
    for a results folder's copy of it (``suite.toml`` beside a ``manifest.json``), the folder of the suite the run
    started from, which the manifest keeps as ``suite_folder``: a resumed run reads the same files."""
    manifest = path.parent / "manifest.json"
    if path.name == "suite.toml" and manifest.is_file():
        try:
            folder = json.loads(manifest.read_text(encoding="utf-8")).get("suite_folder")
        except (OSError, ValueError, AttributeError):
            folder = None  # prepare_resume says what is wrong with the manifest
        if isinstance(folder, str) and folder:
            return Path(folder)
    return path.parent.absolute()


def _first(path: Path, err: ValidationError, where: str, raw: Any = None) -> UserError:
    """The first problem pydantic found, as one line naming its key path (below ``where``; an index only where
    the file has a list: a grid axis given one value is named without one)."""
    first = err.errors()[0]
    loc, node = [], raw
    for part in first["loc"]:
        if isinstance(part, int) and raw is not None and not isinstance(node, list):
            continue
        loc.append(part)
        node = node.get(part) if isinstance(node, dict) else node[part] if isinstance(node, list) else None
    loc = _loc(tuple(loc))
    key = f"{where}.{loc}" if where and loc else where or loc or "(top level)"
    return UserError(str(path), f"{key}: {_message(first)}")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part).startswith(("function-", "literal[")):
            continue  # the branch of a union pydantic tried, not a key
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(error: dict[str, Any]) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return msg


def _expand(path: Path, spec: SuiteFile) -> list[CellConfig]:
    _check_names(path, spec)
    _check_repeated_values(path, spec)
    _check_adapters(path, spec)
    _check_schedules(path, spec)
    for i, rule in enumerate(spec.exclude):
        _check_axes(path, f"exclude[{i}]", rule)
    for i, rule in enumerate(spec.override):
        _check_axes(path, f"override[{i}].match", rule.match)
        _check_overridable(path, f"override[{i}].set", rule.set, spec)
    grid = {axis.name: getattr(spec.grid, axis.name) for axis in AXES}
    _check_size(path, grid, spec.suite.repeats)
    cells: list[CellConfig] = []
    excluding: set[int] = set()  # the [[exclude]] rules that match a cell
    overriding: set[int] = set()  # the [[override]] rules that match a cell that runs
    s = spec.suite
    for combo in itertools.product(*grid.values()):
        axes = dict(zip(grid, combo))
        matched = {i for i, rule in enumerate(spec.exclude) if _matches(axes, rule)}
        excluding |= matched
        if matched:
            continue
        settings = {"steps": s.steps, "warmup_steps": s.warmup_steps, "timeout_s": s.timeout_s,
                    "memory_budget_bytes": s.memory_budget_bytes, "max_grad_norm": s.max_grad_norm}
        set_by: dict[str, int] = {}  # the override that set each key of this cell
        for i, rule in enumerate(spec.override):
            if _matches(axes, rule.match):
                overriding.add(i)
                for key, value in rule.set.items():
                    (axes if key in AXIS_BY_NAME else settings)[key] = value
                    set_by[key] = i
        settings["lr_warmup_steps"] = settings.get("lr_warmup_steps", s.lr_warmup_steps
                                                   or math.ceil(s.lr_warmup_ratio * settings["steps"]))
        for repeat in range(s.repeats):
            values = {axis.path: _value(spec, axis.name, axes[axis.name]) for axis in AXES}
            values.update({OVERRIDABLE[name]: value for name, value in settings.items()})
            values.update({"training.seed": s.seed + repeat, "training.repeat": repeat,
                           "training.eval_every": s.eval_every, "training.eval_batches": s.eval_batches,
                           "training.target_loss": s.target_loss, "training.data": spec.data.model_dump(),
                           "training.schedule_kwargs": dict(spec.schedules.get(axes["schedule"], {})),
                           "budget.device": s.device})
            try:
                cells.append(_cell(s.name, len(cells), values))
            except ValidationError as err:
                raise _conflict(path, err, spec, axes, set_by) from None
    unused = [i for i in range(len(spec.exclude)) if i not in excluding]
    if unused:
        raise UserError(str(path), f"exclude[{unused[0]}]: matches no cell of the grid (a value the grid does not "
                                   f"have?)")
    if not cells:
        raise UserError(str(path), "exclude: every cell of the grid is excluded; nothing to run")
    idle = [i for i in range(len(spec.override)) if i not in overriding]
    if idle:
        raise UserError(str(path), f"override[{idle[0]}].match: matches no cell that runs (a value the grid does "
                                   f"not have, or only excluded cells?)")
    _check_corpus(path, spec, cells)
    return cells


def _check_size(path: Path, grid: dict[str, list[Any]], repeats: int) -> None:
    """A grid of more than ``MAX_CELLS`` cells is refused before it is expanded, naming the axes that make it."""
    count = math.prod(len(values) for values in grid.values()) * repeats
    if count > MAX_CELLS:
        factors = [f"{len(values)} {name}" for name, values in grid.items() if len(values) > 1]
        factors += [f"{repeats} repeats"] if repeats > 1 else []
        raise UserError(str(path), f"grid: {count:,} cells ({' × '.join(factors)}), more than the {MAX_CELLS:,} a "
                                   f"suite may have; split it into suites or thin its axes")


def _cell(suite: str, index: int, values: dict[str, Any]) -> CellConfig:
    data: dict[str, Any] = {"suite": suite, "index": index}
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = data
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value.model_dump() if isinstance(value, BaseModel) else value
    return CellConfig.model_validate(data, strict=False)


def _conflict(path: Path, err: ValidationError, spec: SuiteFile, axes: dict[str, Any],
              set_by: dict[str, int]) -> UserError:
    """A cell whose values do not go together (a chunked loss under ddp), naming where each of the values in the
    failing part of the cell comes from: an override's setting, or a grid value away from its default."""
    first = err.errors()[0]
    part = ".".join(str(p) for p in first["loc"])
    sources = []
    for axis in AXES:
        if axis.path != part and not axis.path.startswith(f"{part}."):
            continue
        if axis.name in set_by:
            sources.append(f"override[{set_by[axis.name]}].set.{axis.name}")
        elif _plain(axes[axis.name]) != _plain(axis.default()):
            given = [_plain(v) for v in getattr(spec.grid, axis.name)]
            sources.append(f"grid.{axis.name}[{given.index(_plain(axes[axis.name]))}]")
    sources += [f"override[{i}].set.{key}" for key, i in set_by.items()
                if key in OVERRIDABLE and OVERRIDABLE[key].startswith(f"{part}.")]
    return UserError(str(path), f"{' with '.join(sources) or part or 'grid'}: {_message(first)}")


def _value(spec: SuiteFile, axis: str, value: Any) -> Any:
    """An axis value as the field it sets: a named model, adapter or optimizer as its spec."""
    if axis == "model":
        table = spec.models.get(value) or ModelTable(preset=value)
        return table.to_spec(value)
    if axis == "adapter":
        return (spec.adapters.get(value) or BUILTIN_ADAPTERS[value]).to_spec(value)
    if axis == "optimizer":
        table = spec.optimizers.get(value)
        return OptimizerSpec(label=value, name=table.optim if table else value,
                             kwargs=dict(table.kwargs) if table else {})
    return value


def _check_names(path: Path, spec: SuiteFile) -> None:
    for axis in (a.name for a in AXES if a.named):
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
    if axis == "optimizer" and name not in spec.optimizers:
        return catalogue.unknown(name)
    return ""


def _check_repeated_values(path: Path, spec: SuiteFile) -> None:
    """A value given twice on an axis would run the same cells twice, under the same keys and seeds."""
    for axis in AXES:
        values = [_plain(v) for v in getattr(spec.grid, axis.name)]
        for i, value in enumerate(values):
            if value in values[:i]:
                raise UserError(str(path), f"grid.{axis.name}[{i}]: {value!r} is given twice (the same cells would run "
                                           f"twice with the same keys and seeds; use suite.repeats for more seeds)")


def _check_adapters(path: Path, spec: SuiteFile) -> None:
    """What can be checked of an adapter table without peft, used by the grid or not: quantisation settings only on
    a QLoRA adapter, LoRA settings on no ``none`` adapter, and the LoRA values peft takes as they are and only a model
    build refuses (``LORA_VALUES``). peft judges the rest of its keywords (``memprof.run.preflight``)."""
    for name, table in spec.adapters.items():
        quant = [key for key in QUANT_KEYS if key in table.model_fields_set]
        if quant and table.kind != "qlora":
            raise UserError(str(path), f"adapters.{name}.{quant[0]}: only a qlora adapter quantises its base "
                                       f"(this one is kind = \"{table.kind}\")")
        if table.kind == "none" and table.model_extra:
            raise UserError(str(path), f"adapters.{name}.{next(iter(table.model_extra))}: a kind = \"none\" adapter "
                                       f"trains every weight and has no LoRA settings")
        for key, value in (table.model_extra or {}).items():
            kind = LORA_VALUES.get(LORA_ALIASES.get(key, key))
            try:
                if kind is not None:
                    TypeAdapter(kind, config=ConfigDict(allow_inf_nan=False)).validate_python(value, strict=True)
            except ValidationError as err:
                raise UserError(str(path), f"adapters.{name}.{key}: {_message(err.errors()[0])}") from None


def _schedule_error(name: str) -> str:
    """Why ``name`` is not a schedule ('' when it is one)."""
    return "" if name in SCHEDULES else f"unknown schedule '{name}'; known: {', '.join(SCHEDULES)}"


def _check_schedules(path: Path, spec: SuiteFile) -> None:
    for name in spec.schedules:
        if name not in SCHEDULES:
            raise UserError(str(path), f"schedules.{name}: unknown schedule; known: {', '.join(SCHEDULES)}")
    for i, name in enumerate(spec.grid.schedule):
        if _schedule_error(name):
            raise UserError(str(path), f"grid.schedule[{i}]: {_schedule_error(name)}")
        needs = SCHEDULE_NEEDS.get(name, ())
        if needs and not any(key in spec.schedules.get(name, {}) for key in needs):
            raise UserError(str(path), f"grid.schedule[{i}]: '{name}' needs {' or '.join(needs)} in a "
                            f"[schedules.{name}] table")
        if name in METRIC_SCHEDULES and not (spec.suite.eval_every and spec.suite.eval_batches):
            raise UserError(str(path), f"grid.schedule[{i}]: '{name}' steps on the eval loss; set suite.eval_every")


def _check_axes(path: Path, where: str, rule: dict[str, Any]) -> None:
    for key in rule:
        if key not in AXIS_BY_NAME:
            raise UserError(str(path), f"{where}.{key}: not a grid axis (axes: {', '.join(AXIS_BY_NAME)})")


def _check_overridable(path: Path, where: str, values: dict[str, Any], spec: SuiteFile) -> None:
    """An override's values pass the same checks as the grid and [suite] values they replace."""
    for key, value in values.items():
        if key not in AXIS_BY_NAME and key not in OVERRIDABLE:
            raise UserError(str(path), f"{where}.{key}: cannot be overridden (allowed: "
                            f"{', '.join([*AXIS_BY_NAME, *OVERRIDABLE])})")
        if isinstance(value, bool) or not isinstance(value, (int, float, str, dict)):
            raise UserError(str(path), f"{where}.{key}: must be a number, a string or a table")
        error = _name_error(spec, key, value) if key in AXIS_BY_NAME and AXIS_BY_NAME[key].named else \
            _schedule_error(value) if key == "schedule" and isinstance(value, str) else ""
        if error:
            raise UserError(str(path), f"{where}.{key}: {error}")
    axes = {k: [v] for k, v in values.items() if k in AXIS_BY_NAME}
    settings = {k: v for k, v in values.items() if k not in AXIS_BY_NAME}
    try:
        GridSettings.model_validate({"model": ["-"], "optimizer": ["-"], **axes})
        SuiteSettings.model_validate({**spec.suite.model_dump(), **settings})
    except ValidationError as err:
        first = err.errors()[0]
        key = first["loc"][0] if first["loc"] and first["loc"][0] in values else ""
        raise UserError(str(path), f"{where}{'.' + key if key else ''}: {_message(first)}") from None


def _matches(axes: dict[str, Any], rule: dict[str, Any]) -> bool:
    return all(_plain(axes.get(k)) == v for k, v in rule.items())


def _plain(value: Any) -> Any:
    """A grid value as a rule names it: a parallel table as its dict."""
    return value.model_dump() if isinstance(value, BaseModel) else value


def _check_corpus(path: Path, spec: SuiteFile, cells: list[CellConfig]) -> None:
    """A file corpus (a byte is a token) holds more tokens than the longest sequence in its training part and, when
    cells evaluate, at least as many in its held-out part: what a cell's setup needs."""
    if spec.data.source != "file":
        return
    tokens = _corpus_tokens(path, Path(spec.data.path))
    seq_len = max(c.shape.seq_len for c in cells)
    held_out = tokens - int(tokens * (1 - HELD_OUT_FRACTION))
    if tokens - held_out <= seq_len or (spec.suite.eval_batches and held_out < seq_len):
        raise UserError(str(path), f"data.path: too short: {tokens:,} tokens (bytes) leave {tokens - held_out:,} to "
                                   f"train on and {held_out:,} held out; seq_len {seq_len:,} needs more than "
                                   f"{seq_len:,} to train on" + (f" and {seq_len:,} held out (the last "
                                   f"{HELD_OUT_FRACTION:.0%} of the file)" if spec.suite.eval_batches else ""))


def _corpus_tokens(path: Path, corpus: Path) -> int:
    """The tokens a file corpus holds (``corpus.file_bytes``): its size, for JSONL its ``text`` fields joined."""
    try:
        return corpus.stat().st_size if corpus.suffix != ".jsonl" else len(file_bytes(corpus))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(str(path), f"data.path: cannot read {corpus}: {err}") from None
    except ValueError as err:  # a JSONL line without its text
        raise UserError(str(path), f"data.path: {err}") from None
