"""`memprof compare` on real result sets: a pure re-run, a LoRA rank change, an OOM, repeats, bad inputs."""

from __future__ import annotations

import csv
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import run_cli, write_suite

from memprof.results.metrics import Rule, parse_spec
from memprof.analysis.contention import contended
from memprof.results.record import SCHEMA_VERSION, Record, Status
from memprof.results.store import read_records
from memprof.analysis.stats import mann_whitney_p, median_interval, smallest_p

REPEATS = 14  # split into two interleaved halves of 7: the fewest that can reach the default p < 0.002
OPTIMIZERS = '["adamw_torch", "adafactor"]'
RANK_16 = '\n[adapters.lora]\nkind = "lora"\nr = 16\n'
# adafactor gets 16 MB of address space on top of the worker's size: it runs out of memory while building (with
# less, the memory sampler's thread cannot even start its 8 MiB stack, and the cell crashes instead)
OOM_ADAFACTOR = '\n[[override]]\nmatch = { optimizer = "adafactor" }\nset = { memory_budget_bytes = 16000000 }\n'


def _run(suite: Path, out: Path, *extra: str) -> tuple[Path, int]:
    code = run_cli("run", str(suite), "--out", str(out), *extra)
    (run_dir,) = out.iterdir()
    return run_dir, code


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Four real runs of a tiny suite; the re-run and the changed run already compare to the first."""
    tmp = tmp_path_factory.mktemp("compare")
    base_suite = write_suite(tmp, "cmp", optimizers=OPTIMIZERS)
    changed_dir = tmp / "changed"
    changed_dir.mkdir()
    changed_suite = write_suite(changed_dir, "cmp", optimizers=OPTIMIZERS, extra=RANK_16 + OOM_ADAFACTOR)
    repeats_suite = write_suite(tmp, "reps")
    repeats_suite.write_text(repeats_suite.read_text().replace("warmup_steps = 1", f"warmup_steps = 1\n"
                                                                                   f"repeats = {REPEATS}"))
    out: dict[str, tuple[Path, int]] = {}
    out["base"] = _run(base_suite, tmp / "base")
    out["rerun"] = _run(base_suite, tmp / "rerun", "--compare-to", str(out["base"][0]))
    out["changed"] = _run(changed_suite, tmp / "changed-out", "--compare-to", str(out["base"][0]),
                          "--markdown", str(tmp / "changed.md"))
    out["repeats"] = _run(repeats_suite, tmp / "repeats")
    return out


def compare_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = run_cli("compare", *argv, "--json")
    return code, json.loads(capsys.readouterr().out)


def cells_by_optimizer(result: dict) -> dict[str, dict]:
    return {cell["key"].split("/")[2]: cell for cell in result["cells"]}


def metric(cell: dict, name: str) -> dict:
    (found,) = [m for m in cell["metrics"] if m["metric"] == name]
    return found


def split_halves(run_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """Even and odd repeats as two result folders: interleaved in time, so both halves saw the same load."""
    records = read_records(run_dir)
    return (write_records(tmp / "even", [r for r in records if r.config.training.repeat % 2 == 0], like=run_dir),
            write_records(tmp / "odd", [r for r in records if r.config.training.repeat % 2 == 1], like=run_dir))


def write_records(folder: Path, records: list[Record], like: Path) -> Path:
    """A result folder holding ``records``, with the environment and suite of the run folder ``like``."""
    folder.mkdir()
    for name in ("env.json", "suite.toml"):
        shutil.copy(like / name, folder / name)
    (folder / "records.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    return folder


def test_the_runs_behind_the_comparisons_ran(runs: dict[str, tuple[Path, int]]) -> None:
    base = read_records(runs["base"][0])
    assert runs["base"][1] == 0 and [r.status for r in base] == [Status.OK, Status.OK]
    changed = {r.config.optimizer.label: r for r in read_records(runs["changed"][0])}
    assert changed["adamw_torch"].status is Status.OK
    assert changed["adafactor"].status is Status.OOM, changed["adafactor"].error
    repeats = read_records(runs["repeats"][0])
    assert [r.config.training.repeat for r in repeats] == list(range(REPEATS))
    assert {r.config.repeat_key for r in repeats} == {repeats[0].key}


def test_repeats_share_a_key_and_levers_keep_theirs(runs: dict[str, tuple[Path, int]]) -> None:
    (first, *_) = read_records(runs["repeats"][0])
    second = first.config.with_values({"training.seed": 1, "training.repeat": 1, "levers.gradient_checkpointing": "on",
                                       "levers.parallel": {"strategy": "zero1", "world_size": 2}})
    assert second.key == first.key.replace("/seed0", "/seed1") + "/gc/zero1x2"
    assert second.repeat_key == first.key + "/gc/zero1x2" != first.config.repeat_key


def test_a_pure_rerun_is_unchanged_and_run_compare_to_exits_0(
        runs: dict[str, tuple[Path, int]], capsys: pytest.CaptureFixture) -> None:
    assert runs["rerun"][1] == 0
    code, result = compare_json(capsys, str(runs["base"][0]), str(runs["rerun"][0]))
    assert code == 0 and result["exit_code"] == 0
    assert result["counts"]["unchanged"] == 2 and len(result["cells"]) == 2
    for cell in result["cells"]:
        assert cell["verdict"] == "unchanged"
        for name in ("optimizer_state_bytes", "trainable_weight_bytes", "frozen_weight_bytes", "gradient_bytes"):
            assert metric(cell, name)["verdict"] == "unchanged" and metric(cell, name)["change"] == 0
        # one repeat per side: a throughput ratio of two single samples is never a verdict
        throughput = metric(cell, "tokens_per_s")
        assert throughput["verdict"] == "unchanged" and throughput["note"].startswith("not enough repeats (1 vs 1")
        assert metric(cell, "final_loss_smoothed")["change"] == 0  # same seed, same machine: the same loss
    assert result["machines"][0] == result["machines"][1] and result["peaks_compared"]


def test_a_tenfold_slowdown_with_one_repeat_is_still_not_a_verdict(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    slow = [replace(r, tokens_per_s=r.tokens_per_s / 10, step_time_median_s=r.step_time_median_s * 10)
            for r in read_records(runs["base"][0])]
    write_records(tmp_path / "slow", slow, like=runs["base"][0])
    code, result = compare_json(capsys, str(runs["base"][0]), str(tmp_path / "slow"))
    assert code == 0
    assert {metric(c, "tokens_per_s")["verdict"] for c in result["cells"]} == {"unchanged"}


def test_a_changed_configuration_is_refused_with_its_reason_and_an_oom_fails(
        runs: dict[str, tuple[Path, int]], capsys: pytest.CaptureFixture) -> None:
    """The changed suite gives its `lora` adapter rank 16 (the key stays: same adapter name) and adafactor a memory
    budget it cannot fit (a limit, not a configuration change)."""
    assert runs["changed"][1] == 1  # `run --compare-to` exits with the comparison's code
    code, result = compare_json(capsys, str(runs["base"][0]), str(runs["changed"][0]))
    assert code == 1 and result["counts"]["not comparable"] == 1 and result["counts"]["failed"] == 1
    cells = cells_by_optimizer(result)
    adamw = cells["adamw_torch"]
    assert adamw["verdict"] == "not comparable" and adamw["metrics"] == []
    assert adamw["note"] == "configuration differs: adapter.lora.r: 8 → 16"
    oom = cells["adafactor"]
    assert (oom["verdict"], oom["baseline_status"], oom["current_status"]) == ("failed", "ok", "oom")
    markdown = (runs["changed"][0].parent.parent / "changed.md").read_text()
    assert markdown.startswith("### memprof compare: regression (1 failed, 1 not comparable)")
    assert "| `adamw_torch` | **not comparable** |" in markdown and "adapter.lora.r: 8 → 16" in markdown


@pytest.mark.parametrize("delta", [+4, -4], ids=["more", "fewer"])
def test_an_exact_change_is_a_regression_in_either_direction(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture, delta: int) -> None:
    base = runs["base"][0]
    moved = [replace(r, optimizer_state_bytes=r.optimizer_state_bytes + delta) for r in read_records(base)]
    write_records(tmp_path / "moved", moved, like=base)
    code, result = compare_json(capsys, str(base), str(tmp_path / "moved"))
    assert code == 1 and result["counts"]["regressed"] == 2  # fewer bytes are not the baseline's bytes either
    state = metric(cells_by_optimizer(result)["adamw_torch"], "optimizer_state_bytes")
    assert state["verdict"] == "regressed" and state["current"] - state["baseline"] == delta


def test_runs_that_share_no_configuration_are_an_input_error(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = runs["base"][0]
    other_seed = [replace(r, config=r.config.with_values({"training.seed": 5})) for r in read_records(base)]
    write_records(tmp_path / "seed5", other_seed, like=base)
    capsys.readouterr()
    assert run_cli("compare", str(base), str(tmp_path / "seed5")) == 2
    err = capsys.readouterr().err
    assert "share no configuration" in err and "nothing to compare" in err and len(err.strip().splitlines()) == 1


def test_rules_on_the_command_line_and_in_the_suite(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = str(runs["base"][0])
    moved = ("optimizer_state_bytes", "trainable_weight_bytes")
    records = [replace(r, optimizer_state_bytes=r.optimizer_state_bytes + 4,
                       trainable_weight_bytes=r.trainable_weight_bytes + 4) for r in read_records(runs["base"][0])]
    folder = write_records(tmp_path / "moved", records, like=runs["base"][0])
    code, result = compare_json(capsys, base, str(folder), *(a for name in moved for a in ("--rule", f"{name}:off")))
    adamw = cells_by_optimizer(result)["adamw_torch"]
    assert adamw["verdict"] == "unchanged" and not set(moved) & {m["metric"] for m in adamw["metrics"]}
    assert code == 0
    # the same rules from the current run's suite: its [compare] table
    with open(folder / "suite.toml", "a") as f:
        f.write("\n[compare]\n" + "".join(f'{name} = "off"\n' for name in moved))
    code, result = compare_json(capsys, base, str(folder))
    assert cells_by_optimizer(result)["adamw_torch"]["verdict"] == "unchanged"
    # ... and --rule wins over the suite
    code, result = compare_json(capsys, base, str(folder), "--rule", "trainable_weight_bytes:exact")
    assert cells_by_optimizer(result)["adamw_torch"]["verdict"] == "regressed"


def test_rule_grammar() -> None:
    timing = Rule("noisy", 1.1)
    assert parse_spec("10%", timing) == Rule("relative", 0.10)
    assert parse_spec("factor=1.2", timing) == Rule("noisy", 1.2, 0.002)
    assert parse_spec("p=0.01", timing) == Rule("noisy", 1.1, 0.01)
    assert parse_spec("factor=1.5,p=0.05", timing) == Rule("noisy", 1.5, 0.05)
    assert parse_spec("abs=0.1", timing) == Rule("absolute", 0.1)
    assert parse_spec("exact", timing) == Rule("exact") and parse_spec("off", timing) == Rule("off")
    for bad in ("ten%", "factor=0.5", "p=2", "abs=-1", "speed=3", "abs=1,factor=2"):
        with pytest.raises(ValueError):
            parse_spec(bad, timing)


def test_mann_whitney_p_values_by_hand() -> None:
    # complete separation of 5 and 5 samples: 2 of the C(10, 5) = 252 orderings are as extreme
    assert mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert smallest_p(5, 5) == pytest.approx(2 / 252) and smallest_p(7, 7) == pytest.approx(2 / 3432)
    assert mann_whitney_p([1, 2, 3], [4, 5, 6, 7]) == pytest.approx(2 / 35)
    # U = 7 for 5 and 5: P(U <= 7) = 39 / 252
    assert mann_whitney_p([1.1, 2.5, 3.3, 4.2, 5.0], [2.0, 2.6, 6, 7, 8]) == pytest.approx(78 / 252)
    assert mann_whitney_p([3, 1, 2], [2, 1, 3]) == pytest.approx(1.0)


def test_median_interval_by_order_statistics_and_its_coverage() -> None:
    assert median_interval([1, 2, 3, 4, 5]) is None  # 2 of the 32 sign patterns put all five on one side: over 5%
    assert median_interval([6, 1, 5, 2, 4, 3]) == (1, 6)  # 6 values: min and max, 1 - 2/64 = 96.9%
    assert median_interval(list(range(20))) == (5, 14)  # 1 - 2 P(Binomial(20, 1/2) <= 5) = 95.9%; k = 7 gives 88%
    rng = random.Random(0)
    draws = [median_interval([rng.gauss(0, 1) for _ in range(20)]) for _ in range(2000)]
    assert 0.945 <= sum(lo <= 0 <= hi for lo, hi in draws) / len(draws) <= 0.975


def test_repeats_of_a_pure_rerun_do_not_make_a_throughput_verdict(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    even, odd = split_halves(runs["repeats"][0], tmp_path)
    code, result = compare_json(capsys, str(even), str(odd))
    (cell,) = result["cells"]
    assert cell["repeats"] == [REPEATS // 2, REPEATS // 2]
    busy = any(contended(r.cpu_pressure) for r in read_records(runs["repeats"][0]))
    for name in ("tokens_per_s", "step_time_median_s"):
        judged = metric(cell, name)  # judged (not skipped), unless the machine was busy while they were timed
        assert judged["verdict"] != "regressed" and judged["note"].startswith("timed under" if busy else "p=")
    assert metric(cell, "final_loss_smoothed")["verdict"] == "not comparable"  # no seed on both sides
    assert metric(cell, "optimizer_state_bytes")["verdict"] == "unchanged"
    assert cell["verdict"] != "regressed" and code == 0


def test_repeats_catch_a_real_slowdown(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    halves, _ = split_halves(runs["repeats"][0], tmp_path)
    # the slowdown under test is the one written here: both sides quiet (cpu_pressure 0), whatever load the run saw
    records = [replace(r, cpu_pressure=0.0) for r in read_records(halves)]
    even = write_records(tmp_path / "even-quiet", records, like=halves)
    spread = max(r.step_time_median_s for r in records) / min(r.step_time_median_s for r in records)
    slower = 2 * spread  # every slowed repeat is slower than every baseline repeat
    slowed = [replace(r, tokens_per_s=r.tokens_per_s / slower, step_time_median_s=r.step_time_median_s * slower)
              for r in records]
    write_records(tmp_path / "slow", slowed, like=even)
    code, result = compare_json(capsys, str(even), str(tmp_path / "slow"))
    (cell,) = result["cells"]
    assert code == 1 and cell["verdict"] == "regressed"
    assert metric(cell, "tokens_per_s")["verdict"] == "regressed"
    assert metric(cell, "tokens_per_s")["note"] == f"p={2 / 3432:.2g}"
    code, result = compare_json(capsys, str(even), str(tmp_path / "slow"),
                                "--rule", f"tokens_per_s:factor={slower * 2}", "--rule", "step_time_median_s:off")
    assert code == 0  # significant, but below the factor asked for
    # the same slowdown timed while something else held the CPUs is no verdict: the timings are not the cell's
    write_records(tmp_path / "slow-busy", [replace(r, cpu_pressure=0.6) for r in slowed], like=even)
    code, result = compare_json(capsys, str(even), str(tmp_path / "slow-busy"))
    (cell,) = result["cells"]
    assert code == 0 and cell["verdict"] == "unchanged"
    assert metric(cell, "tokens_per_s")["verdict"] == "not comparable"
    assert metric(cell, "tokens_per_s")["note"].startswith("timed under CPU contention (a task waited for a CPU "
                                                            "during up to 60%")


def test_different_machines_do_not_compare_peaks(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "gpu"
    shutil.copytree(runs["rerun"][0], folder)
    env = json.loads((folder / "env.json").read_text())
    env["gpus"] = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85 << 30, "driver": "570.1"}]
    env["versions"]["torch"] = "9.9.9"
    (folder / "env.json").write_text(json.dumps(env))
    code, result = compare_json(capsys, str(runs["base"][0]), str(folder))
    assert code == 0 and not result["peaks_compared"]
    assert result["machines"][1] == "NVIDIA H100 80GB HBM3"
    assert any(line.startswith("torch: ") and line.endswith("→ 9.9.9") for line in result["environment"])
    cell = result["cells"][0]
    assert metric(cell, "peak_rss_delta_bytes")["verdict"] == "not comparable"
    assert metric(cell, "optimizer_state_bytes")["verdict"] == "unchanged"  # exact bytes are compared anyway
    code, result = compare_json(capsys, str(runs["base"][0]), str(folder), "--allow-different-machines")
    assert metric(result["cells"][0], "peak_rss_delta_bytes")["verdict"] != "not comparable"
    capsys.readouterr()
    assert run_cli("compare", str(runs["base"][0]), str(folder)) == 0
    shown = capsys.readouterr().out
    assert "environment differs:" in shown and "memory peaks and timings not compared" in shown


def test_a_run_records_the_malloc_settings_it_measured_under_and_compare_names_a_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from memprof.analysis.compare import environment_differences
    from memprof.results import env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    before = env.capture()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    after = env.capture()
    assert "GLIBC_TUNABLES" not in before["memory_env"]
    assert after["memory_env"]["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=1048576"
    assert environment_differences(before, after) == [
        "GLIBC_TUNABLES: unset → glibc.malloc.mmap_threshold=1048576",
        "PYTORCH_CUDA_ALLOC_CONF: unset → expandable_segments:True"]


def test_table_csv_input_and_missing_and_new_cells(
        runs: dict[str, tuple[Path, int]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = runs["base"][0]
    one = [r for r in read_records(base) if r.config.optimizer.label == "adamw_torch"]
    write_records(tmp_path / "one", one, like=base)
    code, result = compare_json(capsys, str(base / "cells.csv"), str(tmp_path / "one" / "records.jsonl"))
    assert code == 0
    assert {c["key"].split("/")[2]: c["verdict"] for c in result["cells"]} == {"adamw_torch": "unchanged",
                                                                              "adafactor": "missing"}
    code, result = compare_json(capsys, str(tmp_path / "one"), str(base))
    assert code == 0 and result["counts"]["new"] == 1
    capsys.readouterr()
    assert run_cli("compare", str(base), str(runs["changed"][0])) == 1
    shown = capsys.readouterr().out
    assert "not comparable" in shown and "failed" in shown and "→ regression" in shown


def test_a_narrow_terminal_gets_the_comparison_as_lines_with_no_name_or_figure_broken(
        runs: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    from rich.console import Console

    from memprof.analysis.compare import compare, load
    from memprof.results.metrics import resolve_rules
    from memprof.views.compare import comparison_table

    base = runs["base"][0]
    grown = [replace(r, peak_rss_delta_bytes=r.peak_rss_delta_bytes * 2, gradient_bytes=r.gradient_bytes + 4)
             for r in read_records(base)]
    result = compare(load(base), load(write_records(tmp_path / "grown", grown, like=base)), resolve_rules([], "t"))
    shown = {}
    for width in (80, 200):
        console = Console(width=width, record=True)
        console.print(comparison_table(result, width))
        shown[width] = console.export_text()
        assert max(len(line) for line in shown[width].splitlines()) <= width
    assert "┃ cell" in shown[200] and "┃" not in shown[80]  # the table where it fits, lines where it does not
    moved = [m for cell in result.cells for m in cell.metrics if m.verdict.value != "unchanged"]
    assert {m.metric for m in moved} == {"peak_rss_delta_bytes", "gradient_bytes"}
    for m in moved:  # every metric that moved is whole on one line of each, its name and figures together
        assert any(m.metric in line and "→" in line for line in shown[80].splitlines()), m.metric
        assert any(m.metric in line for line in shown[200].splitlines())
    for cell in result.cells:
        assert any(line.startswith(f"{cell.key.split('/')[2]} regressed") for line in shown[80].splitlines())
    assert f"{grown[0].gradient_bytes:,} B" in shown[80]  # 4 bytes more: to the byte, where rounding hides it


def test_notes_wrap_between_words_at_every_width(runs: dict[str, tuple[Path, int]], tmp_path: Path) -> None:
    import re

    from rich.console import Console

    from memprof.analysis.compare import compare, load
    from memprof.results.metrics import resolve_rules
    from memprof.views.compare import comparison_table

    base = runs["base"][0]
    grown = [replace(r, optimizer_state_bytes=r.optimizer_state_bytes + 4096) if i == 0 else r
             for i, r in enumerate(read_records(base))]
    result = compare(load(base), load(write_records(tmp_path / "grown", grown, like=base)), resolve_rules([], "t"))
    notes = ("regressed (exact)", "metrics within their rules")  # the regressed cell's note, the other cell's
    for width in range(80, 161, 4):
        console = Console(width=width, record=True)
        console.print(comparison_table(result, width))
        lines = console.export_text().splitlines()
        words = {w for line in lines for w in re.split(r"[\s│┃]+", line)}
        for note_word in {w for note in notes for w in note.split()}:  # "regress" / "ed" before: a 6-column note
            assert note_word in words, (width, note_word)
        assert len(lines) <= 12, width  # a line or two per cell, not a column of word fragments
        assert any(line.startswith("not judged in 2 cells") for line in lines), width  # left, as other captions


@pytest.mark.parametrize("case", ["missing folder", "not a result", "other schema", "empty csv", "bad rule",
                                  "missing baseline for --compare-to"])
def test_bad_inputs_exit_2_with_one_line(runs: dict[str, tuple[Path, int]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture, case: str) -> None:
    base = str(runs["base"][0])
    if case == "missing folder":
        argv, where = ["compare", base, str(tmp_path / "nope")], str(tmp_path / "nope")
    elif case == "not a result":
        argv, where = ["compare", base, str(tmp_path)], str(tmp_path)
    elif case == "other schema":
        lines = (runs["base"][0] / "records.jsonl").read_text().replace(f'"schema_version": {SCHEMA_VERSION}',
                                                                         '"schema_version": 99')
        write_records(tmp_path / "v99", [], like=runs["base"][0])
        (tmp_path / "v99" / "records.jsonl").write_text(lines)
        argv, where = ["compare", base, str(tmp_path / "v99")], "schema_version 99"
    elif case == "empty csv":
        (tmp_path / "cells.csv").write_text("")
        argv, where = ["compare", str(tmp_path / "cells.csv"), base], str(tmp_path / "cells.csv")
    elif case == "bad rule":
        argv, where = ["compare", base, base, "--rule", "tokens_per_s:fast"], "--rule"
    else:
        argv = ["run", str(runs["base"][0] / "suite.toml"), "--out", str(tmp_path / "out"), "--compare-to",
                str(tmp_path / "nope")]
        where = str(tmp_path / "nope")
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and where in err, err
    assert not (tmp_path / "out").exists()  # --compare-to checks the baseline before it runs anything


REFERENCE = Path(__file__).parent.parent / "results" / "gpu" / "h200-2026-11-28" / "reference"  # two schema-2 cells
READERS = ("report", "levers", "attribute", "compare")


def _spoil(folder: Path, case: str) -> tuple[str, tuple[str, ...]]:
    """Spoil the copy of a result folder as ``case`` says; the one line its readers must say, and those readers."""
    records = folder / "records.jsonl"
    lines = records.read_text().splitlines()
    first = json.loads(lines[0])
    if case in ("array line", "null line"):
        lines[1] = "[1, 2, 3]" if case == "array line" else "null"
        said = f"{records}: line 2: not a JSON object"
    elif case == "text for bytes":
        lines[0] = json.dumps({**first, "peak_allocated_bytes": "abc"})
        said = f'{records}: line 1: peak_allocated_bytes: "abc" is not int | None'
    elif case == "negative bytes":
        lines[0] = json.dumps({**first, "optimizer_state_bytes": -5})
        said = f"{records}: line 1: optimizer_state_bytes: -5 is negative, which no count of bytes is"
    elif case == "bytes in a float":
        lines[0] = json.dumps({**first, "breakdown": {**first["breakdown"], "other": 1.5}})
        said = f"{records}: line 1: breakdown: "
    elif case == "unknown status":
        lines[0] = json.dumps({**first, "status": 5})
        said = f"{records}: line 1: status: 5 is not one of ok, oom, "
    elif case == "no config":
        lines[0] = json.dumps({k: v for k, v in first.items() if k != "config"})
        said = f"{records}: line 1: no field 'config'"
    elif case == "env array":
        (folder / "env.json").write_text("[1, 2]")
        return f"{folder / 'env.json'}: not a JSON object", ("report", "compare")
    elif case in ("steps without header", "text in steps"):
        steps = folder / "cells" / "0001" / "steps.csv"
        rows = steps.read_text().splitlines()
        if case == "steps without header":
            steps.write_text("".join(row + "\n" for row in rows[1:]))
            return f"{steps}: its header has no step, loss, lr, grad_norm, step_time_s column (read: ", ("report",)
        steps.write_text("".join(row + "\n" for row in [rows[0], rows[1].replace(",0,0,", ",0,x,", 1), *rows[2:]]))
        return f"{steps}: line 2: step: 'x' is not a number", ("report",)
    elif case == "empty records":
        lines = []
        said = f"{records}: no records (empty file)"
    elif case == "not UTF-8":
        records.write_bytes(records.read_bytes() + b"\x96\n")
        return f"{records}: line 3: not UTF-8 text (byte 0x96)", (*READERS, "resume")
    elif case == "steps not UTF-8":
        steps = folder / "cells" / "0001" / "steps.csv"
        steps.write_bytes(b"\x96" + steps.read_bytes())
        return f"{steps}: cannot read: 'utf-8' codec can't decode byte 0x96", ("report",)
    elif case == "a line of text":  # no record cut short, which would start as one
        lines = ["hello world"]
        said = f"{records}: line 1: not valid JSON"
    elif case == "a lone torn line":
        records.write_text(lines[0][:300] + "\n")
        return f"{records}: no records (its only line is torn: a run killed while writing it)", READERS
    elif case == "a cell twice":  # would pass for one more repeat
        lines.append(lines[0])
        key = read_records(REFERENCE)[0].key
        said = f"{records}: line 3: cell {first['config']['index']} ({key}) again, first at line 1"
    elif case == "two suites":
        lines.append(json.dumps({**first, "config": {**first["config"], "suite": "other", "index": 7}}))
        said = f"{records}: line 3: a record of suite 'other', where line 1's is of 'reference'"
    else:  # no records.jsonl: the run stopped before its first cell; compare reads the cells.csv beside it
        records.unlink()
        return f"{records}: no records (no such file", ("report", "levers", "attribute")
    records.write_text("".join(line + "\n" for line in lines))
    return said, READERS if case == "empty records" else (*READERS, "resume")  # an empty file resumes from none


@pytest.mark.parametrize("case", ["array line", "null line", "text for bytes", "negative bytes", "bytes in a float",
                                  "unknown status", "no config", "env array", "empty records", "no records.jsonl",
                                  "steps without header", "text in steps", "not UTF-8", "steps not UTF-8",
                                  "a line of text", "a lone torn line", "a cell twice", "two suites"])
def test_every_reader_of_a_bad_result_folder_says_one_line_naming_file_line_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    folder = tmp_path / "run"
    shutil.copytree(REFERENCE, folder)
    said, readers = _spoil(folder, case)
    for command in readers:
        argv = {"report": ["report", str(folder), "--out", str(tmp_path / "report")],
                "compare": ["compare", str(REFERENCE), str(folder)],
                "resume": ["run", "--resume", str(folder)]}.get(command, [command, str(folder)])
        capsys.readouterr()
        assert run_cli(*argv) == 2, command
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {said}") and "\n" not in err, (command, err)
    assert not (tmp_path / "report").exists()


def test_cells_csv_keeps_each_family_of_columns_together_and_old_files_read_back() -> None:
    """The first 8-bit cell's ``optimizer_state_bytes.uint8`` used to land after every ``peak.*`` column, the
    first cell's ``.float32`` before them; files written that way still read back the same."""
    from memprof.results.store import read_csv_records, to_csv

    old = Path(__file__).parent.parent / "results" / "gpu" / "h100-2026-11-28" / "reference"
    records = read_csv_records(old / "cells.csv")
    assert [r.optimizer_state_bytes_by_dtype for r in records] == \
        [r.optimizer_state_bytes_by_dtype for r in read_records(old)]

    def dtype_columns(header: str) -> list[int]:
        return [i for i, c in enumerate(header.split(",")) if c.startswith("optimizer_state_bytes.")]

    before = dtype_columns((old / "cells.csv").read_text().splitlines()[0])
    now = dtype_columns(to_csv([r.to_row() for r in records]).splitlines()[0])
    assert len(before) == len(now) == 2 and before[1] - before[0] > 1  # float32 and uint8, once apart
    assert now[1] == now[0] + 1


