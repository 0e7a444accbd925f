"""Sharded cells on the CPU (gloo, world size 2): every rank measured, and each rank's exact parts equal to
`memprof plan`'s per-rank prediction byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, short_suite
from memprof.plan import predict as plan
from memprof.train import sharding
from memprof.results.record import Status
from memprof.results.store import read_csv_records, read_records, to_csv
from memprof.suite.load import parse

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# An odd vocabulary (257 rows, 129 + 128 per rank) and an odd MLP width make FSDP2's padding show; 8-bit AdamW
# (32-bit state below 4096 elements, blockwise 8-bit above) makes ZeRO-1's partition of whole tensors matter.
SUITE = short_suite("sharded") + """
[grid]
model = ["odd"]
adapter = ["lora", "none", "qlora"]
optimizer = ["adamw_torch", "adamw_bnb_8bit"]
batch_size = [2]
seq_len = [32]
parallel = [{strategy = "ddp", world_size = 2}, {strategy = "zero1", world_size = 2},
            {strategy = "fsdp2", world_size = 2}]

[[exclude]]
adapter = "qlora"
optimizer = "adamw_bnb_8bit"

[[exclude]]
adapter = "none"
optimizer = "adamw_bnb_8bit"

[[exclude]]  # bitsandbytes' update kernels have no DTensor sharding rule: a crash, measured elsewhere
optimizer = "adamw_bnb_8bit"
parallel = {strategy = "fsdp2", world_size = 2}

