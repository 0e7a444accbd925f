"""Result folders: written cell by cell so that a kill at any moment loses no finished cell.

Layout of ``results/<suite>-<timestamp>/``:
- ``records.jsonl``: one Record per line, appended with one ``write`` each (the source of truth);
- ``cells.csv``: the same records as a flat table, rewritten atomically after every cell;
- ``cells/<index>/steps.csv`` and ``timeline.csv``: per-step and sampled rows, written atomically;
- ``env.json``, ``suite.toml``, ``manifest.json`` (suite name and hash, the cell keys), ``logs/``.
Paths come from cell indices, never from names in the suite, so nothing is written outside the folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from memprof.errors import UserError
from memprof.record import SCHEMA_VERSION, CellResult, Record


def new_run_dir(root: Path, suite_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{suite_name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{suite_name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class RunWriter:
    """Appends cell results to a run folder as they arrive."""

    def __init__(self, run_dir: Path, suite_text: str, manifest: dict[str, Any], env: dict[str, Any]) -> None:
        self.run_dir = run_dir
        (run_dir / "cells").mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "suite.toml", suite_text)
        write_atomic(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
        write_atomic(run_dir / "manifest.json", json.dumps({"schema_version": SCHEMA_VERSION, **manifest},
                                                           indent=2) + "\n")
        self.records = read_records(run_dir) if (run_dir / "records.jsonl").exists() else []

    def append(self, result: CellResult) -> None:
        record = result.record
        cell_dir = self.run_dir / "cells" / f"{record.cell_index:04d}"
        cell_dir.mkdir(exist_ok=True)
        if result.steps:
            write_atomic(cell_dir / "steps.csv", to_csv(result.steps))
        if result.timeline:
            write_atomic(cell_dir / "timeline.csv", to_csv(result.timeline))
        line = (json.dumps(record.to_dict(), default=str) + "\n").encode()
        fd = os.open(self.run_dir / "records.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        write_atomic(self.run_dir / "cells.csv", to_csv([r.to_row() for r in self.records]))


def read_records(run_dir: Path) -> list[Record]:
    """The records of a run folder; a torn last line (the writer was killed mid-write) is skipped.

    Raises:
        UserError: when the folder has no records file or a record of another schema version.
    """
    path = run_dir / "records.jsonl"
    if not path.exists():
        raise UserError(str(run_dir), "not a memprof result folder (no records.jsonl)")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise UserError(str(path), f"line {n}: not valid JSON") from None
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(str(path), f"line {n}: schema_version {data.get('schema_version')} "
                            f"(this memprof reads {SCHEMA_VERSION})")
        records.append(Record.from_dict(data))
    return records


def read_csv_records(path: Path) -> list[Record]:
    """The records of a ``cells.csv`` (the flat copy of records.jsonl); an empty file gives none.

    Raises:
        UserError: when the file cannot be read, lacks the key columns, or holds another schema version.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    if not rows:
        return []
    missing = [c for c in ("cell_key", "schema_version") if c not in columns]
    if missing:
        raise UserError(str(path), f"not a memprof cells.csv (no column {', '.join(missing)})")
    records = []
    for n, row in enumerate(rows, 2):
        if row["schema_version"] != str(SCHEMA_VERSION):
            raise UserError(str(path), f"line {n}: schema_version {row['schema_version'] or None} "
                            f"(this memprof reads {SCHEMA_VERSION})")
        try:
            records.append(Record.from_row(row))
        except (ValueError, TypeError) as err:
            raise UserError(str(path), f"line {n}: {err}") from None
    return records