@pytest.mark.parametrize("case", ["text in a number column", "no config column", "a short row",
                                  "a steps.csv of no steps"])
def test_a_bad_cells_csv_names_the_line_and_column(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    with open(REFERENCE / "cells.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if case == "text in a number column":
        rows[1]["peak_allocated_bytes"] = "abc"
        said = "line 3: column peak_allocated_bytes: invalid literal for int() with base 10: 'abc'"
    elif case == "no config column":
        rows = [{k: v for k, v in row.items() if k != "config"} for row in rows]
        said = "line 2: no column 'config'"
    path = tmp_path / "cells.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if case == "a short row":
        path.write_text(path.read_text() + "2,a/b\n")
        said = f"line 4: not as many cells as the header has columns ({len(rows[0])})"
    elif case == "a steps.csv of no steps":  # a header alone: no row, yet another kind of CSV
        path.write_text((REFERENCE / "cells" / "0000" / "steps.csv").read_text().splitlines()[0] + "\n")
        said = "not a memprof cells.csv (no column schema_version)"
    capsys.readouterr()
    assert run_cli("compare", str(path), str(REFERENCE)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: {said}"


def test_a_cell_that_crashes_on_both_sides_fails_and_one_that_ooms_on_both_is_unchanged(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The harness failing again is no answer (a cell that always crashes must not pass CI); an OOM is one."""
    lora, qlora = read_records(REFERENCE)
    ends = [replace(lora, status=Status.CRASHED, error="RuntimeError: boom"), replace(qlora, status=Status.OOM)]
    base = write_records(tmp_path / "base", ends, like=REFERENCE)
    current = write_records(tmp_path / "current", ends, like=REFERENCE)
    code, result = compare_json(capsys, str(base), str(current))
    assert code == 1 and result["counts"]["failed"] == 1 and result["counts"]["unchanged"] == 1
    crashed, oom = result["cells"]
    assert (crashed["verdict"], crashed["note"]) == ("failed", "crashed on both sides: RuntimeError: boom")
    assert (oom["verdict"], oom["note"]) == ("unchanged", "oom on both sides")


def test_a_markdown_file_that_cannot_be_made_is_refused_before_the_comparison(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """/proc takes no new file, though it is a folder and root may write anywhere: compare printed "no regression"
    and then exited 2. The probe leaves no file behind where the comparison then fails, and an existing one as it
    was."""
    assert run_cli("compare", str(REFERENCE), str(REFERENCE), "--markdown", "/proc/memprof.md") == 2
    shown = capsys.readouterr()
    assert shown.out == ""
    assert shown.err.strip() == "error: --markdown: /proc/memprof.md: cannot be written: No such file or directory"
    assert run_cli("compare", str(REFERENCE), str(tmp_path / "none"), "--markdown", str(tmp_path / "new.md")) == 2
    kept = tmp_path / "kept.md"
    kept.write_text("before")
    assert run_cli("compare", str(REFERENCE), str(tmp_path / "none"), "--markdown", str(kept)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.md"] and kept.read_text() == "before"


def test_the_verdict_is_shown_before_a_markdown_file_that_cannot_be_written(capsys: pytest.CaptureFixture) -> None:
    """A full disk is found only by the write, after the comparison: its verdict stays shown, and the error says
    that only the summary is missing."""
    assert run_cli("compare", str(REFERENCE), str(REFERENCE), "--markdown", "/dev/full") == 2  # a full disk
    shown = capsys.readouterr()
    assert "2 cells: 2 unchanged → no regression" in shown.out
    assert shown.err.strip() == ("error: --markdown: /dev/full: cannot write: No space left on device (the comparison "
                                 "above is complete; only its Markdown summary is missing)")


def test_a_torn_last_line_is_left_out_and_said_in_one_warning_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A run killed while writing its last record: every reader leaves the line out, says so, and reads the rest."""
    folder = tmp_path / "run"
    shutil.copytree(REFERENCE, folder)
    lines = (folder / "records.jsonl").read_text().splitlines(keepends=True)
    (folder / "records.jsonl").write_text(lines[0] + lines[1][:300])
    warning = f"warning: {folder / 'records.jsonl'}: its last line is torn (a run killed while writing it): left out"
    for argv in (["report", str(folder), "--out", str(tmp_path / "report")], ["levers", str(folder)],
                 ["attribute", str(folder)]):
        capsys.readouterr()
        assert run_cli(*argv) == 0
        shown = capsys.readouterr()
        assert [line for line in shown.err.splitlines() if line.startswith("warning")] == [warning], argv
    assert shown.out.count("adamw") == 1  # the one whole record
    code, result = compare_json(capsys, str(REFERENCE), str(folder))
    assert code == 0 and result["warnings"] == [warning.removeprefix("warning: ")]
    assert [cell["verdict"] for cell in result["cells"]] == ["unchanged", "missing"]
    assert run_cli("compare", str(REFERENCE), str(folder)) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] == [warning]


def test_levers_keys_of_different_lengths_are_cut_to_what_varies_and_each_side_says_what_it_lacks() -> None:
    """The H200's 18 levers cells against the H100's 4 (records committed under results/gpu/): a lever left at its
    default adds no part to a key, so the keys differ in length, and the table shows only the parts not every cell
    shares; a missing cell says which side lacks it; an interrupted cell's note does not say so twice."""
    from rich.console import Console

    from memprof.analysis.compare import compare, load
    from memprof.results.metrics import resolve_rules
    from memprof.views.compare import comparison_table

    gpu = Path(__file__).parents[1] / "results" / "gpu"
    result = compare(load(gpu / "h200-2026-11-27" / "levers-gpu"), load(gpu / "h100-2026-11-28" / "levers-gpu"),
                     resolve_rules([], "t"), allow_different_machines=True)
    for width in (80, 200):
        console = Console(width=width, record=True)
        console.print(comparison_table(result, width))
        lines = console.export_text().splitlines()
        assert " ".join(" ".join(lines[:2]).split()).startswith(  # at 80 columns on two lines
            "memprof compare: cells llama-3.2-1b/lora16/adamw_torch/b1/*/ga1/bf16/lr0.001/constant/seed0/*"), width
        assert any(line.startswith("s4096/gc/flash_attention_2 missing: not in the current run") for line in lines) \
            if width == 80 else any("│ s4096/gc/flash_attention_2 │ missing" in line for line in lines)
    gc = next(cell for cell in result.cells if cell.key.endswith("/s1024/ga1/bf16/lr0.001/constant/seed0/gc"))
    assert gc.note == "ok → interrupted"
