"""What is alive at a CUDA cell's allocator peak, block by block: the cell run in this process (``run_cell``) with
torch's allocator history on, its trace replayed to the highest sum of live blocks, and the blocks alive then listed
by size with the Python lines that made them (blocks autograd's backward thread made have none). Beside them the
record's breakdown, so a remainder the breakdown leaves unnamed can be traced to the blocks it is made of.

    python benchmarks/peak_allocations.py --suite levers --cell 0 --set shape.batch_size=4 --set shape.seq_len=256 \
        --out DIR     # on a CUDA host: writes peak_allocations.md
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from memprof import suite
from memprof.run.launch import run_cell

TOP = 40


def where(frames: list[dict[str, Any]]) -> str:
    """The innermost three Python lines outside torch, or '(no Python frames)'."""
    lines = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames
             if f["filename"].endswith(".py") and "/torch/" not in f["filename"]]
    return " < ".join(lines[:3]) or "(no Python frames)"


def replay(trace: list[dict[str, Any]]) -> tuple[int, dict[int, dict[str, Any]]]:
    """The highest sum of live blocks over the trace and the blocks alive then (address -> event)."""
    live: dict[int, dict[str, Any]] = {}
    total = peak = 0
    at_peak: dict[int, dict[str, Any]] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] in ("free_completed",) and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, at_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="levers")
    parser.add_argument("--cell", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a cell value (CellConfig.with_values key), e.g. shape.batch_size=4")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    values: dict[str, Any] = {"budget.device": "cuda", "training.steps": 3, "training.warmup_steps": 2}
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    cell = suite.load(args.suite).cells[args.cell].with_values(values)
    torch.cuda.init()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    record = run_cell(cell).record
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    device = torch.cuda.current_device()
    peak, alive = replay(snapshot["device_traces"][device])
    groups: Counter[tuple[int, str]] = Counter((e["size"], where(e.get("frames", []))) for e in alive.values())
    rows = sorted(groups.items(), key=lambda item: -item[0][0] * item[1])
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Blocks alive at the allocator peak of `{cell.key}`", "",
             f"Record: {record.status.value}, peak allocated {record.peak_allocated_bytes:,} B at "
             f"'{record.peak_moment}' ({record.peak_phase}); replayed trace peak {peak:,} B "
             f"({len(alive)} blocks).", "", "Breakdown: " + json.dumps(record.breakdown), "",
             "| block bytes | blocks | bytes | made at |", "|---:|---:|---:|---|"]
    lines += [f"| {size:,} | {n} | {size * n:,} | {made} |" for (size, made), n in rows[:TOP]]
    rest = sum(size * n for (size, _), n in rows[TOP:])
    lines.append(f"| | {sum(n for _, n in rows[TOP:])} | {rest:,} | (the other groups) |")
    (args.out / "peak_allocations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
