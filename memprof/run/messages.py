"""The messages between the executor, the zygote, the processes it forks and Ray workers, as typed dataclasses
and one JSON-lines codec. Each line is ``{"type": <class name>, ...fields}``; nothing else is spelled by hand.

executor → zygote: ``RunCell`` or ``CheckModels``. zygote → executor: ``Hello`` once, then for a cell any number
of ``StepDone`` and one ``CellDone``, for the model checks one ``ModelsChecked``. A forked cell or check process
writes the same lines to the zygote through a pipe.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from memprof.config.spec import CellConfig
from memprof.results.record import CellResult


@dataclass(frozen=True)
class Hello:
    """The zygote imported the libraries; ``cuda``: this host has a CUDA device."""

    cuda: bool


@dataclass(frozen=True)
class RunCell:
    cell: CellConfig
    log: str  # where the forked process writes its stdout and stderr
    sample_interval_s: float | None = None  # None: by device (memprof.measure.readings)


@dataclass(frozen=True)
class CheckModels:
    """Check that each cell's model builds and its adapter fits it (one cell per model and adapter pair)."""

    cells: list[CellConfig]
    log: str


@dataclass(frozen=True)
class Problem:
    """What the model checks found: ``field`` is ``model``, ``adapter`` or the adapter's key at fault."""

    model: str
    adapter: str
    field: str
    error: str


@dataclass(frozen=True)
class ModelsChecked:
    problems: list[Problem] = field(default_factory=list)
    failed: str = ""  # the checking process died or hung: the checks have no answer


@dataclass(frozen=True)
class StepDone:
    """A cell finished an optimizer step (sent as it happens, for progress)."""

    index: int
    step: int
    steps: int
    loss: float


@dataclass(frozen=True)
class CellDone:
    result: CellResult
    log_name: str = ""  # from a Ray worker: the cell's log, brought back with its result
    log: str = ""


Message = Union[Hello, RunCell, CheckModels, ModelsChecked, StepDone, CellDone]
_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Message)}


def encode(message: Message) -> str:
    """One line of JSON (no newline)."""
    return json.dumps({"type": type(message).__name__, **_plain(message)}, default=str)


def decode(line: str) -> Message:
    """The message a line of ``encode`` holds.

    Raises:
        ValueError: not a message of this protocol.
    """
    data = json.loads(line)
    cls = _TYPES.get(data.pop("type", None))
    if cls is None:
        raise ValueError(f"not a memprof protocol message: {line[:200]}")
    return _build(cls, data)


def _plain(value: Any) -> Any:
    if isinstance(value, CellConfig):
        return value.model_dump(mode="json")
    if isinstance(value, CellResult):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{name: _value(hints[name], value) for name, value in data.items()})


def _value(hint: Any, value: Any) -> Any:
    if hint is CellConfig:
        return CellConfig.model_validate(value, strict=False)
    if hint is CellResult:
        return CellResult.from_dict(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return [_value(item, v) for v in value]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value)
    return value
