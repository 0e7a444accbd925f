"""Suite validation and grid expansion: every error names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_suite

from memprof import suite
from memprof.errors import UserError


def test_quick_suite_covers_the_required_grid() -> None:
    s = suite.load("quick")
    assert {c.optimizer.label for c in s.cells} >= {"adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor",
                                                "lion_8bit", "schedule_free_adamw"}
    assert {c.adapter.kind for c in s.cells} == {"lora", "qlora"}
    assert len(s.cells) == 12
    assert len({c.key for c in s.cells}) == 12


def test_path_and_packaged_name_resolve_to_the_same_suite() -> None:
    assert suite.load("suites/quick.toml").digest == suite.load("quick").digest


def test_grid_expands_to_the_cartesian_product_with_exclude_and_override(tmp_path: Path) -> None:
    path = write_suite(tmp_path, adapters='["lora", "qlora"]', optimizers='["adamw_torch", "adafactor"]',
                       batch_sizes="[1, 2]", extra="""
[[exclude]]
adapter = "qlora"
optimizer = "adafactor"

[[override]]
match = { optimizer = "adafactor" }
set = { lr = 0.01, steps = 5 }
""")
    cells = suite.load(str(path)).cells
    assert len(cells) == 2 * 2 * 2 - 2
    assert not [c for c in cells if c.adapter.name == "qlora" and c.optimizer.label == "adafactor"]
    adafactor = [c for c in cells if c.optimizer.label == "adafactor"]
    assert {c.training.lr for c in adafactor} == {0.01} and {c.training.steps for c in adafactor} == {5}
    assert {c.training.lr for c in cells if c.optimizer.label == "adamw_torch"} == {1e-3}


def test_repeats_give_one_cell_per_seed(tmp_path: Path) -> None:
    path = write_suite(tmp_path)
    text = path.read_text().replace('device = "cpu"', 'device = "cpu"\nrepeats = 3\nseed = 7')
    path.write_text(text)
    cells = suite.load(str(path)).cells
    assert [(c.training.repeat, c.training.seed) for c in cells] == [(0, 7), (1, 8), (2, 9)]


@pytest.mark.parametrize(("mutation", "expected"), [
    (('steps = 3', 'steps = 0'), "suite.steps: Input should be greater than 0"),
    (('steps = 3', 'steps = "3"'), "suite.steps: Input should be a valid integer"),
    (('device = "cpu"', 'device = "tpu"'), "suite.device: Input should be 'auto', 'cpu' or 'cuda'"),
    (('seq_len = [32]', 'seq_len = [32]\ncolour = "red"'), "grid.colour: unknown key"),
    (('batch_size = [2]', 'batch_size = [2, -1]'), "grid.batch_size[1]: Input should be greater than or equal to 1"),
    (('optimizer = ["adamw_torch"]', 'optimizer = ["adamw_torh"]'),
     "grid.optimizer[0]: unknown optimizer 'adamw_torh' (did you mean 'adamw_torch'?)"),
    (('model = ["tiny-llama"]', 'model = ["gpt-9"]'), "grid.model[0]: unknown model 'gpt-9'"),
    (('adapter = ["lora"]', 'adapter = ["ia3"]'), "grid.adapter[0]: unknown adapter 'ia3'"),
    (('[grid]', '[grid\n'), "malformed TOML"),
    (('seq_len = [32]', 'seq_len = [32]\nschedule = ["cosinee"]'), "grid.schedule[0]: unknown schedule 'cosinee'"),
    (('seq_len = [32]', 'seq_len = [32]\nlr = [inf]'), "grid.lr[0]: Input should be a finite number"),
    (('seq_len = [32]', 'seq_len = [32]\nlr = [nan]'), "grid.lr[0]: Input should be a finite number"),
    (('timeout_s = 120', 'timeout_s = nan'), "suite.timeout_s: Input should be a finite number"),
    (('steps = 3', 'steps = 3\nmax_grad_norm = nan'), "suite.max_grad_norm: Input should be a finite number"),
    (('steps = 3', 'steps = 3\ntarget_loss = inf'), "suite.target_loss: Input should be a finite number"),
    (('timeout_s = 120', 'timeout_s = 1e300'), "suite.timeout_s: Input should be less than or equal to 604800"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\ndropout = nan'),
     "adapters.lora.dropout: Input should be a finite number"),
    (('seq_len = [32]', 'seq_len = [32]\n[[override]]\nmatch = { seq_len = 32 }\nset = { timeout_s = inf }'),
     "override[0].set.timeout_s: Input should be a finite number"),
    (('batch_size = [2]', 'batch_size = [100000000000000000000]'),
     "grid.batch_size[0]: Input should be less than or equal to 1048576"),
    (('batch_size = [2]', 'batch_size = [9223372036854775807]'),
     "grid.batch_size[0]: Input should be less than or equal to 1048576"),
    (('seq_len = [32]', 'seq_len = [33554432]'), "grid.seq_len[0]: Input should be less than or equal to 16777216"),
    (('seq_len = [32]', 'seq_len = [1]'), "grid.seq_len[0]: Input should be greater than or equal to 2"),  # NaN loss
    (('seq_len = [32]', 'seq_len = [32]\nparallel = [{ strategy = "ddp", world_size = 100000 }]'),
     "grid.parallel[0].world_size: Input should be less than or equal to 1024"),
    (('steps = 3', 'steps = 3\nmemory_budget_bytes = 1000000'),
     "suite.memory_budget_bytes: must be 0 (none) or at least 8,388,608 (8 MiB, a thread's stack)"),  # hung a worker
    (('seq_len = [32]', 'seq_len = [32]\n[[override]]\nmatch = { seq_len = 32 }\nset = { memory_budget_bytes = 1000 }'),
     "override[0].set.memory_budget_bytes: must be 0 (none) or at least 8,388,608"),
    (('seq_len = [32]', 'seq_len = [32]\n[models.unused]\npath = "/nonexistent/model"'),
     "models.unused.path: no such folder: /nonexistent/model"),
    (('seq_len = [32]', 'seq_len = [32]\n[models.unused]\npath = "/proc"'),
     "models.unused.path: /proc has no config.json"),  # transformers: 'Should have a model_type key in its config.json'
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.full]\nkind = "none"\nr = 8'),
     'adapters.full.r: a kind = "none" adapter trains every weight and has no LoRA settings'),
    (('batch_size = [2]', 'batch_size = [2, 2]'), "grid.batch_size[1]: 2 is given twice"),
    (('seq_len = [32]', 'seq_len = [32]\n[[exclude]]\noptimizer = "adamw_torh"'), "exclude[0]: matches no cell"),
    (('seq_len = [32]', 'seq_len = [32]\n[[override]]\nmatch = { optimizer = "adamw_torch" }\n'
                        'set = { schedule = "cosinee" }'), "override[0].set.schedule: unknown schedule 'cosinee'"),
    (('seq_len = [32]', 'seq_len = [32]\n[[override]]\nmatch = { seq_len = 64 }\nset = { steps = 4 }'),
     "override[0].match: matches no cell that runs"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\ndropout = 1.5'),
     "adapters.lora.dropout: Input should be less than or equal to 1"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\nr = 0'), "adapters.lora.r: Input should be greater than 0"),
    (('seq_len = [32]', 'seq_len = [32]\nparallel = [{ strategy = "ddp", world_size = 2 }]\nloss_chunk = [16]'),
     "grid.parallel[0] with grid.loss_chunk[0]: loss_chunk with parallel ddp"),
    (('seq_len = [32]', 'seq_len = [32]\nparallel = [{ strategy = "ddp", world_size = 2 }]\n[[override]]\n'
                        'match = { seq_len = 32 }\nset = { loss_chunk = 16 }'),
     "grid.parallel[0] with override[0].set.loss_chunk: loss_chunk with parallel ddp"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\nr = -8'), "adapters.lora.r: Input should be greater than 0"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\nr = "16"'),
     "adapters.lora.r: Input should be a valid integer"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\nalpha = -1'),
     "adapters.lora.alpha: Input should be greater than or equal to 0"),
    (('seq_len = [32]', 'seq_len = [32]\n[adapters.lora]\nkind = "lora"\nquant_type = "fp4"'),
     "adapters.lora.quant_type: only a qlora adapter quantises its base"),
])
def test_bad_suites_fail_with_file_and_field(tmp_path: Path, mutation: tuple[str, str], expected: str) -> None:
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace(*mutation))
    with pytest.raises(UserError) as err:
        suite.load(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_cli_reports_a_bad_suite_in_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("steps = 3", "steps = -1"))
    assert run_cli("run", str(path), "--out", str(tmp_path / "results")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "suite.steps" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(("mutation", "expected"), [
    (("timeout_s = 120", "timeout_s = inf"), "suite.timeout_s: Input should be a finite number"),
    (("batch_size = [2]", "batch_size = [100000000000000000000]"),
     "grid.batch_size[0]: Input should be less than or equal to 1048576"),
    (("batch_size = [2]", f"batch_size = {list(range(1, 101))}\nlr = {[i / 1e4 for i in range(1, 101)]}\n"
                          f"grad_accum = {list(range(1, 3))}"),
     "grid: 20,000 cells (100 batch_size × 2 grad_accum × 100 lr), more than the 10,000 a suite may have; split it "
     "into suites or thin its axes"),
], ids=["infinite-timeout", "huge-batch", "huge-grid"])
def test_a_suite_no_cell_can_run_is_refused_before_any_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                      mutation: tuple[str, str], expected: str) -> None:
    """Each of these passed load and --dry-run: the zygote died on an infinite timeout after the results folder was
    made, a huge batch crashed every cell in C++, and a million-cell grid hung --dry-run for minutes."""
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace(*mutation))
    for dry_run in (("--dry-run",), ()):
        assert run_cli("run", str(path), "--out", str(tmp_path / "results"), *dry_run) == 2
        assert capsys.readouterr().err.strip() == f"error: {path}: {expected}"
    assert not (tmp_path / "results").exists()


def test_a_memory_budget_on_the_gpu_is_refused_before_any_cell_runs(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("steps = 3", "steps = 3\nmemory_budget_bytes = 1000000000"))
    assert run_cli("run", str(path), "--device", "cuda", "--out", str(tmp_path / "results")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: memory_budget_bytes" in err and "CPU budget" in err
    assert not (tmp_path / "results").exists()
    # the same suite on the CPU is what the budget is for: it passes the check (and --dry-run stops there)
    assert run_cli("run", str(path), "--device", "cpu", "--dry-run") == 0


def test_dry_run_lists_cells_without_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_suite(tmp_path, optimizers='["adamw_torch", "lion_8bit"]')
    assert run_cli("run", str(path), "--dry-run", "--out", str(tmp_path / "results")) == 0
    shown = capsys.readouterr().out
    assert "lion_8bit" in shown and "adamw_torch" in shown and "2 cells" in shown
    assert not (tmp_path / "results").exists()


def test_a_grid_axis_takes_one_value_or_a_list_and_names_a_wrong_type(tmp_path: Path) -> None:
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("seq_len = [32]", "seq_len = [32]\nlr = false"))
    with pytest.raises(UserError) as err:
        suite.load(str(path))
    assert str(err.value) == f"{path}: grid.lr: Input should be a valid number"
    path.write_text(path.read_text().replace("lr = false", "lr = 0.01").replace("batch_size = [2]", "batch_size = 4"))
    (cell,) = suite.load(str(path)).cells
    assert (cell.training.lr, cell.shape.batch_size) == (0.01, 4)


@pytest.mark.parametrize(("corpus", "expected"), [
    (None, "data.path: is a directory, not a file"),
    (b"", "data.path: empty file"),
    (b"ab", "data.path: too short: 2 tokens (bytes) leave 1 to train on and 1 held out; seq_len 32"),
    (b"x" * 200, "data.path: too short: 200 tokens (bytes) leave 180 to train on and 20 held out"),
    (b'{"text": "hello"}\n[1, 2]\n', "data.path: line 2 of"),
])
def test_a_corpus_file_a_cell_cannot_train_on_is_refused_at_load(tmp_path: Path, corpus: bytes | None,
                                                                 expected: str) -> None:
    data = tmp_path / ("corpus.jsonl" if corpus and corpus.startswith(b"{") else "corpus.txt")
    if corpus is None:
        data.mkdir()
    else:
        data.write_bytes(corpus)
    path = write_suite(tmp_path, extra=f'[data]\nsource = "file"\npath = "{data}"\n')
    with pytest.raises(UserError) as err:
        suite.load(str(path))
    assert str(err.value).startswith(f"{path}: {expected}")
    data.unlink() if corpus is not None else data.rmdir()
    text = "x" * 400  # 360 to train on and 40 held out: enough for seq_len 32
    data.write_text(json.dumps({"text": text}) if data.suffix == ".jsonl" else text)
    assert len(suite.load(str(path)).cells) == 1


def test_relative_paths_start_from_the_suite_files_folder_and_a_resumed_run_reads_the_same_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data.path was read from the working directory: from elsewhere, another file of that name."""
    folder, elsewhere = tmp_path / "suites", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "corpus.txt").write_text("x" * 400)
    (elsewhere / "corpus.txt").write_text("y" * 400)  # what the working directory would have given
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "config.json").write_text('{"model_type": "llama"}')  # a checkpoint's folder has one
    path = write_suite(folder, steps=2, extra='[data]\nsource = "file"\npath = "corpus.txt"\n'
                                              '[models.local]\npath = "ckpt"\n')
    monkeypatch.chdir(elsewhere)
    loaded = suite.load(str(path))
    (cell,) = loaded.cells
    assert cell.training.data.path == str(folder / "corpus.txt")
    assert loaded.spec.models["local"].path == str(folder / "ckpt")
    assert run_cli("run", str(path), "--out", str(tmp_path / "results")) == 0
    (run_dir,) = (tmp_path / "results").iterdir()
    copy = suite.load(str(run_dir / "suite.toml"))  # what --resume reads: the folder's copy of the suite
    assert [c.config_hash for c in copy.cells] == [cell.config_hash]
    assert run_cli("run", "--resume", str(run_dir)) == 0


def test_a_record_of_a_budget_below_a_suites_floor_still_reads(tmp_path: Path) -> None:
    """The 8 MiB floor is a suite's (a worker cannot start in less): a record of any budget loads, the 1 MB run that
    hung included, so report, compare and attribute still read its folder."""
    import shutil

    from memprof.results.store import read_records

    folder = tmp_path / "run"
    shutil.copytree(Path(__file__).parent.parent / "results" / "levers-cpu", folder)
    first = json.loads((folder / "records.jsonl").read_text().splitlines()[0])
    first["config"]["budget"]["memory_budget_bytes"] = 1_000_000
    (folder / "records.jsonl").write_text(json.dumps(first) + "\n")
    (record,) = read_records(folder)
    assert record.config.budget.memory_budget_bytes == 1_000_000
