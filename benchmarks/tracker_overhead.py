"""What memprof's trackers cost a training step: one cell's step time with every tracker on against the same cell
run bare. Two designs, one figure each: the median over pairs of on/off, with a distribution-free 95% interval for
that median (the pairs' order statistics), so that a noisy machine says it cannot tell rather than a number.

- ``--design runs``: whole runs. on: ``memprof.run.launch.run_cell``, exactly as a suite runs a cell (``CellProbe``,
  the background ``Sampler``, the saved-activation and gradient snapshots at the last warm-up step, exact accounting
  after training); off: the same cell built the same way (``memprof.train.training.Training``) and trained with a
  ``NullProbe``, no sampler. Runs alternate off, on, off, on, ...; each is a child forked from this process after it
  imported the libraries and computed nothing, as memprof's zygote forks a worker per cell: every run starts from
  the same state, none inherits another's heap or pays (or skips) the one-time lazy initialisations of the first
  training step in a process, which would bias by position rather than by arm. A pair's figure is the on run's
  median step time (after the warm-up steps) over the off run's.
- ``--design blocks``: one forked child builds the cell once, trains its warm-up steps, then alternates blocks of
  ``--block`` steps, off and on, in off-on / on-off order (ABBA: a drift within a pair falls on both arms alike).
  on: the loop of a measured step of ``run_cell`` (its ``CellProbe``, no snapshot, and its ``Sampler`` over the
  sources and at the interval ``run_cell`` uses, with the allocator tracker on CUDA); off: ``NullProbe``, no
  sampler. A pair's figure is the on block's median step time over the off block's. A shared VM's step times drift
  in spells of several steps (86 to 148 ms within one run on the H200): whole runs a few seconds apart compare
  different spells, neighbouring blocks of a few steps mostly the same one.

On a CUDA host the parent imports as the zygote does, without initialising CUDA (``memprof.run.zygote.preload``),
and each child initialises CUDA itself, since a process that initialised CUDA cannot fork children that use the
GPU; the parent never runs a parallel op (libgomp is not fork-safe afterwards). Writes
tracker_overhead{,_blocks}.{json,md} to ``--out`` (default results/benchmarks) after every pair, so that a run
stopped early keeps the pairs it finished.

    python benchmarks/tracker_overhead.py [--pairs 10] [--steps 30] [--suite quick] [--cell 0] [--device cpu]
    python benchmarks/tracker_overhead.py --design blocks --pairs 60 --block 3
    python benchmarks/tracker_overhead.py --suite reference --design blocks --pairs 60 --block 2 --out DIR  # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from memprof.run.zygote import preload  # first: it asks torch to count GPUs through NVML, without initialising CUDA
from memprof import suite
from memprof.analysis.stats import median_interval
from memprof.config.spec import CellConfig
from memprof.measure.load import CpuPressure
from memprof.measure.readings import NVML_IDLE_S, NVML_PERIOD_S, SAMPLE_INTERVAL_S
from memprof.results import env
from memprof.run import processes

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks"
TARGET_RATIO = {"cpu": 1.02, "cuda": 1.01}  # issue #20


def run_arm(arm: str, cell: CellConfig, out: TextIO) -> None:
    """One run of ``arm`` (design runs): writes its measured (post-warm-up) step times, in seconds."""
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
    json.dump(times[cell.training.warmup_steps:], out)
    out.write("\n")


def run_blocks(cell: CellConfig, pairs: int, block: int, out: TextIO) -> None:
    """Design blocks: writes a line ``{"off": [...], "on": [...]}`` of step times (s) per pair as it ends."""
    from memprof.measure.probe import CellProbe
    from memprof.measure.readings import memory_sources, sample_interval
    from memprof.measure.sampler import Sampler
    from memprof.train.loop import NullProbe, Probe
    from memprof.train.training import Training, resolve_device

    device = resolve_device(cell.budget.device)
    built = Training(cell, device).build()
    measured = memory_sources(device)
    interval = sample_interval(device)

    def steps(n: int, probe: Probe) -> list[float]:
        return [log.step_time_s for log in built.train(probe, n)]

    def on() -> list[float]:
        with Sampler(measured.sources, interval) as sampler, measured.allocator or nullcontext():
            return steps(block, CellProbe(built.model, sampler, measured.allocator, snapshot_step=-1))

    arms: dict[str, Callable[[], list[float]]] = {"off": lambda: steps(block, NullProbe()), "on": on}
    steps(cell.training.warmup_steps, NullProbe())
    for pair in range(pairs):
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        times = {arm: arms[arm]() for arm in order}
        out.write(json.dumps({"off": times["off"], "on": times["on"]}) + "\n")
        out.flush()


def forked(work: Callable[[TextIO], None], log: Path) -> Iterator[Any]:
    """Run ``work`` in a child forked from this (import-only, CUDA-clean) process; yield each JSON line it writes."""
    read_fd, write_fd = os.pipe()

    def child() -> int:
        os.close(read_fd)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with os.fdopen(write_fd, "w") as out:
            work(out)
        return 0

    sys.stdout.flush()  # or the child's log gets a copy of what this process has not printed yet
    pid = processes.fork(child)
    os.close(write_fd)
    with os.fdopen(read_fd) as answer:
        for line in answer:
            yield json.loads(line)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"the run {processes.describe_exit(code)}; see {log}:\n{log.read_text()[-2000:]}")


def design_runs(cell: CellConfig, pairs: int, tmp: Path) -> Iterator[dict[str, Any]]:
    for pair in range(pairs):
        row: dict[str, Any] = {"pair": pair}
        for arm in ("off", "on"):
            with CpuPressure() as pressure:
                t0 = time.perf_counter()
                (row[arm],) = forked(lambda out, arm=arm: run_arm(arm, cell, out), tmp / f"{pair}-{arm}.log")
                row[f"{arm}_wall_s"] = time.perf_counter() - t0
            row[f"{arm}_cpu_pressure"] = pressure.share
        yield row


def design_blocks(cell: CellConfig, pairs: int, block: int, tmp: Path) -> Iterator[dict[str, Any]]:
    for pair, row in enumerate(forked(lambda out: run_blocks(cell, pairs, block, out), tmp / "blocks.log")):
        yield {"pair": pair, **row}


def summarise(pairs: list[dict[str, Any]], cell: CellConfig, device: str, design: str, block: int,
              machine: dict[str, Any], load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The figures of the pairs run so far."""
    off = [statistics.median(p["off"]) for p in pairs]
    on = [statistics.median(p["on"]) for p in pairs]
    ratios = [b / a for a, b in zip(off, on)]
    ratio, interval = statistics.median(ratios), median_interval(ratios)
    target = TARGET_RATIO[device]
    verdict = ("met" if interval[1] <= target else "NOT met" if interval[0] > target
               else "undecided: the interval holds the target") if interval else "undecided: too few pairs"
    return {
        "machine": {k: machine[k] for k in ("host", "platform", "cpu", "cpu_count", "memory_bytes", "gpus",
                                            "versions", "git_revision", "git_dirty")},
        "cell": cell.key,
        "device": device,
        "design": design,
        "block_steps": block if design == "blocks" else None,
        "steps": cell.training.steps if design == "runs" else None,
        "warmup_steps": cell.training.warmup_steps,
        "pairs": len(ratios),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "off_median_step_s": statistics.median(off),
        "on_median_step_s": statistics.median(on),
        "ratio_of_medians": statistics.median(on) / statistics.median(off),
        "pair_ratio_median": ratio,
        "pair_ratio_interval95": interval,
        "pair_ratio_min": min(ratios),
        "pair_ratio_max": max(ratios),
        "target_ratio": target,
        "within_target": ratio <= target,
        "verdict": verdict,
        "pair_runs": pairs,
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
    interval = result["pair_ratio_interval95"]
    if result["design"] == "runs":
        how = (f"{result['pairs']} pairs of runs of {result['steps']} steps (the first {result['warmup_steps']} left "
               "out) alternating off, on, each run in a child forked from an import-only parent (as memprof's zygote "
               "runs cells); a pair's figure is the on run's median step over the off run's.")
        arms = [f"- **on**: `run_cell`: CellProbe, background Sampler ({sampled}), snapshots, exact accounting.",
                "- **off**: the same cell built the same way, trained with a `NullProbe`, no sampler."]
    else:
        how = (f"one child forked from an import-only parent builds the cell, trains {result['warmup_steps']} "
               f"warm-up steps, then {result['pairs']} pairs of blocks of {result['block_steps']} steps, off-on and "
               "on-off in turn; a pair's figure is the on block's median step over the off block's.")
        arms = [f"- **on**: a measured step of `run_cell`: CellProbe (no snapshot), background Sampler ({sampled}).",
                "- **off**: the same model and optimizer, trained with a `NullProbe`, no sampler."]
    span = f"95% interval for the median {interval[0]:.4f} to {interval[1]:.4f}; " if interval else ""
    md = [
        f"# Tracker overhead per training step, design {result['design']} ({gpu}{machine['cpu']}, "
        f"{machine['cpu_count']} cores, host {machine['host']}, torch {machine['versions']['torch']})",
        "",
        f"Cell `{result['cell']}` ({suite_name} suite, cell {index}, {where}): {how}",
        "",
        *arms,
        "",
        "| arm | median step time (median over pairs) | pairs |",
        "| --- | ---: | ---: |",
        f"| off | {result['off_median_step_s'] * 1e3:.2f} ms | {result['pairs']} |",
        f"| on | {result['on_median_step_s'] * 1e3:.2f} ms | {result['pairs']} |",
        "",
        f"**Overhead: on/off = {ratio:.4f}** (median over pairs; {span}range {low:.4f} to {high:.4f}; ratio of the "
        f"arms' medians {result['ratio_of_medians']:.4f}). Target ≤ {result['target_ratio']}: {result['verdict']}. "
        "The interval is this run's: it covers the noise from pair to pair, not a machine whose state changes "
        "between runs.",
        "",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in load_after)}{shared}.",
        "",
    ]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--design", choices=("runs", "blocks"), default="runs")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30,
                        help="design runs: steps per run, the suite's warm-up steps among them (left out)")
    parser.add_argument("--block", type=int, default=3, help="design blocks: steps per block")
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--cell", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda on a CUDA host, else cpu")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for tracker_overhead{,_blocks}.{json,md}")
    args = parser.parse_args()
    has_cuda = preload()
    device = args.device or ("cuda" if has_cuda else "cpu")
    if device == "cuda" and not has_cuda:
        raise SystemExit("--device cuda: this host has no CUDA device")
    cell = suite.load(args.suite).cells[args.cell].with_values({"budget.device": device, "training.steps": args.steps})

    machine = env.capture()  # NVML only: CUDA stays uninitialised here
    load_before = os.getloadavg()
    stem = "tracker_overhead" + ("_blocks" if args.design == "blocks" else "")
    pairs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = (design_runs(cell, args.pairs, Path(tmp)) if args.design == "runs"
                else design_blocks(cell, args.pairs, args.block, Path(tmp)))
        for row in rows:
            pairs.append(row)
            print(f"pair {row['pair']}: median step off {statistics.median(row['off']) * 1e3:.2f} ms, on "
                  f"{statistics.median(row['on']) * 1e3:.2f} ms", flush=True)
            result = summarise(pairs, cell, device, args.design, args.block, machine, load_before)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
            (args.out / f"{stem}.md").write_text(markdown(result, args.suite, args.cell, machine))
    print(markdown(result, args.suite, args.cell, machine))


if __name__ == "__main__":
    main()
