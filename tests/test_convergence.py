"""Convergence that means something: held-out evaluation, the LR each step really used, every transformers schedule,
confidence intervals over repeats, and AdamW reaching a known entropy floor on the CPU."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_suite

from memprof import suite
from memprof.analysis import stats
from memprof.config.spec import LORA_DEFAULTS, METRIC_SCHEDULES, SCHEDULES, AdapterSpec, ModelSpec
from memprof.errors import UserError
from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.train import data, models, optim
from memprof.results.record import StepLog
from memprof.train.loop import NullProbe, evaluate, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def convergence_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("results")
    assert run_cli("run", "convergence", "--out", str(out)) == 0
    (run_dir,) = out.iterdir()
    yield run_dir



def steps_csv(run_dir: Path, index: int) -> list[dict[str, str]]:
    with open(run_dir / "cells" / f"{index:04d}" / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_adamw_gets_within_10_percent_of_the_entropy_floor(convergence_run: Path) -> None:
    records = {r.config.optimizer.label: r for r in read_records(convergence_run)}
    assert set(records) == {"adamw_torch", "adamw_bnb_8bit", "schedule_free_adamw"}
    floor = data.markov_corpus(0).entropy_floor_nats
    for r in records.values():
        assert r.status is Status.OK, r.error
        assert r.entropy_floor_nats == pytest.approx(floor, rel=1e-12)
        assert r.final_eval_loss < r.first_loss - 2  # every optimizer learns the chain
    adamw = records["adamw_torch"]
    assert adamw.final_eval_loss <= 1.10 * floor
    assert adamw.floor_gap_nats == pytest.approx(adamw.final_eval_loss - floor)
    assert adamw.eval_perplexity == pytest.approx(math.exp(adamw.final_eval_loss))
    assert adamw.diagnosis == "" and adamw.verdict == ""


def test_convergence_fields_agree_with_the_per_step_rows(convergence_run: Path) -> None:
    for r in read_records(convergence_run):
        rows = steps_csv(convergence_run, r.config.index)
        losses = [float(row["loss"]) for row in rows]
        evals = {int(row["step"]): float(row["eval_loss"]) for row in rows if row["eval_loss"]}
        assert sorted(evals) == [19, 39, 59, 79]  # eval_every = 20, and always after the last step
        assert r.final_eval_loss == evals[79]
        assert r.loss_auc == pytest.approx(sum(losses) / len(losses))
        assert r.config.training.target_loss == 2.1 and r.steps_to_target is not None
        smoothed = [sum(losses[max(0, i - 4):i + 1]) / len(losses[max(0, i - 4):i + 1]) for i in range(len(losses))]
        assert smoothed[r.steps_to_target - 1] <= 2.1 < min(smoothed[:r.steps_to_target - 1])
        times = [float(row["step_time_s"]) for row in rows]
        warmup, timed = r.config.training.warmup_steps, sorted(times[r.config.training.warmup_steps:])
        assert warmup > 0 and r.steps_to_target > warmup
        usual = (timed[(len(timed) - 1) // 2] + timed[len(timed) // 2]) / 2  # the warm-up steps at the median
        assert r.seconds_to_target == pytest.approx(warmup * usual + sum(times[warmup:r.steps_to_target]))


def test_repeats_use_the_same_task_and_fixed_eval_batches() -> None:
    corpus = data.markov_corpus(0)
    a = data.eval_batches(corpus.eval, 4, 16, 3)
    b = data.eval_batches(corpus.eval, 4, 16, 3)
    assert len(a) == 3 and all(x.shape == (4, 16) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    s = suite.parse(_REPEATS, Path("repeats.toml"))
    assert [c.training.seed for c in s.cells] == [0, 1, 2] and {c.training.data.seed for c in s.cells} == {0}


_REPEATS = """
[suite]
name = "repeats"
device = "cpu"
repeats = 3
[data]
source = "synthetic"
[grid]
model = ["tiny-llama"]
optimizer = ["adamw_torch"]
"""


def _tiny(adapter: str = "none") -> torch.nn.Module:
    torch.manual_seed(0)
    lora = {**LORA_DEFAULTS, "r": 4, "lora_alpha": 8}
    return models.build_model(ModelSpec(name="tiny-llama", preset="tiny-llama"),
                              AdapterSpec(name=adapter, kind=adapter, lora=lora), "fp32", CPU)


def _batches(seed: int = 0) -> Iterator[torch.Tensor]:
    return data.batches(data.markov_corpus(0).train, 2, 16, seed)


def test_the_logged_lr_is_the_one_the_step_used() -> None:
    model = _tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optim.build_optimizer("adamw_torch", {}, 1e-3, model, CPU)
    schedule = optim.build_schedule("linear", opt, warmup_steps=2, total_steps=4)
    before = [p.detach().clone() for p in params]

    class Snapshot(NullProbe):
        """Copies the weights after each step, to see what the step's LR did."""

        def __init__(self) -> None:
            self.after: list[list[torch.Tensor]] = []

        def step_done(self, log: StepLog) -> None:
            self.after.append([p.detach().clone() for p in params])

    probe = Snapshot()
    logs = train(model, opt, schedule, _batches(), 3, 1, 1.0, CPU, probe)
    assert [log.lr for log in logs] == pytest.approx([0.0, 5e-4, 1e-3])
    # warm-up starts at LR 0: the first step must leave every weight where it was (AdamW decays by lr * wd too)
    assert all(torch.equal(a, b) for a, b in zip(before, probe.after[0]))
    assert not all(torch.equal(a, b) for a, b in zip(probe.after[0], probe.after[1]))


