"""``memprof.measure.step_memory``'s moments against a CPU replay of the step (``memprof.measure.replay``: the
profiler's allocator events, exact on the CPU): for each model and combination of adapter, precision, chunked loss
and gradient checkpointing, the highest live bytes in forward and in backward against the largest predicted moment of
that phase. Weights, optimizer state and the input batch are left out of both sides (allocated before the replay).

The GPU differs where kernels differ (cuBLAS workspaces, flash attention, one more [tokens, intermediate] gradient in
a CUDA MLP backward): this checks the autograd graph's part of each moment, the part no GPU run measured for most
combinations. QLoRA is left out: bitsandbytes' CPU kernels branch on the CPU's flags (with AVX512-BF16 they repack
the 4-bit weights and dequantise none whole), so its replay says nothing of CUDA's dequantised weight. Writes
moment_replay.{json,md} to ``--out``.

    python benchmarks/moment_replay.py --out results/benchmarks
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.measure import step_memory
from memprof.measure.accounting import weight_bytes
from memprof.measure.replay import replay_step
from memprof.results import env
from memprof.train import models

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def replay(preset: str, vocab: int, batch: int, seq: int, adapter: str, precision: str, chunk: int,
           checkpointing: bool) -> dict[str, Any]:
    cell = CellConfig(model=ModelSpec(name=preset, preset=preset, overrides={"vocab_size": vocab}),
                      adapter=AdapterSpec(name=adapter, kind=adapter, lora=LORA),
                      optimizer=OptimizerSpec(label="adamw_torch", name="adamw_torch"),
                      shape=ShapeSpec(batch_size=batch, seq_len=seq, precision=precision),
                      levers=Levers(loss_chunk=chunk, gradient_checkpointing=checkpointing))
    torch.manual_seed(0)
    model = models.build_model(cell.model, cell.adapter, precision, torch.device("cpu"), cell.levers)
    peaks = replay_step(model, models.loss_function(cell.levers), torch.randint(0, vocab, (batch, seq)))
    every = step_memory.moments(step_memory.step_shape(cell, "cpu"), weights=0, optimizer=0,
                                gradients=weight_bytes(model).trainable.total,
                                activations=peaks.activation_bytes)
    predicted = {name: sum(parts.values()) - parts["input_ids"] for name, parts in every.items()}
    row: dict[str, Any] = {"model": preset, "adapter": adapter, "precision": precision, "loss_chunk": chunk,
                           "checkpointing": checkpointing, "activation_bytes": peaks.activation_bytes}
    for phase, measured in (("forward", peaks.forward_bytes), ("backward", peaks.backward_bytes)):
        moment = max((m for m in every if step_memory.phase(m) == phase), key=predicted.__getitem__)
        row[phase] = {"measured_bytes": measured, "moment": moment, "predicted_bytes": predicted[moment],
                      "error": predicted[moment] / measured - 1}
    return row


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [f"# step_memory's moments against a CPU replay ({machine['cpu']}, torch {machine['versions']['torch']})",
             "", f"{' and '.join(result['presets'])} with a {result['vocab']:,}-token vocabulary, "
             f"b{result['batch']} × s{result['seq']}; "
             "LoRA is r16 on every linear layer. Measured: the highest live bytes of the replayed step's forward and "
             "backward (torch.profiler's allocator events), above the weights and the input batch. Predicted: the "
             "largest moment of that phase.", "",
             "| model | adapter | precision | loss chunk | checkpointing | forward measured | forward moment | error | "
             "backward measured | backward moment | error |", "|---|---|---|---:|---|---:|---|---:|---:|---|---:|"]
    for r in result["rows"]:
        f, b = r["forward"], r["backward"]
        checkpointing = "on" if r["checkpointing"] else "off"
        lines.append(f"| {r['model']} | {r['adapter']} | {r['precision']} | {r['loss_chunk']} | {checkpointing} "
                     f"| {f['measured_bytes'] / 2**20:.2f} MiB | {f['moment']} | {f['error']:+.1%} "
                     f"| {b['measured_bytes'] / 2**20:.2f} MiB | {b['moment']} | {b['error']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small-llama", "tiny-qwen3"])
    parser.add_argument("--vocab", type=int, default=32_000, help="a real model's vocabulary, against its width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64, help="the chunked loss's tokens per chunk")
    parser.add_argument("--out", type=Path, required=True, help="folder for moment_replay.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the replay's order of allocations does not depend on it; its time does
    rows = [replay(preset, args.vocab, args.batch, args.seq, adapter, precision, chunk, checkpointing)
            for preset, adapter, precision, chunk, checkpointing in itertools.product(
                args.presets, ("lora", "none"), ("fp32", "bf16"), (0, args.chunk), (False, True))]
    result = {"machine": env.capture(), "presets": args.presets, "vocab": args.vocab, "batch": args.batch,
              "seq": args.seq, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moment_replay.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "moment_replay.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
