"""`memprof report` on a real run: CI tables over repeats, the best LR per rank, diagnoses, PNGs and one HTML file."""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from memprof.views.tables import human_bytes
from conftest import run_cli

from memprof.analysis import diagnose, report, stats
from memprof.analysis.contention import marked
from memprof import suite
from memprof.results.record import Record, Status

SUITE = """
[suite]
name = "report-test"
device = "cpu"
steps = 12
warmup_steps = 1
repeats = 2
eval_every = 4
eval_batches = 2
target_loss = 5.0
lr_warmup_ratio = 0.1
timeout_s = 120

[data]
source = "synthetic"

[grid]
model = ["tiny-llama"]
adapter = ["r4", "r8"]
optimizer = ["adamw_torch"]
batch_size = [4]
seq_len = [16]
lr = [1e-3, 8e-3, 1e5]        # 1e5: every repeat diverges (NaN), so it must never be a best LR
schedule = ["linear"]

[adapters.r4]
kind = "lora"
r = 4
target_modules = "all-linear"

[adapters.r8]
kind = "lora"
r = 8
target_modules = "all-linear"
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("report")
    (root / "report-test.toml").write_text(SUITE)
    assert run_cli("run", str(root / "report-test.toml"), "--out", str(root / "results")) == 0
    (path,) = (root / "results").iterdir()
    assert run_cli("report", str(path)) == 0
    yield path


def test_the_page_embeds_every_figure_and_the_pngs_are_written(run_dir: Path) -> None:
    page = (run_dir / "report" / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    # memory first, then one loss figure per adapter (the plot groups), then the sweep
    names = ["memory", "loss-00", "loss-01", "lr-rank"]
    assert len(images) == len(names)
    for name, data in zip(names, images):
        png = (run_dir / "report" / f"{name}.png").read_bytes()
        assert base64.b64decode(data) == png
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        if name != "memory":
            assert (width, height) == ((1600, 540) if name.startswith("loss") else (700, 480))
    assert "src='http" not in page and "<script" not in page  # self-contained


def test_loss_lines_that_coincide_are_striped_each_at_its_own_offset_and_their_eval_dots_nest() -> None:
    from memprof.views.plots import _coinciding, _line_style, _marker_size

    adamw = [5.0, 4.0, 3.0]
    places = _coinciding([adamw, [x + 1e-3 for x in adamw], [5.0, 4.5, 4.0], adamw, []])
    assert places == [(0, 3), (1, 3), (0, 1), (2, 3), (0, 1)]
    styles = [_line_style(p) for p in places]
    assert styles[0] == styles[2] == styles[4] == "-"
    assert "-" != styles[1] != styles[3] != "-"
    sizes = [_marker_size(p) for p in places]
    assert sizes[2] == sizes[4] and sizes[0] > sizes[1] > sizes[3] > 2  # each later dot inside the one before


def test_memory_is_the_first_section_with_state_and_each_peak(run_dir: Path) -> None:
    from memprof.analysis.report import load_run
    from memprof.views.report import memory_table

    page = (run_dir / "report" / "report.html").read_text()
    sections = re.findall(r"<h1 class='section'>([^<]+)</h1>", page)
    assert sections == ["Memory", "Convergence and speed"]
    memory = page[page.index("Memory"):page.index("Convergence and speed")]
    assert "MiB" in memory and "Where each peak" in memory
    assert "vs AdamW" not in memory  # AdamW is this suite's only optimizer: nothing to compare its state with
    records = load_run(run_dir).records
    table = memory_table(load_run(run_dir))
    for r in records:  # every configuration's measured state is in the page as the table shows it
        row = next(row for row in table.rows if row[table.columns.index("optimizer state")] ==
                   human_bytes(r.optimizer_state_bytes))
        assert row[table.columns.index("peak")] in memory


def test_terminal_tables_leave_out_columns_rather_than_cut_names(run_dir: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from memprof.analysis.report import load_run, tables
    from memprof.views.report import memory_table
    from memprof.views.tables import _columns_that_fit, rich_tables
    from rich.console import Console

    run = load_run(run_dir)
    data = [memory_table(run)] + tables(run)
    for width in (100, 200):
        console = Console(width=width, record=True)
        console.print(rich_tables(data, width))
        text = console.export_text()
        assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
        for t in data[:2]:  # every name of every row is whole
            for row in t.rows:
                assert row[0] in text and row[1] in text
        left_out = re.findall(r"not shown at (\d+) columns", text)
        assert (width == 100) == bool(left_out or "in every row: " in text)
    for t in data:  # at 80 columns every column is shown, said in a line (one value in every row) or named as left out
        keep, constant = _columns_that_fit(t, 80)
        dropped = [j for j in range(len(t.columns)) if j not in keep and j not in constant]
        assert all(len({row[j] for row in t.rows}) == 1 for j in constant)
        varying = [j for j in range(len(t.columns)) if j not in constant]
        assert dropped == varying[len(varying) - len(dropped):]  # the rightmost of the others


def test_repeats_table_shows_mean_and_t_interval_of_the_records(run_dir: Path) -> None:
    run = report.load_run(run_dir)
    assert len(run.records) == 12 and {r.config.training.repeat for r in run.records} == {0, 1}
    table = report.repeats_table(run)
    assert table.columns[:3] == ["adapter", "optimizer", "lr"]  # the axes that vary (and the optimizer)
    assert "tiny-llama" in table.title and "linear" in table.title  # the ones that do not
    assert len(table.rows) == 6
    column = {name: i for i, name in enumerate(table.columns)}
    page = (run_dir / "report" / "report.html").read_text()
    for rs in report.by_config(run.records).values():
        c = rs[0].config
        row = next(row for row in table.rows if row[:3] == [c.adapter.name, "adamw_torch", f"{c.training.lr:g}"])
        if c.training.lr == 1e5:
            assert row[column["ok"]] == "0/2 (diverged)" and row[column["loss, last 5"]] == "–"
            assert row[column["verdict"]] == "diverged"
            continue
        mean, half = stats.t_interval([r.final_loss_smoothed for r in rs])
        assert row[column["loss, last 5"]] == f"{mean:.3f} ± {half:.3f}" and half > 0  # two seeds, two curves
        tokens, tokens_half = stats.t_interval([r.tokens_per_s for r in rs])
        # timings taken while other work held the CPUs are marked
        assert row[column["tokens/s"]] == marked(f"{tokens:,.0f} ± {tokens_half:,.0f}", rs)
        step, step_half = stats.t_interval([r.step_time_median_s * 1e3 for r in rs])
        assert row[column["step ms"]] == marked(f"{step:.1f} ± {step_half:.1f}", rs)
        assert f">{row[column['loss, last 5']]}</td>" in page


def test_best_lr_per_rank_is_the_lowest_mean_eval_loss_and_never_a_diverged_one(run_dir: Path) -> None:
    run = report.load_run(run_dir)
    table = report.lr_rank_table(run)
    assert table is not None and [row[1] for row in table.rows] == ["4", "8"]
    for row, rank in zip(table.rows, (4, 8)):
        means = {lr: sum(r.final_eval_loss for r in run.records if r.config.adapter.rank == rank and r.config.training.lr == lr) / 2
                 for lr in (1e-3, 8e-3)}
        best = min(means, key=means.__getitem__)
        assert row[5] == f"{best:g}"
        assert row[4] == "diverged"
        assert (table.rows.index(row), 2 + [1e-3, 8e-3, 1e5].index(best)) in table.best
    assert any(note.startswith("adamw_torch: best LR ∝ r^") for note in table.notes)


def test_diagnoses_come_with_their_remedies(run_dir: Path) -> None:
    run = report.load_run(run_dir)
    diverged = [r for r in run.records if r.config.training.lr == 1e5]
    assert all(r.status is Status.DIVERGED and r.diagnosis == "non_finite" for r in diverged)
    table = report.diagnosis_table(run)
    assert table is not None
    (row,) = [row for row in table.rows if row[0] == "non_finite"]
    assert row[2] == diagnose.FINDINGS["non_finite"].remedy
    assert row[3].count("100000") == len(diverged) == 4  # each diverged cell named once
    assert row[2] in (run_dir / "report" / "report.html").read_text()


def test_time_to_target_has_the_suite_target_and_the_relative_one(run_dir: Path) -> None:
    run = report.load_run(run_dir)
    table = report.target_table(run)
    assert "steps to 5" in table.columns and "steps to relative" in table.columns
    best = min((r for r in run.records if r.status is Status.OK), key=lambda r: r.final_loss_smoothed)
    c = best.config
    row = next(row for row in table.rows if row[:3] == [c.adapter.name, "adamw_torch", f"{c.training.lr:g}"])
    assert not row[-2].startswith("never")  # the best cell reaches a target 5% above its own final loss


def test_a_folder_copied_without_its_step_logs_says_so_and_draws_no_empty_curves(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Records alone (results/levers-cpu is committed so): the suite's target still has its table, the relative
    target (which needs the logs) and the loss figures are left out, and the command says why."""
    import shutil

    copy = tmp_path / "records-only"
    copy.mkdir()
    for name in ("records.jsonl", "env.json", "suite.toml"):
        shutil.copy(run_dir / name, copy / name)
    capsys.readouterr()
    assert run_cli("report", str(copy)) == 0
    out, err = (" ".join(text.split()) for text in capsys.readouterr())
    said = f"{copy}/cells holds no steps.csv: no loss curves"
    assert out.count(said) == 1 and said not in err  # once: a note of the target table
    levers = tmp_path / "levers-cpu"  # no target, so no table to say it under: the command warns
    shutil.copytree(Path(__file__).parent.parent / "results" / "levers-cpu", levers)
    assert run_cli("report", str(levers)) == 0
    assert f"warning: {levers}/cells holds no steps.csv" in " ".join(capsys.readouterr().err.split())
    # no loss figures; the LR sweep's points are the records' own final losses
    assert sorted(p.name for p in (copy / "report").glob("*.png")) == ["lr-rank.png", "memory.png"]
    table, logged = report.target_table(report.load_run(copy)), report.target_table(report.load_run(run_dir))
    assert logged.columns[-2:] == ["steps to relative", "s to relative"] and table.columns == logged.columns[:-2]
    assert table.rows == [row[:-2] for row in logged.rows]  # the suite target's figures are the records' own


