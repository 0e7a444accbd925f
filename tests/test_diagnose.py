"""Each diagnosis is shown by a real run of tiny-llama that exhibits it (settings found by experiment), and the usual
remedy, applied to the same run, makes it go away where that is cheap to show."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from memprof.analysis import diagnose, report
from memprof import suite
from memprof.results.record import Record, Status
from memprof.run.launch import run_cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUITE = """
[suite]
name = "diagnose"
device = "cpu"
steps = {steps}
warmup_steps = 1
{settings}

[data]
{data}

[grid]
model = ["tiny-llama"]
adapter = ["{adapter}"]
optimizer = ["{optimizer}"]
batch_size = [{batch}]
seq_len = [{seq}]
lr = [{lr}]
schedule = ["{schedule}"]

[adapters.r16]
kind = "lora"
r = 16
alpha = 32
target_modules = "all-linear"
"""


ZEN = """Beautiful is better than ugly.
Explicit is better than implicit.
Simple is better than complex.
Complex is better than complicated.
Flat is better than nested.
Sparse is better than dense.
Readability counts.
Special cases aren't special enough to break the rules.
Although practicality beats purity.
Errors should never pass silently.
Unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess.
There should be one-- and preferably only one --obvious way to do it.
Although that way may not be obvious at first unless you're Dutch.
Now is better than never.
Although never is often better than *right* now.
If the implementation is hard to explain, it's a bad idea.
If the implementation is easy to explain, it may be a good idea.
Namespaces are one honking great idea -- let's do more of those!
"""



def run(tmp_path: Path, *, steps: int, lr: float, optimizer: str = "adamw_torch", adapter: str = "none",
        batch: int = 16, seq: int = 16, schedule: str = "constant", settings: str = "",
        data: str = 'source = "synthetic"') -> Record:
    text = SUITE.format(steps=steps, lr=lr, optimizer=optimizer, adapter=adapter, batch=batch, seq=seq,
                        schedule=schedule, settings=settings, data=data)
    (cell,) = suite.parse(text, tmp_path / "diagnose.toml").cells
    return run_cell(cell).record


def codes(record: Record) -> list[str]:
    return record.diagnosis.split(",") if record.diagnosis else []


def test_an_absurd_lr_gives_nan_and_the_diverged_verdict(tmp_path: Path) -> None:
    r = run(tmp_path, steps=10, lr=1000.0, batch=8)
    assert r.status is Status.DIVERGED
    assert codes(r) == ["non_finite"] and r.verdict == "diverged"
    assert r.loss_auc is None and r.final_eval_loss is None


def test_a_high_lr_blows_the_loss_up_without_nan(tmp_path: Path) -> None:
    r = run(tmp_path, steps=10, lr=10.0, batch=8)
    assert r.status is Status.OK
    assert codes(r) == ["exploded"] and r.verdict == "diverged"
    assert r.final_loss_smoothed > 100 * r.first_loss


def test_a_vanishing_lr_never_drops(tmp_path: Path) -> None:
    r = run(tmp_path, steps=20, lr=1e-9, batch=8)
    assert codes(r) == ["never_drops"] and r.verdict == "never drops"


def test_a_run_too_short_to_tell_its_end_from_its_start_is_not_said_to_never_drop(tmp_path: Path) -> None:
    # 3 steps: the start (mean of 3) and the final smoothed loss (mean of the last 5) are the same mean
    r = run(tmp_path, steps=3, lr=3e-3, batch=8)
    assert codes(r) == [] and r.verdict == ""
    assert diagnose.diagnose([13.39, 13.07, 12.16], []) == []  # the H100's 70B QLoRA cell, learning in 3 steps
    longer = run(tmp_path, steps=diagnose.START_STEPS + diagnose.SMOOTH_WINDOW, lr=1e-9, batch=8)
    assert codes(longer) == ["never_drops"]  # the shortest run where they differ is judged


def test_a_huge_lr_that_never_drops_is_told_to_lower_it_toward_the_run_s_best(tmp_path: Path) -> None:
    good = run(tmp_path, steps=10, lr=2e-3, batch=4, seq=128, adapter="r16", data='source = "stdlib"')
    huge = run(tmp_path, steps=10, lr=50.0, batch=4, seq=128, adapter="r16", data='source = "stdlib"')
    assert codes(good) == [] and codes(huge) == ["never_drops"]
    huge = replace(huge, config=huge.config.with_values({"index": 1}))
    assert _remedies([good, huge], "never_drops") == ["the LR is above this configuration's best in the run "
                                                      "(0.002): lower it toward that"]
    assert "so large" in _remedies([huge], "never_drops")[0]  # alone: both directions are named


def test_lion_with_a_high_lr_and_no_warmup_or_clipping_oscillates(tmp_path: Path) -> None:
    r = run(tmp_path, steps=15, lr=2e-2, optimizer="lion_32bit", settings="max_grad_norm = 0")
    assert codes(r) == ["oscillation"] and r.verdict == "oscillation"


def test_unclipped_adamw_at_a_high_lr_spikes_and_recovers(tmp_path: Path) -> None:
    r = run(tmp_path, steps=15, lr=5e-3, batch=32, seq=32, schedule="cosine",
            settings="max_grad_norm = 0\nlr_warmup_steps = 6")
    assert codes(r) == ["spikes"] and r.verdict == "spikes"


def test_a_low_lr_stalls_a_lora_on_its_early_plateau_and_10x_escapes_it(tmp_path: Path) -> None:
    low = run(tmp_path, steps=60, lr=3e-4, adapter="r16")
    assert codes(low) == ["plateau"] and low.verdict == "plateau"
    high = run(tmp_path, steps=60, lr=3e-3, adapter="r16")
    assert codes(high) == [] and high.verdict == ""
    assert high.final_eval_loss < low.final_eval_loss - 0.5
    # the report's remedy follows the run's evidence: beside the better LR, the plateau's is "raise it toward 3e-3";
    # had the plateau been at an LR above the best (here: the same curve relabelled 3e-2), "lower it"
    assert _plateau_remedies([low, high]) == ["the LR is too low: this configuration did best in the run at 0.003: "
                                              "raise it toward that"]
    above = replace(low, config=low.config.with_values({"training.lr": 3e-2, "index": 2}))
    assert _plateau_remedies([above, high]) == ["the LR is above this configuration's best in the run (0.003): "
                                                "lower it toward that"]
    assert _plateau_remedies([low]) == [diagnose.FINDINGS["plateau"].remedy]  # no other LR: the usual remedy
    assert report.verdict_of(replace(low, verdict="stalled")) == "plateau"  # a record written before, in today's word


def _plateau_remedies(records: list[Record]) -> list[str]:
    return _remedies(records, "plateau")


def _remedies(records: list[Record], code: str) -> list[str]:
    table = report.diagnosis_table(report.Run(Path("."), records, {}))
    assert table is not None
    return [row[2] for row in table.rows if row[0] == code]


def test_many_steps_on_a_tiny_text_file_overfit(tmp_path: Path) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text(ZEN)  # 740 bytes to train on, 83 held out
    r = run(tmp_path, steps=120, lr=3e-3, batch=8, seq=32, data=f'source = "file"\npath = "{text}"')
    assert codes(r) == ["overfitting"] and r.verdict == "overfitting"
    assert r.final_eval_loss > 1.3 * r.final_loss_smoothed


def test_every_code_has_a_meaning_and_a_remedy() -> None:
    for code, finding in diagnose.FINDINGS.items():
        assert finding.code == code and finding.meaning and finding.remedy
