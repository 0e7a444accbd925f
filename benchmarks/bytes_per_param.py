"""Optimizer-state bytes per trainable parameter, measured by memprof and predicted by ``memprof.measure.formulas``.

Runs one suite through ``memprof run`` (every cell in its own forked worker, exact accounting after real
training steps): every catalogue optimizer on a LoRA (r=16, all linear layers) of a 2-layer Llama of hidden 1024,
wide enough that every LoRA matrix reaches bitsandbytes' and torchao's 4096-element threshold for 8-bit state.
Writes results/benchmarks/bytes_per_param.{md,csv}.

    python benchmarks/bytes_per_param.py [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

from memprof.results import env
from memprof.config.catalogue import CATALOGUE, ENTRIES
from memprof.measure.formulas import why_unpredictable
from memprof.results.record import Record, Status
from memprof.results.store import read_records

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "schedulefree", "torchao", "galore-torch",
             "apollo-torch", "came-pytorch", "adam-mini", "torch-optimi", "grokadamw")
MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 8,
         "num_key_value_heads": 4}
SUITE = """
[suite]
name = "bytes-per-param"
device = "{device}"
steps = 2
warmup_steps = 1
eval_batches = 1
timeout_s = 600

[grid]
model = ["llama-1024"]
adapter = ["lora16"]
optimizer = {optimizers}
batch_size = [1]
seq_len = [32]

[models.llama-1024]
preset = "tiny-llama"
overrides = {{ {overrides} }}

[adapters.lora16]
kind = "lora"
r = 16
alpha = 32
target_modules = "all-linear"
"""


def run_suite(device: str) -> list[Record]:
    overrides = ", ".join(f"{k} = {v}" for k, v in MODEL.items())
    optimizers = "[" + ", ".join(f'"{e.name}"' for e in ENTRIES) + "]"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bytes_per_param.toml"
        path.write_text(SUITE.format(device=device, optimizers=optimizers, overrides=overrides))
        subprocess.run([sys.executable, "-m", "memprof", "run", str(path), "--out", tmp], check=False)
        (run_dir,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        return read_records(run_dir)


def per_param(nbytes: int | None, params: int | None) -> str:
    return f"{nbytes / params:.4f}" if nbytes is not None and params else "–"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def row(r: Record) -> dict[str, object]:
    ok = r.status is Status.OK
    match = "" if not ok or r.predicted_state_bytes is None else (
        "✓" if r.predicted_state_bytes == r.optimizer_state_bytes else "✗")
    note = "" if ok else f"{r.status.value}: {r.error}"
    if ok and r.predicted_state_bytes is None:
        note = f"no formula: {why_unpredictable(r.config.optimizer.name)}"
    note = note.replace("|", "/")[:160]  # one markdown cell
    return {"optimizer": r.config.optimizer.name, "library": CATALOGUE[r.config.optimizer.name].library, "status": r.status.value,
            "trainable_params": r.trainable_params,
            "measured_state_bytes": r.optimizer_state_bytes if ok else None,
            "predicted_state_bytes": r.predicted_state_bytes,
            "measured_bytes_per_param": per_param(r.optimizer_state_bytes, r.trainable_params) if ok else "–",
            "predicted_bytes_per_param": per_param(r.predicted_state_bytes, r.trainable_params),
            "match": match, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    records = {r.config.optimizer.name: r for r in run_suite(args.device)}
    rows = [row(records[e.name]) for e in ENTRIES if e.name in records]

    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "bytes_per_param.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    machine = env.capture()
    versions = ", ".join(f"{name} {version(name)}" for name in LIBRARIES if version(name))
    trainable = next(r["trainable_params"] for r in rows if r["trainable_params"])
    checked = [r for r in rows if r["match"]]
    md = [
        "# Optimizer-state bytes per trainable parameter",
        "",
        f"LoRA r=16 on every linear layer of a 2-layer Llama (hidden {MODEL['hidden_size']}, intermediate "
        f"{MODEL['intermediate_size']}, byte vocabulary): {trainable:,} trainable fp32 parameters. Measured: "
        "`memprof run` (exact unique-storage accounting of the optimizer's state after 2 real training steps, "
        f"{args.device}). Predicted: `memprof.measure.formulas`. {sum(r['match'] == '✓' for r in checked)} of "
        f"{len(checked)} measured optimizers match to the byte.",
        "",
        "| optimizer | library | measured bytes / param | predicted bytes / param | match | note |",
        "| --- | --- | ---: | ---: | :---: | --- |",
        *(f"| {r['optimizer']} | {r['library']} | {r['measured_bytes_per_param']} | "
          f"{r['predicted_bytes_per_param']} | {r['match'] or '–'} | {r['note']} |" for r in rows),
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_count']} cores; {versions}. Exact byte totals: "
        "bytes_per_param.csv.",
        "",
    ]
    (OUT / "bytes_per_param.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
