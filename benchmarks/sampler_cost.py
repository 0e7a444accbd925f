"""What memprof's background sampler costs a step, source by source and interval by interval, inside one process:
blocks of steps, each block under one sampling variant, the variants rotated from round to round so that a drifting
machine falls on all of them alike. Beside it, each source's read time and the sampler thread's CPU time (which
bounds the GIL it held: on a launch-bound GPU step that is what it can cost). ``tracker_overhead.py`` measures the
trackers as a whole; this says which part of them costs.

Variants: ``bare`` (no sampler); the sampler's thread waking every 10 ms and reading nothing (the cost of the
wake-ups alone); each source alone every 10 ms (host RSS; on CUDA the allocator's counters, NVML as the sampler
read it before (both figures every 100 ms) and each of NVML's two calls alone); what
``memprof.measure.readings.memory_sources`` samples, every 10 ms and every 50 ms. Workloads: ``cell`` (the suite
cell's training steps) or ``small-ops`` (each "step" 20,000 additions on a 16-value tensor, one thread: a stand-in
for a launch-bound GPU step on a CPU, where every op releases and retakes the GIL). Per variant: the median step
time over its blocks (each block's first step left out, and the whole first round) and the median over rounds of
its block median over the bare block's of that round.

    python benchmarks/sampler_cost.py --suite reference --device cuda --rounds 4 --block 8 --out DIR   # a GPU host
    python benchmarks/sampler_cost.py --workload small-ops --rounds 20 --block 4 --out results/benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from memprof import suite
from memprof.measure.allocator import CudaAllocator
from memprof.measure.host import rss_bytes
from memprof.measure.readings import NVML_PERIOD_S, memory_sources
from memprof.measure.sampler import Sampler, Source
from memprof.results import env
from memprof.train.loop import NullProbe
from memprof.train.training import Training, resolve_device

def timed(source: Source, reads: list[float]) -> Source:
    """``source`` with each read's duration appended to ``reads``."""
    def read() -> Sequence[int | None]:
        t0 = time.perf_counter()
        out = source.read()
        reads.append(time.perf_counter() - t0)
        return out

    return Source(source.columns, read, source.period_s, source.due)


def nvml_calls(device: torch.device) -> dict[str, Source]:
    """NVML as the sampler read it before (both calls every 100 ms) and each call alone; none without NVML."""
    cards = env.nvml_cards()
    if not cards:
        return {}
    import pynvml

    handle = cards[device.index or 0]

    def memory() -> tuple[int]:
        return (int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),)

    def processes() -> tuple[int]:
        return (len(pynvml.nvmlDeviceGetComputeRunningProcesses(handle)),)

    return {"nvml both @100ms": Source(("used", "processes"), lambda: memory() + processes(), NVML_PERIOD_S),
            "nvml memory @100ms": Source(("used",), memory, NVML_PERIOD_S),
            "nvml processes @100ms": Source(("processes",), processes, NVML_PERIOD_S)}


SMALL_OPS = 20_000


def variants(device: torch.device) -> dict[str, tuple[list[Source], float]]:
    """Each variant's sources and interval (no sources: no sampler)."""
    rss = Source(("rss_bytes",), lambda: (rss_bytes(),))
    out: dict[str, tuple[list[Source], float]] = {"bare": ([], 0.0),
                                                   "nothing @10ms": ([Source(("none",), lambda: (None,))], 0.01),
                                                   "rss @10ms": ([rss], 0.01)}
    if device.type == "cuda":
        out["allocator @10ms"] = ([Source(("allocated_bytes", "reserved_bytes"), CudaAllocator(device).current)], 0.01)
        out.update({name: ([source], 0.01) for name, source in nvml_calls(device).items()})
    out["shipped @10ms"] = (memory_sources(device).sources, 0.01)
    out["shipped @50ms"] = (memory_sources(device).sources, 0.05)
    return out


def small_ops(steps: int) -> list[float]:
    x = torch.ones(16)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for _ in range(SMALL_OPS):
            x.add(1.0)
        times.append(time.perf_counter() - t0)
    return times


def training_steps(built: Training) -> Callable[[int], list[float]]:
    return lambda steps: [log.step_time_s for log in built.train(NullProbe(), steps)]


def block(run: Callable[[int], list[float]], steps: int, sources: list[Source], interval_s: float,
          reads: list[float]) -> tuple[list[float], float, float]:
    """Step times of ``steps`` steps with a sampler over ``sources`` (none: no sampler), the first left out; the
    sampler thread's CPU seconds and the block's wall seconds."""
    sampler = Sampler([timed(s, reads) for s in sources], interval_s) if sources else None
    t0 = time.perf_counter()
    with sampler or nullcontext():
        times = run(steps)
    return times[1:], sampler.busy_s if sampler else 0.0, time.perf_counter() - t0


