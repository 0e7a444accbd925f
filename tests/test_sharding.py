"""Sharded cells on the CPU (gloo, world size 2): every rank measured, and each rank's exact parts equal to
`memprof plan`'s per-rank prediction byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import run_cli, short_suite
from memprof.measure import step_memory
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
        assert sum(r.breakdown.values()) == r.peak_rss_delta_bytes, r.key  # the parts of the headline's peak


def test_a_cuda_cells_peak_figures_are_the_fullest_ranks_and_its_host_figures_the_rank_whose_rss_rose_most(
        tmp_path: Path) -> None:
    """On CUDA the allocator's peak and host RSS's rise can top out on different ranks: each set of figures comes
    whole from one rank, so the parts sum to the headline and the RSS peak less its baseline is the RSS rise."""
    from dataclasses import replace

    from memprof.results.record import CellResult, Record
    from memprof.run.ranks import merge

    cell = parse(SUITE, tmp_path / "sharded.toml").cells[0]
    mib = 1 << 20
    fuller = Record(cell, peak_allocated_bytes=300 * mib, breakdown={"frozen_weights": 200 * mib, "other": 100 * mib},
                    peak_rss_delta_bytes=40 * mib, rss_baseline_bytes=900 * mib, peak_rss_bytes=940 * mib)
    busier_host = replace(fuller, peak_allocated_bytes=250 * mib, breakdown={"frozen_weights": 250 * mib},
                          peak_rss_delta_bytes=70 * mib, rss_baseline_bytes=1000 * mib, peak_rss_bytes=1070 * mib)
    for order in ((fuller, busier_host), (busier_host, fuller)):
        merged = merge(cell, {rank: CellResult(r) for rank, r in enumerate(order)}, {0: 0, 1: 0}).record
        assert merged.peak_bytes == 300 * mib == sum(merged.breakdown.values())
        assert merged.peak_rss_delta_bytes == 70 * mib == merged.peak_rss_bytes - merged.rss_baseline_bytes


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


def test_an_fsdp2_rank_names_its_all_gathered_weights_as_the_plan_derives_them(sharded: tuple[list, list]) -> None:
    """The breakdown of an fsdp2 cell's peak (in backward here) holds the all-gathered weights FSDP2 keeps at that
    moment, as the plan derives them from the meta model, to the byte; ddp and zero1 cells hold no such part."""
    cells, records = sharded
    by_key = {r.key: r for r in records}
    for cell in cells:
        r = by_key[cell.key]
        if cell.levers.parallel.strategy != "fsdp2":
            assert "gathered_weights" not in r.breakdown, r.key
            continue
        gathered = plan.exact_parts(cell).gathered
        assert step_memory.phase(r.peak_moment) == "backward" and gathered.root > 0, r.key
        at_peak = step_memory.with_gathered({r.peak_moment: {}}, gathered)[r.peak_moment]["gathered_weights"]
        assert r.breakdown["gathered_weights"] == at_peak >= gathered.root + min(gathered.layers), r.key


def _unsharded_bytes(module: torch.nn.Module) -> int:
    """The bytes of an FSDP2 unit's own unsharded parameters that are allocated now (FSDP2 frees them by resizing
    their storage to nothing)."""
    group = module._get_fsdp_state()._fsdp_param_group
    return sum(p._unsharded_param.untyped_storage().nbytes() for p in group.fsdp_params
               if hasattr(p, "_unsharded_param"))


def _fsdp2_rank(rank: int, rendezvous: str, out: str) -> None:
    """One of two gloo ranks training tiny-llama's LoRA under memprof's FSDP2 wrapping for two steps, then
    evaluating; rank 0 writes to ``out`` (JSON) what ``sharding.gathered`` says of the model, and the unsharded
    bytes of the root unit and of each layer at each layer's forward and backward start, after the forward (the
    loss forward), at the logits' gradient (the loss backward), at the end of backward, after the optimizer step and
    after an eval forward."""
    import json

    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from memprof.config.presets import PRESETS

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**PRESETS["tiny-llama"])),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = sharding.decoder_layers(model)
    gathered = sharding.gathered(model)
    model, _ = sharding.shard(model, "fsdp2", torch.device("cpu"))
    units = {"root": model, **{f"layer {i}": layer for i, layer in enumerate(layers)}}
    seen: list[tuple[str, dict[str, int]]] = []

    def note(moment: str) -> None:
        seen.append((moment, {name: _unsharded_bytes(unit) for name, unit in units.items()}))

    def on_output(i: int, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: note(f"layer {i} backward"))

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: note(f"layer {i} forward"))
        layer.register_forward_hook(lambda module, args, output, i=i: on_output(i, output))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (2, 32))
    for _ in range(2):
        seen.clear()
        output = model(input_ids=ids, labels=ids)
        note("loss forward")
        output.logits.register_hook(lambda grad: note("loss backward"))
        output.loss.backward()
        note("backward end")
        optimizer.step()
        note("optimizer step")
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    note("eval")
    if rank == 0:
        Path(out).write_text(json.dumps({"root": gathered.root, "layers": gathered.layers, "seen": seen}))
    dist.destroy_process_group()


def test_fsdp2_holds_the_root_unit_through_the_step_and_one_layer_at_a_time(tmp_path: Path) -> None:
    """What ``sharding.gathered`` and ``step_memory.with_gathered`` assume of FSDP2, watched in a real two-rank step
    on gloo: the root unit's weights are unsharded from the first layer's forward to the last layer's backward and
    after an eval, each layer's while it works, none at the end of backward nor after the optimizer step; at no
    moment more than ``with_gathered`` places there. The derivation's extra layer (at the loss's backward, and inside
    a layer: the next one's all-gather, issued ahead) is a buffer no parameter shows."""
    import json

    import torch.multiprocessing as mp

    out = tmp_path / "seen.json"
    mp.spawn(_fsdp2_rank, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    found = json.loads(out.read_text())
    full = {"root": found["root"], **{f"layer {i}": nbytes for i, nbytes in enumerate(found["layers"])}}
    seen = dict(found["seen"])
    layers = [name for name in full if name != "root"]
    assert list(seen) == [f"{name} forward" for name in layers] + ["loss forward", "loss backward"] \
        + [f"{name} backward" for name in reversed(layers)] + ["backward end", "optimizer step", "eval"]
    placed = step_memory.with_gathered(dict.fromkeys(step_memory.PHASES, {}),
                                       sharding.Gathered(found["root"], tuple(found["layers"])))
    for moment, alive in seen.items():
        at_work = moment.rsplit(" ", 1)[0] if moment.startswith("layer") else None
        held = ("root", at_work) if moment not in ("backward end", "optimizer step") else ()
        assert alive == {name: full[name] if name in held else 0 for name in full}, moment
        derived = placed["MLP backward" if at_work else moment].get("gathered_weights", 0)
        assert sum(alive.values()) <= derived, moment
        if not at_work and moment != "loss backward":
            assert sum(alive.values()) == derived, moment  # root alone, or nothing


def test_partition_rules() -> None:
    assert sharding.local_shapes((257, 4), 2) == [(129, 4), (128, 4)]
    assert sharding.local_shapes((1, 4), 2) == [(1, 4), (0, 4)]
    assert sharding.padded_shard_numel((257, 4), 2) == 129 * 4
    # largest first, each to the rank with the fewest elements so far, sizes carried across groups
    assert sharding.zero1_partition([[10, 30, 20], [5]], 2) == [[[1], [0]], [[2, 0], []]]
    # FSDP2's gathered weights: the root unit's and the largest layers', a one-layer model's layer once
    assert sharding.Gathered(10, (3, 5, 4)).with_layers(2) == 19 and sharding.Gathered(7, (2,)).with_layers(2) == 9


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


def test_more_ranks_than_the_machine_has_cores_is_unavailable_before_any_fork(tmp_path: Path) -> None:
    """Each rank is a process: a world size past the cores (the GPUs on CUDA) is that cell's 'unavailable' result,
    where 100000 ranks forked until the host ran out of memory."""
    import os

    from memprof.run.ranks import run_ranks

    cores = len(os.sched_getaffinity(0))
    text = SUITE.replace("parallel = [", f'parallel = [{{strategy = "ddp", world_size = {cores + 1}}}, ')
    cell = next(c for c in parse(text, tmp_path / "s.toml").cells if c.levers.parallel.world_size == cores + 1)
    record = run_ranks(cell, None).record
    assert record.status is Status.UNAVAILABLE
    assert record.error == (f"ddp×{cores + 1} needs {cores + 1} ranks, one per device: this machine has {cores} "
                            "CPU cores")


def test_sharding_needs_a_strategy(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SUITE.replace('{strategy = "ddp", world_size = 2}', '{world_size = 2}'))
    from memprof.errors import UserError

    with pytest.raises(UserError, match=r"grid.parallel\[0\]: world_size > 1 needs a strategy"):
        parse(path.read_text(), path)
