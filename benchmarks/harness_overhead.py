"""Per-cell harness overhead: a cell's wall time as the parent sees it, minus the time inside training steps.

Compares memprof's zygote-forked workers with the naive design, a fresh Python interpreter per cell that imports
torch/transformers/peft/bitsandbytes itself. Writes harness_overhead.{json,md} to ``--out`` (default
results/benchmarks).

    python benchmarks/harness_overhead.py [--naive-cells 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memprof.results import env
from memprof import suite
from memprof.run.executor import LocalExecutor

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
NAIVE = """
import json, sys, time
t0 = time.perf_counter()
from memprof.config.spec import CellConfig
from memprof.run.launch import run_cell
record = run_cell(CellConfig.model_validate_json(sys.argv[1])).record
print(json.dumps({"train_s": record.train_s, "import_and_run_s": time.perf_counter() - t0}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--naive-cells", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for harness_overhead.{json,md}")
    args = parser.parse_args()
    cells = suite.load("quick").cells

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        executor = LocalExecutor(Path(tmp))
        executor.wait_ready()
        startup_s = time.perf_counter() - t0
        forked = []
        for cell in cells:
            r = executor.run(cell).record
            forked.append({"cell": cell.key, "harness_wall_s": r.harness_wall_s, "train_s": r.train_s,
                           "overhead_s": r.harness_wall_s - r.train_s})
        executor.close()

    naive = []
    for cell in cells[: args.naive_cells]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", NAIVE, cell.model_dump_json()], capture_output=True,
                              text=True, check=True)
        wall = time.perf_counter() - t0
        train_s = json.loads(proc.stdout.strip().splitlines()[-1])["train_s"]
        naive.append({"cell": cell.key, "harness_wall_s": wall, "train_s": train_s, "overhead_s": wall - train_s})

    machine = env.capture()
    result = {
        "machine": {k: machine[k] for k in ("host", "cpu", "cpu_count", "memory_bytes", "gpus", "versions",
                                            "git_revision")},
        "zygote_startup_s": startup_s,
        "forked_overhead_median_s": statistics.median(c["overhead_s"] for c in forked),
        "forked_overhead_max_s": max(c["overhead_s"] for c in forked),
        "naive_overhead_median_s": statistics.median(c["overhead_s"] for c in naive),
        "forked": forked,
        "naive": naive,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harness_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# Harness overhead per cell ({machine['cpu']}, {machine['cpu_count']} cores, quick suite)",
        "",
        "Overhead = a cell's wall time seen by the parent minus the time inside its training steps "
        "(model build, data, optimizer set-up, fork, result transfer).",
        "",
        "| design | median overhead per cell | max |",
        "| --- | ---: | ---: |",
        f"| memprof: worker forked from a pre-imported zygote ({len(forked)} cells) "
        f"| {result['forked_overhead_median_s']:.2f} s | {result['forked_overhead_max_s']:.2f} s |",
        f"| naive: fresh interpreter per cell ({len(naive)} cells) | {result['naive_overhead_median_s']:.2f} s "
        f"| {max(c['overhead_s'] for c in naive):.2f} s |",
        "",
        f"The zygote's one-time start-up (imports, paid once per suite): {startup_s:.2f} s.",
        "",
    ]
    (args.out / "harness_overhead.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
