"""The optimizer catalogue: in step with transformers, with the formulas, and with what suites accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_suite
from transformers.training_args import OptimizerNames

from memprof.config.catalogue import CATALOGUE, ENTRIES, NOT_SUPPORTED
from memprof.measure.formulas import FORMULAS, predict_state_bytes


def test_every_transformers_name_is_catalogued_or_left_out_on_purpose() -> None:
    names = {member.value for member in OptimizerNames}
    assert not names - CATALOGUE.keys() - NOT_SUPPORTED.keys()
    assert not CATALOGUE.keys() & NOT_SUPPORTED.keys()
    built_by_transformers = {e.name for e in ENTRIES if e.factory == "transformers"}
    assert built_by_transformers <= names  # no stale names that transformers would refuse
    assert len(ENTRIES) == len(CATALOGUE)  # no duplicate names


def test_every_entry_has_a_formula_or_says_why_not() -> None:
    assert FORMULAS.keys() == CATALOGUE.keys()
    for name, formula in FORMULAS.items():
        assert (formula.predict is None) == bool(formula.reason), name


def test_bytes_per_param_column_agrees_with_the_formulas() -> None:
    """The catalogue's summary figure is the exact formula's bytes per element of one large fp32 matrix."""
    side = 4096
    for e in ENTRIES:
        exact = predict_state_bytes(e.name, [((side, side), torch.float32)])
        if e.bytes_per_param is None or exact is None:
            continue
        assert exact / side**2 == pytest.approx(e.bytes_per_param, abs=1e-3), e.name


def test_unknown_optimizer_in_a_suite_fails_before_anything_runs(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path, optimizers='["adamw_torch", "adamw_bnb_8bt"]')
    out = tmp_path / "results"
    assert run_cli("run", str(suite), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "grid.optimizer[1]: unknown optimizer 'adamw_bnb_8bt' (did you mean 'adamw_bnb_8bit'?)" in err
    assert str(suite) in err and "Traceback" not in err
    assert not out.exists()


def test_optimizer_left_out_on_purpose_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path, optimizers='["lomo"]')
    assert run_cli("run", str(suite), "--dry-run") == 2
    assert "optimizer 'lomo' is not supported: fuses the update into backward" in capsys.readouterr().err


def test_optimizers_command_lists_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("optimizers") == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CATALOGUE)
    assert "CUDA only" in listing  # galore_adamw_8bit


@pytest.mark.parametrize("none_installed", [False, True])  # as this venv has them, and with every library missing
@pytest.mark.parametrize("width", [80, 120])
def test_optimizers_command_keeps_names_and_install_commands_whole(width: int, none_installed: bool,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from memprof.cli import output
    from memprof.config.catalogue import OptimizerEntry

    monkeypatch.setattr(output, "out", Console(width=width, force_terminal=False))
    if none_installed:
        monkeypatch.setattr(OptimizerEntry, "installed", property(lambda e: not e.requires))
    assert run_cli("optimizers") == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    for e in ENTRIES:  # each name whole, first on its row; a missing package's command whole on one line
        assert any(line.startswith(e.name + " ") for line in lines), e.name
        if not e.installed:
            then = " (then CUDA only)" if e.needs_cuda else ""
            assert f"{e.name}{then}: pip install {e.install or e.requires}" in lines
