"""What memprof's trackers cost a training step: one cell's median step time with every tracker on against the
same cell run bare.

- on: ``memprof.run.launch.run_cell``, exactly as a suite runs a cell (``CellProbe``, the background ``Sampler``,
  the saved-activation and gradient snapshots at the last warm-up step, exact accounting after training).
- off: the same cell built the same way (``memprof.train.training.Training``) and trained with a ``NullProbe``, no sampler.

Runs alternate off, on, off, on, ... so slow drifts of a shared machine fall on both arms alike. Each run is a
child forked from this process after it imported the libraries and computed nothing, as memprof's zygote forks
a worker per cell: every run starts from the same state, none inherits another's heap or pays (or skips) the
one-time lazy initialisations of the first training step in a process, which would bias by position rather than
by arm, and the parent never runs a parallel op (libgomp is not fork-safe afterwards). On a CUDA host the parent
imports as the zygote does, without initialising CUDA (``memprof.run.zygote.preload``), and each child initialises
CUDA itself, since a process that initialised CUDA cannot fork children that use the GPU.

Per run the figure is the median step time after the warm-up steps; the overhead is the median over pairs of
on/off, with the ratio of the two arms' medians beside it. Writes tracker_overhead.{json,md} to ``--out``
(default results/benchmarks) after every pair.

    python benchmarks/tracker_overhead.py [--pairs 10] [--steps 30] [--suite quick] [--cell 0] [--device cpu]
    python benchmarks/tracker_overhead.py --suite reference --pairs 6 --steps 20 --out DIR   # on a GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memprof.run.zygote import preload  # first: it asks torch to count GPUs through NVML, without initialising CUDA
from memprof import suite
from memprof.config.spec import CellConfig
from memprof.measure.readings import NVML_IDLE_S, NVML_PERIOD_S, SAMPLE_INTERVAL_S
from memprof.results import env
from memprof.run import processes

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
TARGET_RATIO = {"cpu": 1.02, "cuda": 1.01}  # issue #20


def run_arm(arm: str, cell: CellConfig) -> list[float]:
    """The measured (post-warm-up) step times of one run of ``arm``, in seconds."""
    import torch

    from memprof.run.launch import run_cell
    from memprof.train.loop import NullProbe
    from memprof.train.training import Training

    if arm == "on":
        result = run_cell(cell)
        if result.record.status.value != "ok":
            raise RuntimeError(f"the cell did not run: {result.record.error}")
        times = [row["step_time_s"] for row in result.steps]
    else:
        times = [log.step_time_s for log in Training(cell, torch.device(cell.budget.device)).build().train(NullProbe())]
    return times[cell.training.warmup_steps:]


def cpu_stall_us() -> int | None:
    """Microseconds, since boot, that some runnable task waited for a CPU (Linux pressure stall information)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1])


def forked(arm: str, cell: CellConfig, log: Path) -> list[float]:
    """``run_arm`` in a child forked from this (import-only, CUDA-clean) process."""
    read_fd, write_fd = os.pipe()

    def child() -> int:
        os.close(read_fd)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with os.fdopen(write_fd, "w") as out:
            json.dump(run_arm(arm, cell), out)
        return 0

    sys.stdout.flush()  # or the child's log gets a copy of what this process has not printed yet
    pid = processes.fork(child)
    os.close(write_fd)
    with os.fdopen(read_fd) as answer:
        payload = answer.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the {arm} run {processes.describe_exit(code)}; see {log}:\n{log.read_text()[-2000:]}")
    return json.loads(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30,
                        help="steps per run, the suite's warm-up steps among them (left out of the figures)")
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--cell", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda on a CUDA host, else cpu")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for tracker_overhead.{json,md}")
    args = parser.parse_args()
    has_cuda = preload()
    device = args.device or ("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: this host has no CUDA device")
    cell = suite.load(args.suite).cells[args.cell].with_values({"budget.device": device, "training.steps": args.steps})

    machine = env.capture()  # NVML only: CUDA stays uninitialised here
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for arm in ("off", "on"):
                t0, stall0 = time.perf_counter(), cpu_stall_us()
                times = forked(arm, cell, Path(tmp) / f"{pair}-{arm}.log")
                wall, stall1 = time.perf_counter() - t0, cpu_stall_us()
                # the share of the run during which some task waited for a CPU: how busy the machine was
                pressure = (stall1 - stall0) / 1e6 / wall if stall0 is not None and stall1 is not None else None
                runs.append({"pair": pair, "arm": arm, "step_time_median_s": statistics.median(times),
                             "run_wall_s": wall, "cpu_pressure": pressure, "step_times_s": times})
                print(f"pair {pair} {arm:>3}: median step {runs[-1]['step_time_median_s'] * 1e3:.2f} ms, "
                      f"cpu pressure {pressure if pressure is None else round(pressure, 3)}", flush=True)
            # written after every pair, so that a run stopped early keeps the pairs it finished
            result = summarise(runs, cell, device, machine, load_before)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "tracker_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "tracker_overhead.md").write_text(markdown(result, args.suite, args.cell, machine))
    print(markdown(result, args.suite, args.cell, machine))


