"""Adapters as peft configures them: an adapter table takes any field of peft's LoraConfig, the record carries it,
and the plan's exact parts follow it byte for byte (per-module ranks, modules_to_save, layers_to_transform)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, short_suite

from memprof import suite
from memprof.plan import predict as plan
from memprof.results.record import Status
from memprof.results.store import read_records

ADAPTERS = {
    # the MLP at a higher rank than attention, as people configure it
    "ranks": 'kind = "lora"\nr = 8\ntarget_modules = "all-linear"\nrank_pattern = { "up_proj" = 32, "down_proj" = 32 }\n'
             'alpha_pattern = { "up_proj" = 64 }',
    # a fully trained output head beside the adapter: its copy, gradient and optimizer state
    "head": 'kind = "lora"\nr = 8\nmodules_to_save = ["lm_head"]',
    # only the second decoder layer adapted, attention's query and value
    "layer1": 'kind = "lora"\nr = 16\ntarget_modules = ["q_proj", "v_proj"]\nlayers_to_transform = [1]',
    # target_modules as a regular expression, on a 4-bit base
    "regex": 'kind = "qlora"\nr = 4\ntarget_modules = ".*mlp\\\\.(gate|up)_proj"',
}
EXACT = ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes", "optimizer_state_bytes")


def _suite_text(adapters: dict[str, str], optimizers: str = '["adamw_torch", "adamw_bnb_8bit"]') -> str:
    tables = "".join(f"\n[adapters.{name}]\n{body}\n" for name, body in adapters.items())
    return short_suite("adapters") + f"""
[grid]
model = ["tiny-llama"]
adapter = {list(adapters)!r}
optimizer = {optimizers}
batch_size = [2]
seq_len = [32]
""".replace("'", '"') + tables


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[suite.Suite, dict]:
    tmp = tmp_path_factory.mktemp("adapters")
    path = tmp / "adapters.toml"
    path.write_text(_suite_text(ADAPTERS))
    assert run_cli("run", str(path), "--out", str(tmp / "out")) == 0
    (run_dir,) = (tmp / "out").iterdir()
    return suite.load(str(path)), {r.key: r for r in read_records(run_dir)}


def test_every_adapter_ran_and_its_record_carries_the_peft_fields(measured: tuple) -> None:
    cells, records = measured[0].cells, measured[1]
    assert len(records) == len(cells) == 8 and all(r.status is Status.OK for r in records.values())
    ranks = next(r for r in records.values() if r.config.adapter.name == "ranks")
    assert ranks.config.adapter.lora["rank_pattern"] == {"up_proj": 32, "down_proj": 32}
    assert ranks.config.adapter.lora["alpha_pattern"] == {"up_proj": 64}
    head = next(r for r in records.values() if r.config.adapter.name == "head")
    assert head.config.adapter.lora["modules_to_save"] == ["lm_head"]


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_the_plan_follows_peft_options_byte_for_byte(measured: tuple, adapter: str) -> None:
    cells, records = measured
    for cell in (c for c in cells.cells if c.adapter.name == adapter):
        exact = plan.exact_parts(cell)
        record = records[cell.key]
        assert {f: getattr(exact, f) for f in EXACT} == {f: getattr(record, f) for f in EXACT}, cell.key


def test_the_options_move_the_bytes_they_should(measured: tuple) -> None:
    cells = {c.adapter.name: c for c in measured[0].cells if c.optimizer.label == "adamw_torch"}
    uniform = cells["ranks"].with_values({"adapter.lora": {**cells["ranks"].adapter.lora, "rank_pattern": {}}})
    # up and down at rank 32 instead of 8: 24 more rows/columns of LoRA A and B in each, in both layers
    hidden, intermediate, layers = 256, 688, 2
    extra = layers * 2 * 24 * (hidden + intermediate)
    assert plan.exact_parts(cells["ranks"]).trainable_params - plan.exact_parts(uniform).trainable_params == extra
    # the saved head is a trainable copy of lm_head (256 x 256 here), beside the adapter
    head = plan.exact_parts(cells["head"])
    assert head.trainable_params == plan.exact_parts(cells["head"].with_values(
        {"adapter.lora": {**cells["head"].adapter.lora, "modules_to_save": None}})).trainable_params + 256 * 256
    # one layer's q and v at rank 16: (256 + 256) + (256 + 128) elements of A and B each
    assert plan.exact_parts(cells["layer1"]).trainable_params == 16 * ((256 + 256) + (256 + 128))


def test_a_misspelt_or_mistyped_peft_field_is_one_line_naming_the_key(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    for body, expected in (('kind = "lora"\nrank_patern = { "up_proj" = 32 }',
                            "adapters.bad.rank_patern: not a field of peft's LoraConfig (did you mean "
                            "'rank_pattern'?)"),
                           ('kind = "lora"\nalpha = false', "adapters.bad.alpha: Input should be a valid number")):
        path = tmp_path / "bad.toml"
        path.write_text(_suite_text({"bad": body}, optimizers='["adamw_torch"]'))
        capsys.readouterr()
        assert run_cli("run", str(path), "--out", str(tmp_path / "out")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{path}: {expected}" in err, err
        assert not (tmp_path / "out").exists()
