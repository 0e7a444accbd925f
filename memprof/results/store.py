"""Result folders: written cell by cell so that a kill at any moment loses no finished cell.

Layout of ``results/<suite>-<timestamp>/``:
- ``records.jsonl``: one Record per line, appended with one ``write`` each (the source of truth);
- ``cells.csv``: the same records as a flat table, rewritten atomically after every cell;
- ``cells/<index>/steps.csv`` and ``timeline.csv`` (the index zero-padded: ``cells/0000/``): per-step and sampled
  rows, written atomically;
- ``env.json``, ``suite.toml``, ``manifest.json`` (suite name and hash, the cell keys), ``logs/``.
Paths come from cell indices, never from names in the suite, so nothing is written outside the folder.
A folder is written by one process at a time (a lock on the folder); ``prepare_resume`` readies an unfinished
one for ``memprof run --resume``.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from memprof.errors import UserError, one_line_text
from memprof.results.migrate import read_record, read_row
from memprof.results.record import SCHEMA_VERSION, CellResult, Record, Status


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
    """Rows as CSV text, the columns in order of first appearance, except that a dotted column first met in a
    later row (``optimizer_state_bytes.uint8`` of the first 8-bit cell) joins its family instead of the end."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key in columns:
                continue
            family = key.split(".")[0] + "." if "." in key else None
            kin = [i for i, c in enumerate(columns) if family and c.startswith(family)]
            columns.insert(kin[-1] + 1 if kin else len(columns), key)
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
        _lock(run_dir)
        write_atomic(run_dir / "suite.toml", suite_text)
        if not (run_dir / "env.json").exists():  # a resumed run keeps the environment it started in
            write_atomic(run_dir / "env.json", json.dumps(env, indent=2) + "\n")
        write_atomic(run_dir / "manifest.json", json.dumps({"schema_version": SCHEMA_VERSION, **manifest},
                                                           indent=2) + "\n")
        self.records = read_records(run_dir) if (run_dir / "records.jsonl").exists() else []

    def append(self, result: CellResult) -> None:
        record = result.record
        cell_dir = self.run_dir / "cells" / f"{record.config.index:04d}"
        cell_dir.mkdir(exist_ok=True)
        for name, rows in (("steps.csv", result.steps), ("timeline.csv", result.timeline)):
            if rows:
                write_atomic(cell_dir / name, to_csv(rows))
            else:  # left by an earlier, interrupted attempt at this cell
                (cell_dir / name).unlink(missing_ok=True)
        line = (json.dumps(record.to_dict(), default=str) + "\n").encode()
        fd = os.open(self.run_dir / "records.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(record)
        write_atomic(self.run_dir / "cells.csv", to_csv([r.to_row() for r in self.records]))


_held_locks: dict[Path, int] = {}


def _lock(run_dir: Path) -> None:
    """Hold an exclusive lock on the folder for this process's lifetime (the kernel drops it at exit, even
    after ``kill -9``), so that a resume cannot touch a run that is still being written."""
    key = run_dir.resolve()
    if key in _held_locks:
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(str(run_dir), "another memprof process is writing this folder") from None
    _held_locks[key] = fd


RESUME_KEYS = ("suite", "suite_digest", "cell_keys", "config_hashes")


def prepare_resume(run_dir: Path, manifest: dict[str, Any]) -> list[Record]:
    """Check that ``run_dir`` was started with this manifest (same suite and cells), then ready it to append.

    The torn last line of ``records.jsonl`` (its writer was killed mid-write) and the records of interrupted cells
    (they run again) are dropped, as are the ``cells/<index>`` folders of cells without a record.

    Returns:
        The records of the finished cells.
    Raises:
        UserError: not a result folder, another suite or other cells, or records this memprof cannot read.
    """
    path = run_dir / "manifest.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(str(run_dir), "not a memprof result folder (no manifest.json)") from None
    except (OSError, ValueError) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    if not isinstance(recorded, dict):
        raise UserError(str(path), "not a JSON object")
    for key in RESUME_KEYS:
        if key == "config_hashes" and recorded.get("schema_version") == 1:
            continue  # schema 1 hashed configurations another way; its cell keys still name the same cells
        if recorded.get(key) != manifest.get(key):
            what = {"suite_digest": f"the run's suite hash is {recorded.get(key)}, this suite's is {manifest.get(key)}",
                    "suite": f"the run is of suite '{recorded.get(key)}', not '{manifest.get(key)}'"}.get(
                key, f"the run's {key} differ from this suite's (was --device given differently?)")
            raise UserError(str(path), f"{what}: --resume needs the suite the run started with")
    _lock(run_dir)
    records_path = run_dir / "records.jsonl"
    if records_path.exists():
        read_records(run_dir)  # raises on a corrupt line other than the last
        kept = []
        for line in _lines(records_path):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn last line
            if data.get("status") != Status.INTERRUPTED.value:
                kept.append(line + "\n")
        write_atomic(records_path, "".join(kept))
    records = read_records(run_dir)
    if records:
        write_atomic(run_dir / "cells.csv", to_csv([r.to_row() for r in records]))
    else:
        (run_dir / "cells.csv").unlink(missing_ok=True)
    finished = {r.config.index for r in records}
    for cell_dir in (run_dir / "cells").glob("*"):
        if cell_dir.is_dir() and cell_dir.name.isdigit() and int(cell_dir.name) not in finished:
            shutil.rmtree(cell_dir)
    return records


def read_records(run_dir: Path) -> list[Record]:
    """The records of a run folder (schema 1 or 2); a torn last line (the writer was killed mid-write) is skipped.

    Raises:
        UserError: when the folder is not a result folder, or has a record this memprof cannot read, or records of
            more than one run.
    """
    path = run_dir / "records.jsonl"
    if not path.exists() and (run_dir / "manifest.json").exists():
        return []  # started, and stopped before its first cell finished
    if not path.exists():
        raise UserError(str(run_dir), "not a memprof result folder (no records.jsonl)")
    records = []
    lines = _lines(path)
    for n, line in enumerate(lines, 1):
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if _torn(lines, n):
                break  # ``torn_last_line`` says so
            raise UserError(str(path), f"line {n}: not valid JSON") from None
        if not isinstance(data, dict):
            raise UserError(str(path), f"line {n}: not a JSON object")
        try:
            records.append(read_record(data))
        except (ValueError, TypeError, KeyError) as err:
            raise UserError(str(path), f"line {n}: {_reason(err, 'field')}") from None
    return _one_run(records, path, 1)


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (records.jsonl).

    Raises:
        UserError: naming the file, and the line of the first byte that is not UTF-8.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(str(path), f"line {line}: not UTF-8 text (byte {data[err.start]:#04x})") from None


def _torn(lines: list[str], n: int) -> bool:
    """Whether line ``n``, not JSON, is torn: the last, and the start of a record (its writer was killed while
    appending it). Any other line that is not JSON is no record cut short, and an error."""
    return n == len(lines) > 0 and lines[-1].startswith("{")


def _one_run(records: list[Record], path: Path, first_line: int) -> list[Record]:
    """``records`` (line ``first_line`` on of ``path``), refused where they are not one run's: a record of another
    suite, or a cell recorded twice (each repeat is a cell of its own, with its own index), which would pass for
    one more repeat.

    Raises:
        UserError: naming the file and the line.
    """
    first: dict[int, int] = {}
    for n, r in enumerate(records, first_line):
        if r.config.suite != records[0].config.suite:
            raise UserError(str(path), f"line {n}: a record of suite '{r.config.suite}', where line {first_line}'s "
                                       f"is of '{records[0].config.suite}': a file holds one run's records")
        if r.config.index in first:
            raise UserError(str(path), f"line {n}: cell {r.config.index} ({r.key}) again, first at line "
                                       f"{first[r.config.index]}: a run records each cell once")
        first[r.config.index] = n
    return records


def torn_last_line(run_dir: Path) -> str:
    """A warning when the last line of the folder's records.jsonl is torn (not JSON), which ``read_records`` leaves
    out: a run killed while writing it, or a file cut short; '' when there is none."""
    path = run_dir / "records.jsonl"
    lines = _lines(path) if path.exists() else []
    if not _torn(lines, len(lines)):
        return ""
    try:
        json.loads(lines[-1])
    except json.JSONDecodeError:
        return f"{path}: its last line is torn (a run killed while writing it): left out"
    return ""


def some_records(records: list[Record], source: Path) -> list[Record]:
    """``records``, read from ``source`` (a records.jsonl or cells.csv), refused when there are none: a report or
    comparison of nothing would pass for one of a run.

    Raises:
        UserError: naming ``source``, when ``records`` is empty.
    """
    if records:
        return records
    if not source.exists():
        raise UserError(str(source), "no records (no such file: the run stopped before its first cell finished)")
    if source.name == "records.jsonl" and torn_last_line(source.parent):
        raise UserError(str(source), "no records (its only line is torn: a run killed while writing it)")
    raise UserError(str(source), "no records" + (" (empty file)" if source.stat().st_size == 0 else ""))


def _reason(err: Exception, name: str) -> str:
    """Why a record did not read, for a one-line error: a missing key is named as a missing ``name``."""
    return f"no {name} {err}" if isinstance(err, KeyError) else one_line_text(err)


def read_csv_records(path: Path) -> list[Record]:
    """The records of a ``cells.csv`` (the flat copy of records.jsonl); an empty file gives none.

    Raises:
        UserError: when the file cannot be read, lacks the key columns, holds another schema version, or records of
            more than one run.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    missing = [c for c in ("cell_key", "schema_version") if c not in columns]
    if columns and missing:  # a header alone (a steps.csv of a cell with no steps) is another kind of CSV too
        raise UserError(str(path), f"not a memprof cells.csv (no column {', '.join(missing)})")
    records = []
    for n, row in enumerate(rows, 2):
        if None in row or None in row.values():  # csv's marks of a row longer or shorter than the header
            raise UserError(str(path), f"line {n}: not as many cells as the header has columns ({len(columns)})")
        try:
            records.append(read_row(row))
        except (ValueError, TypeError, KeyError) as err:
            raise UserError(str(path), f"line {n}: {_reason(err, 'column')}") from None
    return _one_run(records, path, 2)


def copy_run(run_dir: Path, out: Path, records: list[Record]) -> None:
    """A copy of a result folder at ``out`` (a new folder) holding ``records`` instead of the folder's own, written
    in the current schema: the suite, environment and per-cell rows as they were (a folder older than manifests
    gets one made from its records).

    Raises:
        UserError: ``out`` exists, or cannot be written (nothing is left of it).
    """
    if out.exists():
        raise UserError(str(out), "exists: give a new folder")
    source = run_dir / "manifest.json"
    try:
        manifest = json.loads(source.read_text(encoding="utf-8")) if source.exists() else \
            {"suite": records[0].config.suite if records else "", "cell_keys": [r.key for r in records]}
    except (OSError, ValueError) as err:
        raise UserError(str(source), f"cannot read: {err}") from None
    if not isinstance(manifest, dict):
        raise UserError(str(source), "not a JSON object")
    try:
        shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("records.jsonl", "cells.csv", "manifest.json",
                                                                    "*.tmp"))
        manifest.update(schema_version=SCHEMA_VERSION, config_hashes=[r.config.config_hash for r in records])
        write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        write_atomic(out / "records.jsonl", "".join(json.dumps(r.to_dict(), default=str) + "\n" for r in records))
        write_atomic(out / "cells.csv", to_csv([r.to_row() for r in records]))
    except (OSError, ValueError) as err:
        shutil.rmtree(out, ignore_errors=True)
        raise UserError(str(out), f"cannot write: {err}") from None