def summarise(runs: list[dict[str, Any]], cell: CellConfig, device: str, machine: dict[str, Any],
              load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The figures of the pairs run so far."""
    off = [r["step_time_median_s"] for r in runs if r["arm"] == "off"]
    on = [r["step_time_median_s"] for r in runs if r["arm"] == "on"]
    pair_ratios = [b / a for a, b in zip(off, on)]
    pressure = {arm: [r["cpu_pressure"] for r in runs if r["arm"] == arm and r["cpu_pressure"] is not None]
                for arm in ("off", "on")}
    ratio = statistics.median(pair_ratios)
    target = TARGET_RATIO[device]
    return {
        "machine": {k: machine[k] for k in ("host", "platform", "cpu", "cpu_count", "memory_bytes", "gpus",
                                            "versions", "git_revision", "git_dirty")},
        "cell": cell.key,
        "device": device,
        "steps": cell.training.steps,
        "warmup_steps": cell.training.warmup_steps,
        "pairs": len(pair_ratios),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpu_pressure_median": {arm: statistics.median(v) if v else None for arm, v in pressure.items()},
        "off_median_step_s": statistics.median(off),
        "on_median_step_s": statistics.median(on),
        "ratio_of_medians": statistics.median(on) / statistics.median(off),
        "pair_ratio_median": ratio,
        "pair_ratio_min": min(pair_ratios),
        "pair_ratio_max": max(pair_ratios),
        "target_ratio": target,
        "within_target": ratio <= target,
        "runs": runs,
    }


def markdown(result: dict[str, Any], suite_name: str, index: int, machine: dict[str, Any]) -> str:
    cuda = result["device"] == "cuda"
    gpu = f"{machine['gpus'][0]['name']}, " if cuda and machine["gpus"] else ""
    where = "on the GPU" if cuda else "on the CPU"
    every = f"every {SAMPLE_INTERVAL_S['cuda' if cuda else 'cpu'] * 1e3:.0f} ms"
    sampled = (f"host RSS and the allocator's current bytes {every}, NVML when the allocator's reserved bytes move "
               f"(at most every {NVML_PERIOD_S * 1e3:.0f} ms) or every {NVML_IDLE_S:.0f} s" if cuda
               else f"host RSS {every}")
    shared = " (a 2-core machine shared with other work)" if result["machine"]["cpu_count"] <= 2 else ""
    load_before, load_after = result["load_average_before"], result["load_average_after"]
    ratio, low, high = result["pair_ratio_median"], result["pair_ratio_min"], result["pair_ratio_max"]
    md = [
        f"# Tracker overhead per training step ({gpu}{machine['cpu']}, {machine['cpu_count']} cores, host "
        f"{machine['host']}, torch {machine['versions']['torch']})",
        "",
        f"Cell `{result['cell']}` ({suite_name} suite, cell {index}, {where}), {result['steps']} steps per run, the "
        f"first {result['warmup_steps']} left out; {result['pairs']} pairs of runs alternating off, on, each run in a "
        "child forked from an import-only parent (as memprof's zygote runs cells).",
        "",
        f"- **on**: `run_cell`: CellProbe, background Sampler ({sampled}), snapshots, exact accounting.",
        "- **off**: the same cell built the same way, trained with a `NullProbe`, no sampler.",
        "",
        "| arm | median step time (median over runs) | runs |",
        "| --- | ---: | ---: |",
        f"| off | {result['off_median_step_s'] * 1e3:.2f} ms | {result['pairs']} |",
        f"| on | {result['on_median_step_s'] * 1e3:.2f} ms | {result['pairs']} |",
        "",
        f"**Overhead: on/off = {ratio:.4f}** (median over pairs; range {low:.4f} to {high:.4f}; ratio of the arms' "
        f"medians {result['ratio_of_medians']:.4f}). "
        f"Target ≤ {result['target_ratio']}: {'met' if result['within_target'] else 'NOT met'}.",
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in load_after)}{shared}. CPU pressure "
        "(share of a run during which some task waited for a CPU; the on arm's own sampler thread counts): median "
        + ", ".join(f"{arm} {v:.3f}" for arm, v in result["cpu_pressure_median"].items() if v is not None) + ".",
        "",
    ]
    return "\n".join(md)


if __name__ == "__main__":
    main()
