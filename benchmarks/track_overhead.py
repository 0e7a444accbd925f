"""What ``memprof.track`` costs inside a user's own loop: median step time of a plain PyTorch loop with and without
it, in alternating blocks (off, on, off, on, ...) in one process, so slow drifts of the machine fall on both arms.

The loop is the quick suite's first cell (tiny Llama, LoRA, AdamW) written as a user would write it; ``on`` wraps a
block in ``memprof.track(model, optimizer)`` (sampler, allocator/RSS peaks, the activation and gradient snapshot at
its first step after warm-up, exact accounting on exit) and calls ``t.step(loss=...)`` each step.
Writes results/benchmarks/track_overhead.{json,md}.

    python benchmarks/track_overhead.py [--pairs 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

import memprof
from memprof.results import env
from memprof import suite
from memprof.train.data import batches, load_corpus
from memprof.train.models import build_model
from memprof.train.optim import build_optimizer

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
TARGET_RATIO = 1.02
WARMUP = 2


def block(model, optimizer, data, steps: int, tracked: bool) -> float:
    """Median step time of ``steps`` steps after ``WARMUP``, with or without ``memprof.track``."""
    times = []
    with (memprof.track(model, optimizer, warmup_steps=WARMUP) if tracked else nullcontext()) as t:
        for _ in range(steps):
            t0 = time.perf_counter()
            x = next(data)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.item()  # the loop's one sync, as a user's logging would do
            if t is not None:
                t.step(loss=value)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cell = suite.load("quick").cells[0]
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    optimizer = build_optimizer(cell.optimizer.name, {}, cell.training.lr, model, torch.device("cpu"))
    data = batches(load_corpus(cell.training.data).train, cell.shape.batch_size, cell.shape.seq_len, seed=0)
    load_before = os.getloadavg()
    block(model, optimizer, data, args.steps, tracked=False)  # first-step initialisations, for neither arm
    pairs = []
    for _ in range(args.pairs):
        off = block(model, optimizer, data, args.steps, tracked=False)
        on = block(model, optimizer, data, args.steps, tracked=True)
        pairs.append({"off_s": off, "on_s": on, "ratio": on / off})
    ratio = statistics.median(p["ratio"] for p in pairs)
    machine = env.capture()
    result = {"machine": {k: machine[k] for k in ("host", "cpu", "cpu_count", "versions", "git_revision")},
              "cell": cell.key, "steps_per_block": args.steps, "warmup_steps": WARMUP, "pairs": pairs,
              "ratio_median": ratio, "target_ratio": TARGET_RATIO, "load_before": load_before,
              "load_after": os.getloadavg()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "track_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    off_ms = statistics.median(p["off_s"] for p in pairs) * 1e3
    on_ms = statistics.median(p["on_s"] for p in pairs) * 1e3
    md = [f"# `memprof.track` overhead in a plain PyTorch loop ({machine['cpu']}, {machine['cpu_count']} cores)", "",
          f"Cell `{cell.key}` written as a user's loop; {args.pairs} pairs of {args.steps}-step blocks alternating "
          f"without and with `memprof.track`, the first {WARMUP} steps of each block left out.", "",
          "| arm | median step time |", "| --- | ---: |", f"| without | {off_ms:.2f} ms |",
          f"| with `memprof.track` | {on_ms:.2f} ms |", "",
          f"**Overhead: with/without = {ratio:.4f}** (median over pairs; range "
          f"{min(p['ratio'] for p in pairs):.4f} to {max(p['ratio'] for p in pairs):.4f}). Target ≤ {TARGET_RATIO}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}.", "",
          f"Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.", ""]
    (OUT / "track_overhead.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
