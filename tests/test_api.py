"""The Python API and the Trainer callback measure exactly what `memprof run` measures."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli
import torch
from transformers import Trainer, TrainingArguments

import memprof
from memprof import suite
from memprof.train.data import batches, markov_corpus
from memprof.api.trainer import MemprofCallback
from memprof.train.models import build_model
from memprof.train.optim import build_optimizer
from memprof.results.record import Status
from memprof.results.store import read_records
from memprof.run.launch import run_cell

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
    with memprof.track(model, optimizer, tmp_path, batch_size=2, seq_len=32) as t:
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
