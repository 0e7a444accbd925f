"""Gradient checkpointing, the attention kernel and context length, measured on real runs, and `memprof plan`
following each of them."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli, short_suite
from memprof.measure import meta_step
from memprof.plan import calibration, predict as plan
from memprof.results.record import Record, Status
from memprof.results.store import read_records
from memprof.views.tables import levers_markdown, markdown_cell
from memprof.analysis.slopes import activation_slopes
from memprof.suite.load import parse

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# LoRA as the shipped calibration fitted it (r16 on every linear layer) and a full fine-tune; three lengths;
# checkpointing off, on (non-reentrant) and reentrant; sdpa and eager.
SUITE = short_suite("levers-check") + """
[grid]
model = ["tiny-llama"]
adapter = ["lora16", "none"]
optimizer = ["adamw_torch"]
batch_size = [2]
seq_len = [64, 128, 256]
gradient_checkpointing = ["off", "on", "reentrant"]
attn_implementation = ["sdpa", "eager"]

[[exclude]]
attn_implementation = "eager"
gradient_checkpointing = "reentrant"

[adapters.lora16]
kind = "lora"
r = 16
alpha = 32
target_modules = "all-linear"
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict[str, Record]]:
    root = tmp_path_factory.mktemp("levers")
    path = root / "levers.toml"
    path.write_text(SUITE)
    assert run_cli("run", str(path), "--out", str(root / "out")) == 0
    (run_dir,) = (root / "out").iterdir()
    records = read_records(run_dir)
    assert all(r.status is Status.OK for r in records), [(r.key, r.error) for r in records]
    return parse(SUITE, path).cells, {r.key: r for r in records}


def _find(records: dict[str, Record], **want: object) -> Record:
    (match,) = [r for r in records.values() if all(r.config.axis_values()[k] == v for k, v in want.items())]
    return match


@pytest.mark.parametrize("adapter", ["lora16", "none"])
def test_checkpointing_lowers_saved_activations_and_trains_the_same(runs: tuple, adapter: str) -> None:
    _, records = runs
    for seq in (64, 128, 256):
        off = _find(records, adapter=adapter, seq_len=seq, attn_implementation="sdpa", gradient_checkpointing="off")
        for mode in ("on", "reentrant"):
            on = _find(records, adapter=adapter, seq_len=seq, attn_implementation="sdpa", gradient_checkpointing=mode)
            assert on.activation_bytes < off.activation_bytes / 4, (seq, mode)
            # the same gradients reach the same parameters (reentrant checkpointing under a peft adapter needs
            # the input-grad hook, or the adapter gets none), and the loss is the same computation
            assert on.gradient_bytes == off.gradient_bytes > 0
            assert on.optimizer_state_bytes == off.optimizer_state_bytes
            assert on.final_loss == pytest.approx(off.final_loss, rel=1e-4)
        reentrant = _find(records, adapter=adapter, seq_len=seq, attn_implementation="sdpa",
                          gradient_checkpointing="reentrant")
        on = _find(records, adapter=adapter, seq_len=seq, attn_implementation="sdpa", gradient_checkpointing="on")
        assert reentrant.activation_bytes == on.activation_bytes  # both keep each layer's input, nothing else


def test_sdpa_activations_grow_linearly_with_context_and_eager_ones_do_not(runs: tuple) -> None:
    _, records = runs
    slopes = {s.group: s for s in activation_slopes(records.values())}
    assert len(slopes) == 10  # 2 adapters x (3 sdpa + 2 eager) lever settings
    for group, slope in slopes.items():
        if "eager" in group:
            assert slope.max_residual > 0.02, group  # the seq x seq matrices bend the line
        else:
            assert slope.max_residual < 0.01, group  # the stated tolerance: 1% at every length
            assert slope.bytes_per_token > 0
    for adapter in ("lora16", "none"):
        eager = [_find(records, adapter=adapter, seq_len=s, attn_implementation="eager",
                       gradient_checkpointing="off").activation_bytes for s in (64, 128, 256)]
        assert eager[2] - eager[1] > 2 * (eager[1] - eager[0])  # convex: grows faster than the context


def test_plan_follows_checkpointing_attention_and_context(runs: tuple) -> None:
    """Without the analytic plan (no device calibration) the plan runs the step on the meta device, whose forward
    saves what every run's did, byte for byte. The coefficients fitted to CPU runs (sdpa, with and without
    checkpointing) and eager attention's derived seq x seq term, the last resort: within 5% for sdpa, 10% for
    eager."""
    cells, records = runs
    shipped = calibration.load()
    fallback = replace(shipped, devices={})
    for cell, predicted in zip(cells, plan.plan_requests(cells, fallback, "cpu")):
        measured = records[cell.key].activation_bytes
        assert predicted.moment and "temporaries" not in {p.name for p in predicted.parts}  # not fitted
        assert meta_step.step_peak(cell, "cpu").saved == measured, cell.key
        fitted, _, _ = plan.fitted_activations(cell, plan.exact_parts(cell), shipped)
        tolerance = 0.10 if cell.levers.attn_implementation == "eager" else 0.05
        assert fitted == pytest.approx(measured, rel=tolerance), cell.key


def test_a_kernel_the_architecture_lacks_is_unavailable_and_the_suite_goes_on(tmp_path: Path) -> None:
    """Gemma2 has no sdpa path in transformers: that cell is "unavailable" (a result, exit 0), its eager one trains."""
    path = tmp_path / "gemma2.toml"
    path.write_text(short_suite("gemma2-attn") + """
[grid]
model = ["gemma2"]
adapter = ["lora"]
optimizer = ["adamw_torch"]
batch_size = [1]
seq_len = [32]
attn_implementation = ["sdpa", "eager"]

[models.gemma2]
config = { model_type = "gemma2", vocab_size = 256, hidden_size = 64, intermediate_size = 128, num_hidden_layers = 1, \
num_attention_heads = 2, num_key_value_heads = 1, head_dim = 32 }
""")
    assert run_cli("run", str(path), "--out", str(tmp_path / "out")) == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    status = {r.config.levers.attn_implementation: r for r in read_records(run_dir)}
    assert status["eager"].status is Status.OK, status["eager"].error
    assert status["sdpa"].status is Status.UNAVAILABLE
    assert "Gemma2ForCausalLM does not support" in status["sdpa"].error and "eager does" in status["sdpa"].error
    # it never trained: no peak, no parts of one
    unavailable = status["sdpa"]
    assert unavailable.peak_rss_delta_bytes is None and unavailable.peak_bytes is None and not unavailable.breakdown
    table = levers_markdown(read_records(run_dir))
    rows = [line for line in table.splitlines() if line.startswith("| gemma2")]
    cells = [len(re.findall(r"(?<!\\)\|", row)) for row in rows]
    assert len(rows) == 2 and cells[0] == cells[1]
    assert rows[0].endswith("| – | – | – | – | – | unavailable (1) |")  # sdpa's: no figure, and a note says why
    assert f"\n\n(1) unavailable: {markdown_cell(unavailable.error)}" in table  # the whole cause, its pipes escaped
    assert markdown_cell("shape [2 | 3]\n  mismatch") == "shape [2 \\| 3] mismatch"  # one cell, however it reads
