"""The peak named part by part: on the shipped H200 records every byte of the allocator peak but a small remainder
is named (the loss's fp32 logits gradients, the recomputed layer), and `memprof attribute` re-reads old folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from memprof.measure import step_memory
from memprof.measure.attribution import PARTS, attribute_run
from memprof.results.record import SCHEMA_VERSION, Status
from memprof.results.store import read_records

H200 = Path(__file__).parent.parent / "results" / "gpu" / "h200-2026-11-27"
VOCAB = 128256  # Llama 3's


@pytest.fixture(scope="module")
def attributed() -> list:
    return [r for run in ("reference", "levers-gpu") for r in attribute_run(H200 / run) if r.status is Status.OK]


def test_every_h200_peak_is_named_but_for_a_remainder_within_2_percent(attributed: list) -> None:
    assert len(attributed) == 21
    for r in attributed:
        assert set(r.breakdown) <= set(PARTS) and sum(r.breakdown.values()) == r.peak_allocated_bytes
        assert abs(r.breakdown["other"]) <= 0.02 * r.peak_allocated_bytes, (r.key, r.breakdown["other"])
    worst = max(abs(r.breakdown["other"]) / r.peak_allocated_bytes for r in attributed)
    print(f"largest unnamed remainder: {worst:.3%} of the peak")  # 0.103% when measured


def test_the_loss_logits_are_named_and_the_recomputed_layer_where_it_peaks(attributed: list) -> None:
    for r in attributed:
        tokens = r.config.shape.tokens
        if "loss" in r.peak_moment:
            # nll's and log_softmax's fp32 gradients, T x V x 4 each; last step's gradients are freed (set_to_none)
            assert r.breakdown["loss_logits"] == 2 * tokens * VOCAB * 4 and "gradients" not in r.breakdown
        else:  # 4,096 tokens, checkpointing, eager attention: the first recomputed layer's attention backward
            assert r.config.levers.attn_implementation == "eager" and r.config.shape.seq_len == 4096
            assert r.config.levers.gradient_checkpointing == "on" and r.breakdown["layer"] > 8e9
    qlora = next(r for r in attributed if r.config.adapter.kind == "qlora")
    assert qlora.breakdown["kbit_fp32_weights"] == 128256 * 2048 * 4 + 4 * 2048 * 33  # embedding, 33 norms, fp32


def test_the_70b_qlora_peak_is_layer_0s_recomputed_mlp_with_every_other_layers_gradients() -> None:
    """The H100's 70B QLoRA r64 cell (checkpointing): 3.3 GB of LoRA gradients outweigh the layer inputs they replace,
    so the peak is the last layer backward reaches, not the first; named as that, 0.2% of it is left unnamed (1.2 GB,
    2.3%, as the end of backward)."""
    (r,) = attribute_run(H200.parent / "h100-2026-11-28" / "qlora-70b")
    assert r.peak_moment == "layer 0 recomputed MLP backward"
    layers = step_memory.step_shape(r.config, "cuda").layers
    assert layers == 80 and r.breakdown["gradients"] == r.gradient_bytes * (layers - 1) // layers
    assert abs(r.breakdown["other"]) <= 0.005 * r.peak_allocated_bytes, r.breakdown


def test_memprof_attribute_prints_and_rewrites_an_old_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_cli("attribute", str(H200 / "reference"), "--markdown", "--out", str(tmp_path / "again")) == 0
    shown = capsys.readouterr().out
    assert shown.count("\n") >= 11 and "loss" in shown
    again = read_records(tmp_path / "again")
    assert {r.schema_version for r in again} == {SCHEMA_VERSION} and len(again) == 10
    assert all(r.breakdown for r in again if r.status is Status.OK)
    assert (tmp_path / "again" / "cells" / "0000" / "timeline.csv").exists()


@pytest.mark.parametrize("markdown", [False, True], ids=["table", "markdown"])
def test_memprof_attribute_of_a_run_with_no_peak_lists_its_cells_and_their_status(
        tmp_path: Path, capsys: pytest.CaptureFixture, markdown: bool) -> None:
    """A failed run is a result too: its cells and how each ended, exit 0 (no ``max()`` of no peaks)."""
    folder = tmp_path / "failed"
    shutil.copytree(H200 / "levers-gpu", folder)
    lines = (folder / "records.jsonl").read_text().splitlines(keepends=True)
    failed = [line for line in lines if json.loads(line)["status"] != Status.OK.value]
    (folder / "records.jsonl").write_text("".join(failed))
    assert len(failed) == 6 and run_cli("attribute", str(folder), *(["--markdown"] if markdown else [])) == 0
    shown = capsys.readouterr().out
    assert shown.count("unavailable") == 6 and shown.count("adamw_torch") == 6


def test_the_paged_part_of_the_state_is_the_tensors_that_reach_bitsandbytes_threshold() -> None:
    """On the H200, paged_adamw_8bit paged 12,582,912 of its 22,898,688 state bytes and paged_adamw_32bit
    50,331,648: the 8-bit and 32-bit state buffers of the LoRA matrices of at least 100,000 elements."""
    from memprof.measure.formulas import predict_paged_bytes
    from memprof.suite.restore import with_suite_configs
    from memprof.train.meta import meta_model

    records = with_suite_configs(read_records(H200 / "reference"), H200 / "reference")
    for r in records:
        if r.status is not Status.OK or r.config.adapter.kind != "lora":
            continue
        c = r.config
        params = [p for p in meta_model(c.model, c.adapter, c.shape.precision).parameters() if p.requires_grad]
        assert predict_paged_bytes(c.optimizer.name, params, c.optimizer.kwargs) == r.optimizer_state_paged_bytes, \
            c.optimizer.label
    assert {r.config.optimizer.label: r.optimizer_state_paged_bytes for r in records if r.optimizer_state_paged_bytes} \
        == {"paged_adamw_8bit": 12_582_912, "paged_adamw_32bit": 50_331_648}


@pytest.mark.parametrize("width", [100, 300])
def test_the_breakdown_table_names_every_cell_whole_and_drops_columns_not_names(attributed: list, width: int) -> None:
    from rich.console import Console

    from memprof.views.tables import breakdown_table

    console = Console(width=width, record=True)
    console.print(breakdown_table(attributed, "parts", width))
    text = console.export_text()
    assert all(r.config.optimizer.label in text for r in attributed)  # never cut, never folded
    assert "…" not in text
    assert ("not shown at 100 columns" in text) == (width == 100) and ("loss backward" in text) == (width == 300)


def test_a_narrow_terminal_leaves_out_the_smallest_parts_not_the_largest() -> None:
    """On the CPU the free heap and the remainder are often most of the peak: the committed levers run at 120
    columns shows the largest parts and leaves out the smallest, where it once left out the remainder."""
    from rich.console import Console

    from memprof.views.tables import breakdown_table

    records = read_records(H200.parents[1] / "levers-cpu")
    console = Console(width=120, record=True)
    console.print(breakdown_table(records, "parts", 120))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "peak MiB" in line)
    shown = [title.strip() for title in header.split("┃") if title.strip()]
    parts = shown[shown.index("peak MiB") + 1:]
    most = {PARTS[name].short: max(abs(r.breakdown.get(name, 0)) for r in records) for name in PARTS}
    largest = sorted(most, key=most.__getitem__, reverse=True)  # by the most bytes a part has in any cell
    assert parts == largest[:len(parts)] and {"heap free", "other"} <= set(parts)
    left_out = text.split("not shown at 120 columns: ")[1].split(" (")[0].split(", ")
    assert left_out[-1] == "at" and set(left_out[:-1]) <= set(largest[len(parts):])


def test_a_negative_cpu_remainder_says_which_bytes_are_counted_twice() -> None:
    """A free heap that holds bytes the moment counts alive (an older memprof read it at the RSS high, late in a
    backward) leaves a negative remainder, and the table says why."""
    from dataclasses import replace

    from rich.console import Console

    from memprof.measure.attribution import attribute
    from memprof.views.tables import breakdown_table

    record = read_records(H200.parents[1] / "levers-cpu")[0]
    counted_twice = replace(record, heap_free_delta_bytes=record.peak_rss_delta_bytes // 2 + record.activation_bytes)
    again = attribute(counted_twice)
    assert again.breakdown["other"] < 0 and sum(again.breakdown.values()) == record.peak_rss_delta_bytes
    console = Console(width=200, record=True)
    console.print(breakdown_table([again], "parts", 200))
    assert "a negative other: the free heap holds bytes a part counts as alive" in " ".join(
        console.export_text().split())
    console = Console(width=200, record=True)
    console.print(breakdown_table([attribute(record)], "parts", 200))
    assert "a negative other" not in console.export_text()