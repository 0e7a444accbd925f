"""Result folders written before the nested configuration (schema 1) still load: records, cells.csv, report,
compare and --resume, with every cell named by the key it was written with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from memprof.results.record import SCHEMA_VERSION, Record, Status
from memprof.results.store import read_csv_records, read_records

# schema 1: small-llama, checkpointing, attention and sharding levers (results/levers-cpu as first committed)
LEVERS = Path(__file__).parent / "schema1" / "levers-cpu"
BASELINE = Path(__file__).parent / "schema1" / "quick-cpu"  # schema 1: the quick suite (results/baselines' first)


@pytest.mark.parametrize("folder", [LEVERS, BASELINE], ids=["levers-cpu", "quick-cpu"])
def test_a_schema_1_folder_reads_back_with_its_keys_and_figures(folder: Path) -> None:
    lines = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    records = read_records(folder)
    assert {line["schema_version"] for line in lines} == {1} and {r.schema_version for r in records} == {1}
    for line, r in zip(lines, records, strict=True):
        assert r.key == line["cell_key"]  # the same configuration gives the same key in either schema
        assert (r.optimizer_state_bytes, r.peak_rss_delta_bytes, r.status.value) == \
            (line["optimizer_state_bytes"], line["peak_rss_delta_bytes"], line["status"])
        assert r.config.levers.parallel.world_size == line.get("world_size", 1)  # older than the levers
        assert r.ranks == line.get("ranks", [])
    from_csv = read_csv_records(folder / "cells.csv")
    assert [(r.key, r.gradient_bytes, r.ranks) for r in from_csv] == [(r.key, r.gradient_bytes, r.ranks)
                                                                       for r in records]


def test_a_migrated_record_is_written_in_the_current_schema_and_reads_back_equal() -> None:
    record = read_records(LEVERS)[-1]
    again = Record.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.schema_version == SCHEMA_VERSION and again.key == record.key
    assert again.config == record.config and again.ranks == record.ranks


def test_report_and_compare_read_schema_1_folders(tmp_path: Path) -> None:
    assert run_cli("report", str(LEVERS), "--out", str(tmp_path / "report")) == 0
    assert "small-llama" in (tmp_path / "report" / "report.html").read_text()
    assert run_cli("compare", str(BASELINE), str(BASELINE)) == 0


def test_a_schema_1_run_resumes_with_the_current_memprof(tmp_path: Path) -> None:
    run_dir = tmp_path / "quick-old"
    shutil.copytree(BASELINE, run_dir)
    lines = (run_dir / "records.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "records.jsonl").write_text("".join(lines[:-1]))  # the last cell never finished
    assert run_cli("run", "--resume", str(run_dir), "--device", "cpu") == 0
    records = read_records(run_dir)
    assert [r.schema_version for r in records] == [1] * 11 + [SCHEMA_VERSION]
    old, new = json.loads(lines[-1]), records[-1]
    assert new.status is Status.OK and new.key == old["cell_key"]
    for name in ("optimizer_state_bytes", "trainable_weight_bytes", "frozen_weight_bytes", "gradient_bytes"):
        assert getattr(new, name) == old[name], name
    assert json.loads((run_dir / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("field,value,said", [("batch_size", "abc", "batch_size: 'abc' is not int"),
                                              ("lr", "fast", "lr: 'fast' is not float"),
                                              ("seq_len", None, "no field 'seq_len'")])
def test_a_schema_1_setting_of_the_wrong_kind_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture, field: str, value: object, said: str) -> None:
    folder = tmp_path / "old"
    shutil.copytree(BASELINE, folder)
    lines = (folder / "records.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, field: value} if value is not None else
                          {k: v for k, v in first.items() if k != field})
    (folder / "records.jsonl").write_text("".join(line + "\n" for line in lines))
    assert run_cli("report", str(folder), "--out", str(tmp_path / "report")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {folder / 'records.jsonl'}: line 1: {said}", err


def test_attribute_writes_a_schema_1_folder_again_in_the_current_schema(tmp_path: Path) -> None:
    """A folder older than manifests gets one made from its records."""
    assert not (LEVERS / "manifest.json").exists()
    assert run_cli("attribute", str(LEVERS), "--out", str(tmp_path / "again")) == 0
    again = read_records(tmp_path / "again")
    assert [r.key for r in again] == [r.key for r in read_records(LEVERS)]
    assert {r.schema_version for r in again} == {SCHEMA_VERSION} and all(r.breakdown for r in again if r.peak_bytes)
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["cell_keys"] == [r.key for r in again] and manifest["suite"] == again[0].config.suite