[models.odd]
preset = "tiny-llama"
overrides = {vocab_size = 257, intermediate_size = 689}
"""

PARTS = ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes", "optimizer_state_bytes")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    root = tmp_path_factory.mktemp("sharded")
    suite_path = root / "sharded.toml"
    suite_path.write_text(SUITE)
    assert run_cli("run", str(suite_path), "--out", str(root / "out")) == 0
    (run_dir,) = (root / "out").iterdir()
    return parse(SUITE, suite_path).cells, read_records(run_dir)


def test_every_rank_is_measured_and_the_headline_is_the_fullest_rank(sharded: tuple[list, list]) -> None:
    cells, records = sharded
    assert len(records) == len(cells) == 11
    for r in records:
        assert r.status is Status.OK, (r.key, r.error)
        assert r.config.levers.parallel.world_size == 2 and len(r.ranks) == 2
        for name in PARTS + ("activation_bytes", "peak_rss_delta_bytes"):
            assert getattr(r, name) == max(rank[name] for rank in r.ranks), (r.key, name)


def test_per_rank_figures_come_back_from_cells_csv(sharded: tuple[list, list], tmp_path: Path) -> None:
    """`memprof compare` reads a cells.csv as well as records.jsonl: the rank columns round-trip."""
    _, records = sharded
    (tmp_path / "cells.csv").write_text(to_csv([r.to_row() for r in records]))
    assert [r.ranks for r in read_csv_records(tmp_path / "cells.csv")] == [r.ranks for r in records]


def test_zero1_and_fsdp2_state_per_rank_equals_the_plan_exactly(sharded: tuple[list, list]) -> None:
    cells, records = sharded
    by_key = {r.key: r for r in records}
    for cell in cells:
        predicted = plan.exact_parts(cell).ranks
        measured = by_key[cell.key].ranks
        for name in PARTS:
            assert [getattr(rank, name) for rank in predicted] == [rank[name] for rank in measured], \
                (cell.key, name)


def test_what_each_strategy_divides(sharded: tuple[list, list]) -> None:
    """The measurements themselves: ddp replicates, zero1 splits the state unevenly by whole tensors (never
    more than the largest tensor's state apart), fsdp2 splits weights, gradients and state by rows."""
    _, records = sharded
    runs = {(r.config.adapter.name, r.config.optimizer.label, r.config.levers.parallel.strategy): r for r in records}
    for (adapter, optimizer, strategy), r in runs.items():
        ddp = runs[(adapter, optimizer, "ddp")]
        state = [rank["optimizer_state_bytes"] for rank in r.ranks]
        if strategy == "ddp":
            assert state[0] == state[1]
        elif strategy == "zero1":
            assert sum(state) >= ddp.optimizer_state_bytes and max(state) < ddp.optimizer_state_bytes
            assert r.trainable_weight_bytes == ddp.trainable_weight_bytes
        else:
            assert max(state) < ddp.optimizer_state_bytes
            assert r.trainable_weight_bytes < ddp.trainable_weight_bytes
    full, ddp = runs[("none", "adamw_torch", "fsdp2")], runs[("none", "adamw_torch", "ddp")]
    # the 257-row embedding and head: both ranks' weight storage is padded to 129 rows, the state is not
    assert full.ranks[0]["trainable_weight_bytes"] == full.ranks[1]["trainable_weight_bytes"]
    assert 2 * full.ranks[0]["trainable_weight_bytes"] > ddp.trainable_weight_bytes
    assert full.ranks[0]["optimizer_state_bytes"] > full.ranks[1]["optimizer_state_bytes"]


def test_every_rank_saves_the_activations_an_unsharded_step_saves(sharded: tuple[list, list]) -> None:
    """Sharding splits weights, gradients and state, never a rank's activations: each rank's saved bytes are those
    of the ddp cell, whose ranks each run the whole model. FSDP2 frees a layer's gathered weights after its
    forward while autograd still holds them, and malloc hands their addresses to the next activations: those
    count too (they were missed, and each rank missed different ones)."""
    _, records = sharded
    runs = {(r.config.adapter.name, r.config.optimizer.label, r.config.levers.parallel.strategy): r for r in records}
    for (adapter, optimizer, strategy), r in runs.items():
        ddp = runs[(adapter, optimizer, "ddp")]
        assert [rank["activation_bytes"] for rank in r.ranks] == [ddp.activation_bytes] * 2, (r.key, strategy)


def test_partition_rules() -> None:
    assert sharding.local_shapes((257, 4), 2) == [(129, 4), (128, 4)]
    assert sharding.local_shapes((1, 4), 2) == [(1, 4), (0, 4)]
    assert sharding.padded_shard_numel((257, 4), 2) == 129 * 4
    # largest first, each to the rank with the fewest elements so far, sizes carried across groups
    assert sharding.zero1_partition([[10, 30, 20], [5]], 2) == [[[1], [0]], [[2, 0], []]]


def test_plan_per_rank_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert run_cli("plan", "--model", "llama-3.1-8b", "--adapter", "none", "--optimizer", "adamw_torch",
                   "--world-size", "8", "--strategy", "fsdp2", "--json") == 0
    (sharded_plan,) = json.loads(capsys.readouterr().out)
    assert run_cli("plan", "--model", "llama-3.1-8b", "--adapter", "none", "--optimizer", "adamw_torch",
                   "--json") == 0
    (single,) = json.loads(capsys.readouterr().out)
    state = [rank["optimizer_state_bytes"] for rank in sharded_plan["ranks"]]
    assert len(state) == 8
    assert max(state) < single["parts"]["optimizer_state"]["bytes"] / 7.9
    assert sharded_plan["parts"]["gathered_weights"]["bytes"] > 0


def test_a_rank_killed_mid_cell_crashes_that_cell_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other rank would wait in its next collective until the timeout: the launcher stops it at once."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the zygote imports tests/faulty.py
    path = tmp_path / "kill.toml"
    path.write_text(short_suite("kill") + """
[grid]
model = ["tiny-llama"]
optimizer = ["kill_rank_one", "adamw_torch"]
batch_size = [2]
seq_len = [32]
parallel = {strategy = "ddp", world_size = 2}

[optimizers.kill_rank_one]
optim = "faulty:KillRankOne"
""")
    assert run_cli("run", str(path), "--out", str(tmp_path / "out")) == 3  # a crashed cell: the exit code says so
    (run_dir,) = (tmp_path / "out").iterdir()
    killed, ok = read_records(run_dir)
    assert killed.status is Status.CRASHED and "rank 1 killed by signal SIGKILL" in killed.error
    assert killed.cell_wall_s is None or killed.cell_wall_s < 60
    assert killed.harness_wall_s < 60
    assert ok.status is Status.OK and len(ok.ranks) == 2


def test_sharding_needs_a_strategy(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SUITE.replace('{strategy = "ddp", world_size = 2}', '{world_size = 2}'))
    from memprof.errors import UserError

    with pytest.raises(UserError, match=r"grid.parallel\[0\]: world_size > 1 needs a strategy"):
        parse(path.read_text(), path)
