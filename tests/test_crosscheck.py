"""memprof's exact accounting against PyTorch's own memory profiler, on tiny real LoRA cells."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, write_suite

from memprof.measure.crosscheck import CategoryCheck, crosscheck, exit_code

# Rank 16 on the attention projections of tiny-llama (hidden 256, k/v width 128, 2 layers): q and o have
# A 16x256 + B 256x16, k and v have A 16x256 + B 128x16. Rank 16 brings the 4096-element matrices to
# bitsandbytes' threshold for 8-bit state, so the 8-bit optimizer keeps both 8-bit and 32-bit state.
LORA_PARAMS = 2 * (2 * (16 * 256 + 256 * 16) + 2 * (16 * 256 + 128 * 16))
LORA_TENSORS = 2 * 4 * 2
ADAPTER = '[adapters.r16]\nkind = "lora"\nr = 16\n'
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "adafactor")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def suite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    optimizers = "[" + ", ".join(f'"{name}"' for name in OPTIMIZERS) + "]"
    return write_suite(tmp_path_factory.mktemp("xc"), name="xc", steps=2, adapters='["r16"]',
                       optimizers=optimizers, extra=ADAPTER)


def _rows(suite_path: Path, optimizer: str) -> dict[str, CategoryCheck]:
    from memprof import suite

    cell = suite.load(str(suite_path)).cells[OPTIMIZERS.index(optimizer)]
    assert cell.optimizer.label == optimizer
    return {row.category: row for row in crosscheck(cell)}


def test_adamw_torch_agrees_exactly_through_the_cli(suite_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("crosscheck", str(suite_path), "--cell", "0") == 0
    lines = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    state = 2 * 4 * LORA_PARAMS + 4 * LORA_TENSORS  # exp_avg and exp_avg_sq in fp32, a 4-byte step per tensor
    assert lines["optimizer state"].count(f"{state:,}") == 2 and "exact" in lines["optimizer state"]
    assert lines["gradients"].count(f"{4 * LORA_PARAMS:,}") == 2 and "exact" in lines["gradients"]


def test_bnb_8bit_agrees_exactly_with_shared_qmaps_counted_once(suite_path: Path) -> None:
    rows = _rows(suite_path, "adamw_bnb_8bit")
    # per layer: six 4096-element matrices in 8 bits (two uint8 states + two absmax per 256-block) and the two
    # 2048-element k/v B matrices in 32 bits; the two 256-entry float32 quantisation maps once for all
    per_layer = 6 * (2 * 4096 + 2 * 4 * 4096 // 256) + 2 * (2 * 4 * 2048)
    state = rows["optimizer state"]
    assert state.memprof_bytes == state.profiler_bytes == 2 * per_layer + 2 * 256 * 4
    assert state.unseen_bytes == 0 and state.agrees
    grads = rows["gradients"]
    assert grads.memprof_bytes == grads.profiler_bytes == 4 * LORA_PARAMS


def test_adafactor_agrees_once_its_replaced_rms_scalars_are_set_aside(suite_path: Path) -> None:
    rows = _rows(suite_path, "adafactor")
    state = rows["optimizer state"]
    # Adafactor replaces each matrix's 4-byte RMS tensor every step; the profiler recorded only step 1's
    assert state.unseen_bytes == 4 * LORA_TENSORS
    assert state.profiler_bytes == state.memprof_bytes - 4 * LORA_TENSORS
    assert state.agrees and state.verdict != "exact"
    assert rows["gradients"].memprof_bytes == rows["gradients"].profiler_bytes == 4 * LORA_PARAMS
    assert rows["weights"].diff_bytes == 0  # no quantised weights: the profiler sees every parameter
    assert exit_code(list(rows.values())) == 0


def test_gradients_agree_exactly_under_gradient_checkpointing(tmp_path: Path) -> None:
    """Under an adapter, transformers makes the embeddings' output require grad for checkpointing: a leaf whose
    gradient is no parameter's. The loop keeps no graph past its backward, so neither that leaf nor its gradient
    is alive at the optimizer step (they were: 2 x 32 tokens x 256 x 4 bytes more than the parameters' gradients)."""
    from memprof import suite

    path = write_suite(tmp_path, name="xc-ckpt", steps=2, adapters='["r16"]',
                       extra='gradient_checkpointing = ["on"]\n' + ADAPTER)
    (cell,) = suite.load(str(path)).cells
    rows = {row.category: row for row in crosscheck(cell)}
    assert rows["gradients"].memprof_bytes == rows["gradients"].profiler_bytes == 4 * LORA_PARAMS
    assert exit_code(list(rows.values())) == 0


def test_disagreement_exits_1_and_information_rows_never_do() -> None:
    assert exit_code([CategoryCheck("gradients", 10, 12, required=True)]) == 1
    assert exit_code([CategoryCheck("optimizer state", 10, 14, required=True, unseen_bytes=4)]) == 0
    assert exit_code([CategoryCheck("activations", 10, 12, required=False)]) == 0


def test_a_cell_index_out_of_range_is_a_user_error(suite_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("crosscheck", str(suite_path), "--cell", "3") == 2
    err = capsys.readouterr().err
    assert "--cell" in err and "0..2" in err and "Traceback" not in err
