"""Records of every schema this memprof reads: the current one as it is, schema 1 (memprof before the nested
configuration) migrated.

A schema-1 record kept its configuration flat and by name: the model, adapter and optimizer as the suite named
them, the shape, LR, schedule, seed and levers, but not the tables behind the names. Its ``config`` therefore holds
exactly that: a preset's name is its spec; any other model, and an adapter's settings beyond its kind and rank,
stay empty (``ModelSpec.known`` is False); the run's own ``suite.toml`` has them. Its hash was computed another way,
so ``compare`` does not judge configuration changes against it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from memprof.config.presets import PRESETS
from memprof.config.spec import (ADAPTER_KINDS, AdapterSpec, Budget, CellConfig, Levers, ModelSpec, OptimizerSpec,
                                 ParallelSpec, ShapeSpec, TrainingSpec)
from memprof.results.record import SCHEMA_VERSION, Record, Status, check_types

READABLE = (1, SCHEMA_VERSION)

# schema 1's configuration fields (its Record repeated them from the Cell); the rest were measurements
_CONFIG_FIELDS = ("cell_key", "config_hash", "suite", "cell_index", "model", "adapter", "optimizer", "optim",
                  "batch_size", "seq_len", "grad_accum", "precision", "lr", "schedule", "seed", "repeat", "steps",
                  "warmup_steps", "target_loss", "adapter_r", "gradient_checkpointing", "attn_implementation",
                  "parallel_strategy", "world_size")


def read_record(data: dict[str, Any]) -> Record:
    """A record from a line of any readable schema's records.jsonl.

    Raises:
        ValueError: a schema this memprof cannot read, or a configuration that does not validate.
    """
    version = data.get("schema_version")
    if version not in READABLE:
        raise ValueError(f"schema_version {version} (this memprof reads {', '.join(map(str, READABLE))})")
    return from_schema_1(data) if version == 1 else Record.from_dict(data)


def read_row(row: dict[str, str]) -> Record:
    """A record from a row of any readable schema's cells.csv.

    Raises:
        ValueError: a schema this memprof cannot read, or a cell or configuration that does not validate.
    """
    version = row.get("schema_version") or None
    if version not in [str(v) for v in READABLE]:
        raise ValueError(f"schema_version {version} (this memprof reads {', '.join(map(str, READABLE))})")
    return from_schema_1_row(row) if version == "1" else Record.from_row(row)


def from_schema_1(data: dict[str, Any]) -> Record:
    """A schema-1 record (one line of its records.jsonl) as a current Record."""
    known = {f.name for f in fields(Record)}
    values = {k: v for k, v in data.items() if k in known and k not in _CONFIG_FIELDS}
    values.update(config=_config(data), schema_version=1)
    check_types(values)
    values["status"] = Status(values.get("status", "ok"))
    return Record(**values)


def from_schema_1_row(row: dict[str, str]) -> Record:
    """A schema-1 cells.csv row as a current Record: numbers read back by the shape of their text.

    Raises:
        ValueError: a configuration that does not validate.
    """
    data: dict[str, Any] = {}
    by_dtype: dict[str, int] = {}
    ranks: dict[int, dict[str, Any]] = {}
    for key, text in row.items():
        value = _number(text)
        try:
            if key.startswith("optimizer_state_bytes."):
                if text:
                    by_dtype[key.split(".", 1)[1]] = int(text)
            elif key.startswith("rank") and "." in key:
                rank, name = key.split(".", 1)
                ranks.setdefault(int(rank.removeprefix("rank")), {})[name] = value
            else:
                data[key] = value
        except ValueError as err:
            raise ValueError(f"column {key}: {err}") from None
    # names and labels stay text even when they look like numbers
    for key in ("model", "adapter", "optimizer", "optim", "schedule", "precision", "suite", "cell_key", "host",
                "device", "device_name", "error", "diagnosis", "verdict", "visible_devices", "fail_phase",
                "config_hash", "gradient_checkpointing", "attn_implementation", "parallel_strategy", "status"):
        if key in row:
            data[key] = row[key]
    data["optimizer_state_bytes_by_dtype"] = by_dtype
    data["ranks"] = [ranks[r] for r in sorted(ranks) if any(v is not None for v in ranks[r].values())]
    return from_schema_1(data)


def _number(text: str) -> Any:
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _config(data: dict[str, Any]) -> CellConfig:
    """Schema 1's flat configuration fields as a CellConfig.

    Raises:
        ValueError: naming the first field that is missing or not of its kind.
    """
    def get(key: str, kind: type, default: Any = ...) -> Any:
        if key not in data or data[key] is None:
            if default is ...:
                raise ValueError(f"no field '{key}'")
            return default
        try:
            return kind(data[key])
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {data[key]!r} is not {kind.__name__}") from None

    model, adapter = get("model", str), get("adapter", str)
    kind = adapter if adapter in ADAPTER_KINDS else "qlora" if "qlora" in adapter else "lora"
    rank = get("adapter_r", int, None)
    return CellConfig(
        suite=get("suite", str, ""), index=get("cell_index", int, 0),
        model=ModelSpec(name=model, preset=model if model in PRESETS else ""),
        adapter=AdapterSpec(name=adapter, kind=kind, lora={"r": rank} if rank is not None else {}),
        optimizer=OptimizerSpec(label=get("optimizer", str), name=get("optim", str, "") or get("optimizer", str)),
        shape=ShapeSpec(batch_size=get("batch_size", int), seq_len=get("seq_len", int),
                        grad_accum=get("grad_accum", int, 1), precision=get("precision", str)),
        levers=Levers(gradient_checkpointing=get("gradient_checkpointing", str, "off"),
                      attn_implementation=get("attn_implementation", str, "sdpa"),
                      parallel=ParallelSpec(strategy=get("parallel_strategy", str, "none"),
                                            world_size=get("world_size", int, 1))),
        training=TrainingSpec(lr=get("lr", float), schedule=get("schedule", str), seed=get("seed", int),
                              repeat=get("repeat", int, 0), steps=get("steps", int),
                              warmup_steps=get("warmup_steps", int), target_loss=data.get("target_loss")),
        budget=Budget())