def test_eval_runs_on_schedule_and_schedule_free_returns_to_train_mode() -> None:
    model = _tiny("lora")
    opt = optim.build_optimizer("schedule_free_adamw", {}, 1e-3, model, CPU)
    assert optim.build_schedule("cosine", opt, 0, 5) is None
    opt.train()
    held_out = data.eval_batches(data.markov_corpus(0).eval, 2, 16, 2)
    logs = train(model, opt, None, _batches(), 5, 1, 1.0, CPU, NullProbe(), held_out, eval_every=2)
    assert [log.step for log in logs if log.eval_loss is not None] == [1, 3, 4]
    assert opt.param_groups[0]["train_mode"] and model.training
    opt.eval()
    assert evaluate(model, held_out, CPU) == pytest.approx(logs[-1].eval_loss, abs=1e-6)
    opt.train()


def test_a_schedule_free_optimizer_takes_the_suites_warm_up_and_the_logs_show_its_lr() -> None:
    """As transformers' Trainer does: no schedule, the warm-up steps given to the optimizer, whose own warm-up
    scales the LR inside its step (a linear ramp from lr / warmup_steps)."""
    model = _tiny("lora")
    opt = optim.build_optimizer("schedule_free_adamw", {}, 1e-3, model, CPU, warmup_steps=4)
    assert opt.param_groups[0]["warmup_steps"] == 4 and optim.build_schedule("cosine", opt, 4, 6) is None
    opt.train()
    logs = train(model, opt, None, _batches(), 6, 1, 1.0, CPU, NullProbe())
    assert [log.lr for log in logs] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_reduce_on_plateau_steps_on_the_eval_loss() -> None:
    model = _tiny("lora")
    opt = optim.build_optimizer("adamw_torch", {}, 1e-3, model, CPU)
    # patience 0 and a 50% threshold: every eval that does not halve the best loss cuts the LR by 10
    schedule = optim.build_schedule("reduce_lr_on_plateau", opt, 0, 4, {"patience": 0, "threshold": 0.5})
    held_out = data.eval_batches(data.markov_corpus(0).eval, 2, 16, 1)
    logs = train(model, opt, schedule, _batches(), 4, 1, 1.0, CPU, NullProbe(), held_out, eval_every=1)
    assert [log.lr for log in logs] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_transformers_schedule_builds_and_runs(tmp_path: Path, name: str) -> None:
    kwargs = {"cosine_with_min_lr": "min_lr_rate = 0.1", "cosine_warmup_with_min_lr": "min_lr_rate = 0.1",
              "warmup_stable_decay": "num_decay_steps = 2"}
    path = write_suite(tmp_path, steps=6, extra=f'schedule = ["{name}"]\n\n[schedules.{name}]\n{kwargs.get(name, "")}\n')
    text = path.read_text().replace("timeout_s = 120", "timeout_s = 120\neval_every = 2\nlr_warmup_ratio = 0.3")
    (cell,) = suite.parse(text, path).cells
    assert cell.training.lr_warmup_steps == 2  # ceil(0.3 * 6), as transformers rounds warmup_ratio
    model = _tiny("lora")
    opt = optim.build_optimizer("adamw_torch", {}, 1e-3, model, CPU)
    t = cell.training
    schedule = optim.build_schedule(t.schedule, opt, t.lr_warmup_steps, t.steps, t.schedule_kwargs)
    held_out = data.eval_batches(data.markov_corpus(0).eval, 2, 16, 1)
    logs = train(model, opt, schedule, _batches(), t.steps, 1, 1.0, CPU, NullProbe(), held_out, t.eval_every)
    assert len(logs) == 6 and all(0 <= log.lr <= 1e-3 * 1.0001 for log in logs)
    if name not in METRIC_SCHEDULES and name != "constant":
        assert logs[0].lr < max(log.lr for log in logs) == pytest.approx(1e-3)  # warm-up, then the peak


def test_the_schedule_list_is_every_transformers_scheduler_type() -> None:
    from transformers import SchedulerType

    assert set(SCHEDULES) == {s.value for s in SchedulerType}


@pytest.mark.parametrize(("settings", "grid", "tables", "message"), [
    ("lr_warmup_steps = 2\nlr_warmup_ratio = 0.1", "", "", "lr_warmup_steps or lr_warmup_ratio, not both"),
    ("", 'schedule = ["reduce_lr_on_plateau"]', "", "steps on the eval loss; set suite.eval_every"),
    ("", 'schedule = ["cosine_with_min_lr"]', "", "needs min_lr or min_lr_rate in a \\[schedules.cosine_with_min"),
    ("", "", "[schedules.nope]\nx = 1", "schedules.nope: unknown schedule"),
])
def test_schedule_settings_are_validated(tmp_path: Path, settings: str, grid: str, tables: str, message: str) -> None:
    text = (f'[suite]\nname = "s"\n{settings}\n[grid]\nmodel = ["tiny-llama"]\noptimizer = ["adamw_torch"]\n'
            f"{grid}\n{tables}\n")
    with pytest.raises(UserError, match=message):
        suite.parse(text, tmp_path / "s.toml")


def test_t_interval_matches_the_student_t_table() -> None:
    mean, half = stats.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(stats.t_interval([1.0])[1]) and stats.t_interval([2.0, 2.0])[1] == 0.0
    # above 30 degrees of freedom the expansion continues the table smoothly (t(40) = 2.0211)
    values = [float(i % 2) for i in range(41)]
    sd = math.sqrt(sum((v - sum(values) / 41) ** 2 for v in values) / 40)
    assert stats.t_interval(values)[1] == pytest.approx(2.0211 * sd / math.sqrt(41), rel=1e-4)
