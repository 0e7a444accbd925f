"""Suite wall time with 1 job vs N jobs on this machine (the quick suite, CPU).

Writes results/benchmarks/jobs_wall.{json,md}.   python benchmarks/jobs_wall.py [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memprof import env

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def wall(jobs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memprof", "run", "quick", "--device", "cpu", "--out", tmp,
                        "--jobs", str(jobs)], check=True, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    times = {1: wall(1), args.jobs: wall(args.jobs)}
    machine = env.capture()
    load = os.getloadavg()[0]
    result = {"machine": {k: machine[k] for k in ("host", "cpu", "cpu_count", "versions", "git_revision")},
              "load_average_1min_after": load, "wall_s": times}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jobs_wall.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Quick suite wall time, 1 vs {args.jobs} jobs ({machine['cpu']}, {machine['cpu_count']} cores)", "",
          "| jobs | wall time |", "| ---: | ---: |",
          *(f"| {jobs} | {seconds:.1f} s |" for jobs, seconds in times.items()), "",
          f"Load average (1 min) when it finished: {load:.1f}. Each job has its own zygote; on the CPU the cores "
          "are shared out between jobs, so the per-cell timings of a parallel run are not comparable with a "
          "serial run's (the records say how many cells ran at once).", ""]
    (OUT / "jobs_wall.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