def test_report_of_a_folder_without_records_is_a_user_error(tmp_path: Path) -> None:
    assert run_cli("report", str(tmp_path)) == 2


def test_report_out_that_is_a_file_is_refused_before_rendering(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    assert run_cli("report", str(GPU_RUNS / "reference"), "--out", str(taken)) == 2
    assert capsys.readouterr().err == f"error: --out: {taken} is a file, not a folder\n"
    assert not (GPU_RUNS / "reference" / "report").exists()


def test_the_lr_rank_suite_sweeps_lr_by_rank_on_the_cpu() -> None:
    s = suite.load("lr-rank")
    assert {c.budget.device for c in s.cells} == {"cpu"} and {c.training.data.source for c in s.cells} == {"synthetic"}
    assert sorted({c.adapter.rank for c in s.cells}) == [4, 8, 16, 32]
    assert len({c.training.lr for c in s.cells}) == 5 and len(s.cells) == 20


SWEEP = """
[suite]
name = "sweep"
device = "cpu"

[grid]
model = ["tiny-llama"]
adapter = ["l4", "l8", "q4", "q8", "l8a"]
optimizer = ["adamw_torch"]
lr = [1e-3, 1e-2]

[adapters.l4]
kind = "lora"
r = 4
[adapters.l8]
kind = "lora"
r = 8
[adapters.q4]
kind = "qlora"
r = 4
[adapters.q8]
kind = "qlora"
r = 8
[adapters.l8a]
kind = "lora"
r = 8
alpha = 64
"""


def test_an_lr_sweep_line_is_one_configuration_and_its_best_lr_is_best_lrs(tmp_path: Path) -> None:
    (tmp_path / "sweep.toml").write_text(SWEEP)
    cells = suite.load(str(tmp_path / "sweep.toml")).cells
    # LoRA does best at the low LR, QLoRA at the high one; averaged together (one line per optimizer and rank)
    # the best LRs would be wrong for both
    loss = {("lora", 1e-3): 2.0, ("lora", 1e-2): 3.0, ("qlora", 1e-3): 4.0, ("qlora", 1e-2): 1.0}
    records = [Record(c, final_eval_loss=loss[(c.adapter.kind, c.training.lr)] + c.adapter.rank / 100
                      + (0.5 if c.adapter.name == "l8a" else 0.0)) for c in cells]
    run = report.Run(tmp_path, records, {})
    grid = report.lr_rank_grid(run)
    assert grid is not None and len(grid) == len({report.lr_group(r) for r in records}) == 5
    # lora r8 twice (alpha 16 and 64): every adapter is then named in full
    assert sorted(grid) == [("adamw_torch l4", 4), ("adamw_torch l8", 8), ("adamw_torch l8a", 8),
                            ("adamw_torch q4", 4), ("adamw_torch q8", 8)]
    best = report.best_lrs(records)
    table = report.lr_rank_table(run)
    assert table is not None and table.columns[0] == "configuration"
    for row, r in ((row, next(r for r in records if f"adamw_torch {r.config.adapter.name}" == row[0]))
                   for row in table.rows):
        assert float(row[-2]) == best[report.lr_group(r)] == (1e-3 if r.config.adapter.kind == "lora" else 1e-2)
    # equal losses: the sweep's lines and best_lrs take the same (lowest) LR, whatever order the records came in
    tied = [Record(c, final_eval_loss=2.0) for c in reversed(cells)]
    tied_best = report.best_lrs(tied)
    tied_table = report.lr_rank_table(report.Run(tmp_path, tied, {}))
    assert set(tied_best.values()) == {1e-3} and {float(row[-2]) for row in tied_table.rows} == {1e-3}
    # without the alpha variant, lines are told apart by the adapter's kind
    alike = report.Run(tmp_path, [r for r in records if r.config.adapter.name != "l8a"], {})
    assert sorted(report.lr_rank_grid(alike) or {}) == [("adamw_torch lora", 4), ("adamw_torch lora", 8),
                                                        ("adamw_torch qlora", 4), ("adamw_torch qlora", 8)]


GPU_RUNS = Path(__file__).parent.parent / "results" / "gpu" / "h100-2026-11-28"


def test_a_gpu_run_s_table_and_figure_agree_on_what_was_on_the_card_and_mark_what_stopped_early() -> None:
    from memprof.analysis.memory import on_card_bytes
    from memprof.views import plots
    from memprof.views.report import memory_table
    from memprof.views.tables import results_table

    run = report.load_run(GPU_RUNS / "reference")
    table = memory_table(run)
    column = table.columns.index
    assert column("peak") < column("vs AdamW") < column("on the card")  # the headline first: kept on 80 columns
    from memprof.views.report import _env_line

    assert ", 1× NVIDIA H100 80GB HBM3, Intel(R) Xeon(R)" in _env_line(run)  # the page names the card it ran on
    paged = [r for r in report.one_per_config(run.records) if r.optimizer_state_paged_bytes]
    assert len(paged) == 4  # paged 8- and 32-bit AdamW, LoRA and QLoRA
    for r in paged:  # NVML's process figure leaves the managed memory out: both views add it, to the same figure
        row = next(row for row in table.rows if row[:2] == [r.config.adapter.name, r.config.optimizer.label])
        card = r.nvml_peak_process_used_bytes + r.optimizer_state_paged_bytes
        assert row[column("on the card")] == human_bytes(card) == human_bytes(on_card_bytes(r))
        assert plots._bar_label(r, "GiB", 1 << 30, True).endswith(f", {card / (1 << 30):.2f} GiB on the card")
    levers = report.load_run(GPU_RUNS / "levers-gpu")
    (stopped,) = [r for r in levers.records if r.status is Status.INTERRUPTED]
    table = memory_table(levers)
    (row,) = [row for row in table.rows if "interrupted" in row]
    assert row[table.columns.index("peak")] == f"≥ {human_bytes(stopped.peak_bytes)}"  # what it reached, no more
    assert any(note.startswith("≥: the cell stopped early") for note in table.notes)
    assert plots._bar_label(stopped, "GiB", 1 << 30, False) == f" interrupted: ≥ {human_bytes(stopped.peak_bytes)} " \
                                                               "reached"
    # at 80 columns a column with one value in every row (its only optimizer) gives way to the figures first
    from memprof.views.report import _html_table
    from memprof.views.tables import rich_tables

    printed = " ".join(_printed(rich_tables([table], 80), 80).split())
    assert "in every row: optimizer adamw_torch" in printed
    assert "not shown at 80 columns: on the card, peak at" in printed
    page = _html_table(table)  # and the page says it in a line too
    assert "<th>optimizer</th>" not in page and "<th>peak</th>" in page
    assert "in every row: optimizer adamw_torch" in page
    # its only optimizer is AdamW: each cell would be its own baseline, so neither view has a "vs AdamW" column
    assert "vs AdamW" not in table.columns and not any("vs AdamW" in note for note in table.notes)
    assert "vs AdamW" not in _printed(results_table(levers.records, 200))
    assert "vs AdamW" in _printed(results_table(run.records, 200))


def _printed(renderable: object, width: int = 200) -> str:
    """What a terminal ``width`` columns wide shows of a rich renderable."""
    from rich.console import Console

    console = Console(width=width, record=True)
    console.print(renderable)
    return console.export_text()
