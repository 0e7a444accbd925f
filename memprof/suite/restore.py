"""Schema-1 records given back the configuration their run's suite file spelled out.

A schema-1 record kept its model, adapter and optimizer by name only (``memprof.results.migrate``); the folder's
copy of its suite (``suite.toml``) has the tables behind the names. Enters: records and their folder. Leaves: the
same records, each schema-1 one whose key the suite still expands to carrying that cell's configuration.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from memprof.errors import UserError
from memprof.results.record import Record
from memprof.suite.load import load


def with_suite_configs(records: list[Record], run_dir: Path) -> list[Record]:
    """``records`` with their configuration read back from ``run_dir/suite.toml`` where they kept only names (a
    folder without its suite, or a suite that no longer validates, leaves them as they are)."""
    if all(r.schema_version > 1 for r in records) or not (run_dir / "suite.toml").is_file():
        return records
    try:
        cells = {cell.key: cell for cell in load(str(run_dir / "suite.toml")).cells}
    except UserError:
        return records
    return [replace(r, config=cells[r.key].model_copy(update={"index": r.config.index}))
            if r.schema_version == 1 and r.key in cells else r for r in records]