def measure(run: Callable[[int], list[float]], device: torch.device, rounds: int, steps: int,
            on_round: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    plan = variants(device)
    names = list(plan)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    reads: dict[str, list[float]] = {name: [] for name in names}
    busy: dict[str, list[float]] = {name: [0.0, 0.0] for name in names}  # sampler CPU s, wall s
    for r in range(rounds + 1):  # round 0 warms up every variant and is left out
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            step_times, cpu_s, wall_s = block(run, steps, *plan[name], reads[name])
            if r:
                times[name].append(step_times)
                busy[name][0] += cpu_s
                busy[name][1] += wall_s
        if r:
            on_round(summarise(times, reads, busy))
    return summarise(times, reads, busy)


def summarise(times: dict[str, list[list[float]]], reads: dict[str, list[float]],
              busy: dict[str, list[float]]) -> dict[str, Any]:
    bare = [statistics.median(b) for b in times["bare"]]
    out: dict[str, Any] = {}
    for name, blocks in times.items():
        medians = [statistics.median(b) for b in blocks]
        durations = sorted(reads[name])
        out[name] = {
            "sampler_cpu_share": busy[name][0] / busy[name][1] if busy[name][1] else 0.0,
            "median_step_s": statistics.median(t for b in blocks for t in b),
            "round_ratio_median": statistics.median(m / base for m, base in zip(medians, bare)),
            "round_ratios": [m / base for m, base in zip(medians, bare)],
            "reads": len(durations),
            "read_median_us": durations[len(durations) // 2] * 1e6 if durations else None,
            "read_p90_us": durations[int(len(durations) * 0.9)] * 1e6 if durations else None,
            "read_max_us": durations[-1] * 1e6 if durations else None,
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    gpu = f"{machine['gpus'][0]['name']}, " if result["device"] == "cuda" and machine["gpus"] else ""
    lines = [f"# What each sampled source costs a step ({gpu}{machine['cpu']}, {machine['cpu_count']} cores, "
             f"torch {machine['versions']['torch']})", "",
             f"Workload {result['workload']} on {result['device']}; {result['rounds']} rounds (after one left out) of "
             f"one block of {result['block_steps']} steps per variant (its first step left out), variants rotated "
             "from round to round. The sampler thread's CPU time over the blocks' wall time bounds the share of the "
             "GIL it held, which on a launch-bound step is what it can cost.", "",
             "| variant | median step | vs bare (median over rounds) | rounds' ratios | sampler thread CPU | reads | "
             "read median | read p90 | read max |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]

    def us(value: float | None) -> str:
        return "" if value is None else f"{value:,.0f} µs"

    for name, r in result["variants"].items():
        ratios = " ".join(f"{x:.3f}" for x in r["round_ratios"])
        lines.append(f"| {name} | {r['median_step_s'] * 1e3:.2f} ms | {r['round_ratio_median']:.4f} | {ratios} | "
                     f"{r['sampler_cpu_share']:.2%} | {r['reads']} | {us(r['read_median_us'])} | "
                     f"{us(r['read_p90_us'])} | {us(r['read_max_us'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("cell", "small-ops"), default="cell")
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--cell", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=8, help="steps per block, the first left out")
    parser.add_argument("--out", type=Path, required=True, help="folder for sampler_cost.{json,md}")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.workload == "cell":
        cell = suite.load(args.suite).cells[args.cell].with_values({"budget.device": device.type})
        run, workload = training_steps(Training(cell, device).build()), f"cell `{cell.key}`"
    else:
        torch.set_num_threads(1)
        device, run, workload = torch.device("cpu"), small_ops, f"small-ops ({SMALL_OPS:,} additions a step)"
    args.out.mkdir(parents=True, exist_ok=True)
    machine = env.capture()

    def write(variants_so_far: dict[str, Any]) -> None:
        result = {"machine": machine, "workload": workload, "device": device.type, "rounds": len(
            variants_so_far["bare"]["round_ratios"]), "block_steps": args.block, "variants": variants_so_far}
        (args.out / "sampler_cost.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "sampler_cost.md").write_text(markdown(result))
        print(markdown(result), flush=True)

    measure(run, device, max(args.rounds, 1), args.block, write)


if __name__ == "__main__":
    main()
