"""Suite wall time with 1 job vs N jobs on this machine (the quick suite, CPU), and with the Ray executor on a
local Ray instance it starts (when ray is installed).

Writes results/benchmarks/jobs_wall.{json,md}.   python benchmarks/jobs_wall.py [--jobs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memprof.results import env

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


def wall(*flags: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "memprof", "run", "quick", "--device", "cpu", "--out", tmp, *flags],
                       check=True, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    times = {"1": wall(), str(args.jobs): wall("--jobs", str(args.jobs))}
    if importlib.util.find_spec("ray") is not None:
        times["ray"] = wall("--executor", "ray")
    machine = env.capture()
    load = os.getloadavg()[0]
    result = {"machine": {k: machine[k] for k in ("host", "cpu", "cpu_count", "versions", "git_revision")},
              "load_average_1min_after": load, "wall_s": times}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "jobs_wall.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"1 vs {args.jobs} jobs" + (" vs the Ray executor" if "ray" in times else "")
    md = [f"# Quick suite wall time, {title} ({machine['cpu']}, {machine['cpu_count']} cores)", "",
          "| jobs | wall time |", "| ---: | ---: |",
          *(f"| {jobs} | {seconds:.1f} s |" for jobs, seconds in times.items()), "",
          f"Load average (1 min) when it finished: {load:.1f}. Each job has its own zygote; on the CPU the cores "
          "are shared out between jobs, so the per-cell timings of a parallel run are not comparable with a "
          "serial run's (the records say how many cells ran at once).", ""]
    if "ray" in times:
        md[-1:] = ["`ray`: `--executor ray` without `--address`, so the time includes starting a local Ray instance "
                   "(one core and one thread per cell, the model checks as a task, one zygote per Ray worker).", ""]
    (OUT / "jobs_wall.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
