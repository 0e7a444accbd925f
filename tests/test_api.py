"""The Python API and the Trainer callback measure exactly what `memprof run` measures."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from conftest import run_cli
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import memprof
from memprof import suite
from memprof.train.data import batches, markov_corpus
from memprof.api.trainer import MemprofCallback
from memprof.train.models import build_model
from memprof.train.optim import build_optimizer
from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.run.launch import run_cell

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 4


def quick_lora_cell(optimizer: str):
    return next(c for c in suite.load("quick").cells if c.adapter.kind == "lora" and c.optimizer.label == optimizer)


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_bnb_8bit", "adafactor"])
def test_trainer_callback_state_bytes_equal_memprof_run(tmp_path: Path, optimizer: str) -> None:
    cell = quick_lora_cell(optimizer)
    expected = run_cell(cell).record.optimizer_state_bytes
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    tokens = markov_corpus(0).train
    data = [{"input_ids": x, "labels": x} for x in (next(batches(tokens, 1, 32, i))[0] for i in range(8))]
    callback = MemprofCallback(out=tmp_path, name="hf")
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), optim=optimizer, learning_rate=cell.training.lr,
                             max_steps=STEPS, per_device_train_batch_size=2, logging_steps=1, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    record = callback.tracking.record
    assert record.status is Status.OK
    assert record.optimizer_state_bytes == expected
    last_logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
    assert record.config.training.steps == STEPS and record.final_loss == pytest.approx(last_logged)
    assert any("memprof/optimizer_state_bytes" in entry for entry in trainer.state.log_history)
    (written,) = read_records(callback.tracking.run_dir)
    assert written.optimizer_state_bytes == expected
    assert written.config.optimizer.label == optimizer and written.config.adapter.lora["r"] == 16


def _trainer_run(tmp_path: Path, optim: str, name: str) -> Path:
    cell = quick_lora_cell("adamw_torch")
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    data = [{"input_ids": x, "labels": x} for x in (next(batches(markov_corpus(0).train, 1, 32, i))[0]
                                                    for i in range(4))]
    callback = MemprofCallback(out=tmp_path / "results", name=name)
    args = TrainingArguments(output_dir=str(tmp_path / name), optim=optim, max_steps=2,
                             per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    return callback.tracking.run_dir


def test_trainer_runs_of_different_optimizers_never_share_a_key_or_a_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """lion_8bit and lion_32bit are one class (bitsandbytes' Lion) with other settings; adamw_torch and
    adamw_bnb_8bit are both AdamW: each record names the optimizer the Trainer was asked for, with its settings."""
    runs = {optim: _trainer_run(tmp_path, optim, "hf") for optim in ("lion_8bit", "lion_32bit", "adamw_torch",
                                                                     "adamw_bnb_8bit")}
    records = {optim: read_records(run)[0] for optim, run in runs.items()}
    assert len({r.key for r in records.values()}) == 4
    assert len({r.config.config_hash for r in records.values()}) == 4
    assert records["lion_8bit"].config.optimizer.kwargs["optim_bits"] == 8
    assert records["lion_32bit"].config.optimizer.kwargs["optim_bits"] == 32
    capsys.readouterr()
    assert run_cli("compare", str(runs["lion_32bit"]), str(runs["lion_8bit"])) == 2  # nothing the same to compare
    assert "share no configuration" in capsys.readouterr().err


def test_an_optimizer_built_by_hand_is_named_by_its_class_and_settings(tmp_path: Path) -> None:
    cell = quick_lora_cell("adamw_torch")
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    with memprof.track(model, optimizer, tmp_path, batch_size=2, seq_len=32, warmup_steps=0) as t:
        x = next(batches(markov_corpus(0).train, 2, 32, 0))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        t.step(loss=loss)
    spec = t.record.config.optimizer
    assert (spec.label, spec.name) == ("SGD", "torch.optim.sgd:SGD") and spec.kwargs["momentum"] == 0.9
    assert t.record.config.adapter.kind == "lora" and t.record.config.model.config["hidden_size"] == 256


def test_track_measures_a_plain_pytorch_loop_and_writes_a_run_folder(tmp_path: Path) -> None:
    cell = quick_lora_cell("adamw_torch")
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    optimizer = build_optimizer("adamw_torch", {}, 1e-3, model, torch.device("cpu"))
    data = batches(markov_corpus(0).train, 2, 32, seed=0)
    with memprof.track(model, optimizer, out=tmp_path, name="loop", batch_size=2, seq_len=32) as t:
        for _ in range(STEPS):
            x = next(data)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            t.step(loss=loss)
    r = t.record
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    assert r.status is Status.OK and r.config.training.steps == STEPS and r.config.adapter.name == "lora"
    assert r.optimizer_state_bytes == memprof.optimizer_state_bytes(optimizer) == 8 * trainable + 4 * tensors
    assert r.gradient_bytes == 4 * trainable
    assert r.activation_bytes > 0 and r.tokens_per_s > 0
    assert r.peak_allocated_bytes is None and r.peak_bytes == r.peak_rss_delta_bytes > 0  # the README prints peak_bytes
    assert memprof.weight_bytes(model).trainable.total == r.trainable_weight_bytes
    (written,) = read_records(t.run_dir)
    assert written.optimizer_state_bytes == r.optimizer_state_bytes
    assert (t.run_dir / "cells" / "0000" / "steps.csv").exists()


def test_sft_trainer_callback_state_bytes_equal_memprof_run(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="TRL is an optional extra (pip install -e '.[trl]')")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    cell = quick_lora_cell("adamw_torch")
    expected = run_cell(cell).record.optimizer_state_bytes
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    # a byte-level tokenizer built in memory: nothing can be downloaded here
    byte_vocab = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(256)}, unk_token="<0>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_vocab, pad_token="<0>", eos_token="<1>")
    rows = [next(batches(markov_corpus(0).train, 1, 32, i))[0].tolist() for i in range(8)]
    callback = MemprofCallback(out=tmp_path, name="sft")
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), optim="adamw_torch", learning_rate=cell.training.lr,
                         max_steps=STEPS, per_device_train_batch_size=2, logging_steps=1, report_to="none",
                         use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[callback],
                             train_dataset=datasets.Dataset.from_dict({"input_ids": rows}))
    trainer.train()
    record = callback.tracking.record
    assert record.status is Status.OK and record.config.training.steps == STEPS
    assert record.optimizer_state_bytes == expected


# --- the API as a user meets it: what it measures, what it refuses, what it says it left out ------------------------


def _tiny_lora() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    cell = quick_lora_cell("adamw_torch")
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, t: memprof.Tracking | None, steps: int = 3,
           batch: int = 2, accum: int = 1, tokens: list[int] | None = None) -> None:
    data = batches(markov_corpus(0).train, batch, 32, seed=0)
    for step in range(steps):
        for _ in range(accum):
            x = next(data)
            loss = model(input_ids=x, labels=x).loss
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad()
        if t is not None:
            t.step(loss=loss, tokens=tokens[step] if tokens else None)


def test_the_cpu_peak_is_this_runs_and_counts_the_model_built_before_it() -> None:
    model, optimizer = _tiny_lora()
    spike = torch.ones(50_000_000)  # 200 MB touched and freed before the tracking: the process's high-water mark
    spike += 1
    del spike
    with memprof.track(model, optimizer, batch_size=2, seq_len=32) as t:
        _train(model, optimizer, t)
    r = t.record
    weights = r.frozen_weight_bytes + r.trainable_weight_bytes + r.buffer_bytes
    # the model built before the block is part of the peak, as in `memprof run` (a worker builds it after its
    # baseline), and the spike before the block is not
    assert weights + r.optimizer_state_bytes + r.gradient_bytes <= r.peak_rss_delta_bytes < 100_000_000
    assert r.rss_baseline_bytes + r.peak_rss_delta_bytes == r.peak_rss_bytes
    # so the breakdown's named parts lie inside the peak, and the remainder is not made of the weights
    assert sum(v for k, v in r.breakdown.items() if k != "other") <= r.peak_rss_delta_bytes
    assert sum(r.breakdown.values()) == r.peak_rss_delta_bytes


@pytest.mark.parametrize("call,error,message", [
    (lambda m, o: memprof.track(o, m), TypeError, "model is a SGD, not a torch.nn.Module"),
    (lambda m, o: memprof.track(m, m), TypeError, "optimizer is a Linear, not a torch.optim.Optimizer"),
    (lambda m, o: memprof.track(torch.nn.ReLU(), o), ValueError, "the model has no parameters"),
    (lambda m, o: memprof.track(torch.nn.Linear(2, 2, device="meta"), o), ValueError, "on the meta device"),
    (lambda m, o: memprof.track(m, o, name="../x"), ValueError, "name '../x' is not letters, digits"),
    (lambda m, o: memprof.track(m, o, batch_size=-3), ValueError, "batch_size must be an integer of at least 0"),
    (lambda m, o: memprof.track(m, o, seq_len="64"), ValueError, "seq_len must be an integer of at least 0, got '64'"),
    (lambda m, o: memprof.track(m, o, grad_accum=0), ValueError, "grad_accum must be an integer of at least 1, got 0"),
    (lambda m, o: memprof.track(m, o, warmup_steps=True), ValueError, "warmup_steps must be an integer"),
    (lambda m, o: memprof.track(m, o, sample_interval_s=-1), ValueError, "sample_interval_s must be positive seconds"),
    (lambda m, o: memprof.track(m, o, optimizer_spec="adamw"), TypeError, "optimizer_spec is a str, not a"),
])
def test_track_refuses_what_it_cannot_measure_with_one_line_before_training(call, error, message) -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error) as raised:
        call(model, optimizer)
    assert str(raised.value).startswith("memprof.track") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_tracking_runs_once_and_tracks_do_not_nest() -> None:
    model, optimizer = _tiny_lora()
    t = memprof.track(model, optimizer, warmup_steps=0)
    with pytest.raises(RuntimeError, match="step\\(\\) belongs inside"):
        t.step(loss=1.0)
    with t:
        with pytest.raises(RuntimeError, match="another track is active"):
            with memprof.track(model, optimizer):
                pass
        _train(model, optimizer, t, steps=2)
    assert t.record.status is Status.OK and t.record.activation_bytes > 0  # the refused inner one took nothing
    with pytest.raises(RuntimeError, match="has run already"):
        with t:
            pass
    with memprof.track(model, optimizer, warmup_steps=0) as again:  # the process is free for the next one
        _train(model, optimizer, again, steps=1)
    assert again.record.status is Status.OK


def test_track_warns_of_what_it_could_not_measure() -> None:
    model, optimizer = _tiny_lora()
    with pytest.warns(UserWarning, match="no step was recorded"):
        with memprof.track(model, optimizer):
            pass
    other = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.warns(UserWarning, match="the optimizer given to memprof.track never stepped"):
        with memprof.track(model, optimizer) as t:
            _train(model, other, t)
    assert t.record.activation_bytes is None and t.record.gradient_bytes is None
    with pytest.warns(UserWarning, match="2 steps, all warm-up"):
        with memprof.track(model, optimizer, warmup_steps=5) as t:
            _train(model, optimizer, t, steps=2)
    with pytest.warns(UserWarning, match="no saved tensor reached memprof's saved-tensor hooks"):
        with memprof.track(model, optimizer, warmup_steps=0) as t:
            x = next(batches(markov_corpus(0).train, 2, 32, seed=0))
            with torch.autograd.graph.save_on_cpu():  # inner hooks: they take every saved tensor
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            t.step(loss=loss)
    assert t.record.activation_bytes is None  # not a measured 0
    packed: list[int] = []
    per_step: list[int] = []
    with pytest.warns(UserWarning, match="activations are not counted: the block runs under the user's"):
        with torch.autograd.graph.saved_tensors_hooks(lambda x: (packed.append(1), x)[1], lambda x: x):
            with memprof.track(model, optimizer) as t:  # the user's hooks stay theirs, the measured step's too
                for _ in range(3):
                    _train(model, optimizer, t, steps=1)
                    per_step.append(len(packed) - sum(per_step))
    assert per_step[0] > 0 and per_step == [per_step[0]] * 3 and t.record.activation_bytes is None
    assert t.record.gradient_bytes == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_track_records_grad_accumulation_and_each_steps_tokens() -> None:
    model, optimizer = _tiny_lora()
    with memprof.track(model, optimizer, batch_size=2, seq_len=32, grad_accum=4, warmup_steps=0) as t:
        _train(model, optimizer, t, steps=3, accum=4)
    r = t.record
    assert r.config.shape.grad_accum == 4 and "/ga4/" in r.key
    median = sorted(log.step_time_s for log in t.logs)[1]
    assert r.tokens_per_s == pytest.approx(2 * 32 * 4 / median)
    with memprof.track(model, optimizer, warmup_steps=1) as t:
        _train(model, optimizer, t, steps=3, tokens=[1000, 32, 96])  # the first is warm-up
    median = sorted(log.step_time_s for log in t.logs[1:])[0] / 2 + sorted(log.step_time_s for log in t.logs[1:])[1] / 2
    assert t.record.tokens_per_s == pytest.approx(64 / median)


def test_a_peft_adapter_of_any_name_is_the_active_one() -> None:
    from peft import LoraConfig, get_peft_model

    cell = quick_lora_cell("adamw_torch")
    base = build_model(cell.model, suite.load("quick").cells[0].adapter.model_copy(update={"kind": "none", "lora": {}}),
                       cell.shape.precision, torch.device("cpu"))
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"]), adapter_name="mine")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with memprof.track(model, optimizer, warmup_steps=0) as t:
        _train(model, optimizer, t, steps=1)
    assert (t.record.config.adapter.kind, t.record.config.adapter.lora["r"]) == ("lora", 8)
    assert t.record.config.training.lr == 0.0  # as the optimizer was built, not a default
    model.add_adapter("second", LoraConfig(r=4, target_modules=["v_proj"]))
    model.set_adapter("second")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with memprof.track(model, optimizer, warmup_steps=0) as t:
        _train(model, optimizer, t, steps=1)
    assert t.record.config.adapter.lora["r"] == 4 and t.record.config.adapter.lora["target_modules"] == ["v_proj"]


def _trainer(tmp_path: Path, callback: MemprofCallback, optimizer: torch.optim.Optimizer | None = None,
             model: torch.nn.Module | None = None, **args: object) -> Trainer:
    model = model if model is not None else _tiny_lora()[0]
    data = [{"input_ids": x, "labels": x} for x in (next(batches(markov_corpus(0).train, 1, 32, i))[0]
                                                    for i in range(16))]
    settings = {"max_steps": 4, "per_device_train_batch_size": 2, **args}
    arguments = TrainingArguments(output_dir=str(tmp_path / "hf"), report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, **settings)
    return Trainer(model=model, args=arguments, train_dataset=data, callbacks=[callback],
                   optimizers=(optimizer, None) if optimizer is not None else (None, None))


def test_trainer_records_accumulation_logged_losses_and_an_optimizer_the_user_built(tmp_path: Path) -> None:
    model = _tiny_lora()[0]
    mine = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], betas=(0.5, 0.6), eps=1e-3,
                             amsgrad=True)
    callback = MemprofCallback(out=tmp_path / "results")
    trainer = _trainer(tmp_path, callback, mine, model, gradient_accumulation_steps=2, logging_steps=2)
    trainer.train()
    r = callback.tracking.record
    # not the Trainer's adamw_torch: the class and the settings it was built with
    assert (r.config.optimizer.name, r.config.optimizer.kwargs["betas"]) == ("torch.optim.adamw:AdamW", [0.5, 0.6])
    assert r.config.optimizer.kwargs["amsgrad"] is True
    assert (r.config.shape.batch_size, r.config.shape.grad_accum) == (2, 2)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2  # steps 2 and 4: the two others have no loss, and none is made up
    assert [math.isnan(log.loss) for log in callback.tracking.logs] == [True, False, True, False]
    assert (r.first_loss, r.final_loss) == (pytest.approx(logged[0]), pytest.approx(logged[1]))
    # the report's relative target is within 5% of the run's own final loss: reached at a step that logged a loss
    from memprof.analysis import report

    (row,) = report.target_table(report.load_run(callback.tracking.run_dir)).rows
    assert row[-2] in ("2", "4"), row  # not "never (0/1)", as the unknown losses between made it


def test_a_trainer_that_raises_keeps_its_record_inside_the_callbacks_with_block(tmp_path: Path) -> None:
    class Boom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("boom at step 2")

    with pytest.raises(RuntimeError, match="boom"):
        with MemprofCallback(out=tmp_path, name="boom") as callback:
            trainer = _trainer(tmp_path, callback)
            trainer.add_callback(Boom())
            trainer.train()
    (written,) = read_records(callback.tracking.run_dir)
    assert written.status is Status.CRASHED and "boom at step 2" in written.error
    assert written.config.training.steps == 2 and written.optimizer_state_bytes > 0
    # without the block, the next run's start drops the one left running (its hooks would measure this one)
    stale = MemprofCallback(out=None)
    trainer = _trainer(tmp_path, stale)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    fresh = MemprofCallback(out=None)
    _trainer(tmp_path, fresh).train()
    assert stale.tracking.record is None and fresh.tracking.record.status is Status.OK
    assert fresh.tracking.record.activation_bytes > 0


def test_a_run_a_trainer_left_open_by_raising_outside_the_block_is_measured_until_discard(tmp_path: Path) -> None:
    """transformers' callbacks have no event for a training that raises, so outside the callback's ``with`` block
    its run stays measured, as MemprofCallback's docstring and the README say, until ``callback.tracking.discard()``
    ends it, without a record."""
    import threading

    class Boom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                raise RuntimeError("boom at step 1")

    def sampling() -> bool:
        return any(thread.name == "memprof-sampler" for thread in threading.enumerate())

    callback = MemprofCallback(out=None)
    trainer = _trainer(tmp_path, callback)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    model, optimizer = _tiny_lora()
    try:
        assert sampling()
        with pytest.raises(RuntimeError, match=r"callback\.tracking\.discard\(\) ends it"):
            memprof.track(model, optimizer).__enter__()
    finally:  # the other tests' tracks need the process free
        assert callback.tracking.discard()
    assert not sampling() and callback.tracking.record is None
    with memprof.track(model, optimizer, warmup_steps=0) as t:  # the process is free for the next one
        _train(model, optimizer, t, steps=1)
    assert t.record.status is Status.OK


def test_track_takes_what_users_bring_an_lr_free_optimizer_a_plain_config_and_accelerate() -> None:
    from accelerate import Accelerator
    from transformers.optimization import Adafactor

    class Plain(torch.nn.Module):
        """A model of the user's own, whose config is no transformers config."""

        def __init__(self) -> None:
            super().__init__()
            self.config = {"width": 8}
            self.layer = torch.nn.Linear(8, 8)

    model = Plain()
    optimizer = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True, warmup_init=True)
    with memprof.track(model, optimizer, warmup_steps=0) as t:
        for _ in range(2):
            model.layer(torch.ones(4, 8)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            t.step(loss=1.0)
    assert t.record.status is Status.OK and t.record.config.model.name == "Plain"
    assert math.isnan(t.logs[0].lr) and t.record.config.optimizer.kwargs["lr"] is None  # not a made-up figure
    assert t.record.optimizer_state_bytes == memprof.optimizer_state_bytes(optimizer) > 0

    wrapped_model, wrapped = Accelerator(cpu=True).prepare(*_tiny_lora())
    with memprof.track(wrapped_model, wrapped, warmup_steps=0) as t:  # the optimizer inside accelerate's wrapper
        _train(wrapped_model, wrapped, t, steps=1)
    assert t.optimizer is wrapped.optimizer and t.record.optimizer_state_bytes > 0


def test_a_trainer_that_logged_no_loss_says_so_and_the_callback_records_its_length(tmp_path: Path) -> None:
    callback = MemprofCallback(out=None, seq_len=48)
    with pytest.warns(UserWarning, match="no step's loss was given"):
        _trainer(tmp_path, callback, logging_steps=10).train()
    r = callback.tracking.record
    assert r.config.shape.seq_len == 48 and "/s48/" in r.key and r.final_loss is None  # as it was told
    callback = MemprofCallback(out=None)
    _trainer(tmp_path, callback, gradient_accumulation_steps=2).train()
    r = callback.tracking.record
    assert (r.config.shape.batch_size, r.config.shape.seq_len, r.config.shape.grad_accum) == (2, 32, 2)  # as it ran
    median = statistics.median(log.step_time_s for log in callback.tracking.logs[1:])
    assert r.tokens_per_s == pytest.approx(2 * 2 * 32 / median)  # the tokens the forward took, each step


def test_track_reads_the_batch_and_length_from_what_the_model_took() -> None:
    model, optimizer = _tiny_lora()
    with memprof.track(model, optimizer, warmup_steps=0) as t:
        _train(model, optimizer, t, steps=2, batch=3, accum=2)
    r = t.record
    assert (r.config.shape.batch_size, r.config.shape.seq_len) == (3, 32) and "/b3/s32/" in r.key
    assert r.tokens_per_s == pytest.approx(2 * 3 * 32 / statistics.median(log.step_time_s for log in t.logs))


def test_a_model_inside_ddp_is_described_as_itself_under_its_strategy(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, optimizer = _tiny_lora()
        wrapped = DistributedDataParallel(model)
        with memprof.track(wrapped, optimizer, warmup_steps=0) as t:
            _train(wrapped, optimizer, t, steps=1)
    finally:
        dist.destroy_process_group()
    c = t.record.config
    assert (c.levers.parallel.strategy, c.levers.parallel.world_size) == ("ddp", 1)
    assert c.adapter.kind == "lora" and c.model.config["model_type"] == "llama"  # not "DistributedDataParallel"
    assert (c.shape.batch_size, c.shape.seq_len) == (2, 32) and t.record.activation_bytes > 0
