"""Setup time and host memory of building a cell's model and adapter, one fresh process per case.

Cases, on the CPU:
- Llama-3.2-1B LoRA and QLoRA as the reference suite builds them (bf16, r=16 all-linear, adamw_torch): setup is
  ``memprof.train.training.Training.build``, what a record's ``setup_s`` covers (model, adapter, optimizer, data),
  with the time of its parts (materialising, peft's k-bit preparation, get_peft_model); ``REPEATS`` fresh processes
  each, the host being shared;
- Llama-3.1-8B QLoRA, batch 1 x 64 (benchmarks/setup_time_8b.toml), built and trained 2 steps through
  ``memprof.run.launch.run_cell``, to show it fits this host: without and with gradient checkpointing, each under
  glibc's default malloc and with its mmap threshold fixed at 1 MiB (``GLIBC_TUNABLES``); and the checkpointed
  cell trained by memprof's loop with nothing observing it, to tell what the harness adds;
- transformers' own loader (``from_pretrained`` with a ``BitsAndBytesConfig``, memprof's route for a local
  checkpoint) on saved small-llama and 1B checkpoints, beside memprof's build of the same model;
- what initialising the 1B's weights costs each way, one thread as memprof.train.materialize runs: allocating and
  zeroing (the floor), normal_ per element, the tiled block, and for its 4-bit linears bf16 normal_ +
  bitsandbytes' quantize_4bit against random_params4bit;
- peft's prepare_model_for_kbit_training on a materialised 1B and 8B 4-bit base: the time and host memory of its
  fp32 cast of the embeddings, norms and head.

Each case runs as ``python benchmarks/setup_time.py --worker CASE`` with PYTHONPATH set to the memprof tree
measured, after the imports a worker forked from memprof's zygote already has (``memprof.run.zygote.preload``);
``--before REV`` measures a git revision too (exported with ``git archive``), the same way. Peak RSS is the
kernel's high-water mark (``ru_maxrss``, and ``VmHWM``, which unlike ``ru_maxrss`` does not inherit a spawning
parent's). Writes results/benchmarks/setup_time.{json,md}.

    python benchmarks/setup_time.py [--before b484a1e] [--skip-8b] [--partial cases.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "results" / "benchmarks"
SUITE_8B = Path(__file__).resolve().parent / "setup_time_8b.toml"
GB = 1e9
# Targets from the issue: extra host memory allowed over the model's own frozen + trainable bytes (the 8B's over
# the whole run, build and steps).
SLACK = {"llama-3.2-1b qlora": 1.0 * GB}
SLACK_8B = 1.5 * GB
FIXED_MMAP = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}
# the 8B cases: the suite's cell (checkpointing off, on) and the environment it runs under
# (cell index, environment, case: "run" through memprof's worker path, "plain" with nothing observing)
EIGHT_B = {"checkpointing off": (0, {}, "run"), "checkpointing on": (1, {}, "run"),
           "checkpointing off, mmap threshold 1 MiB": (0, FIXED_MMAP, "run"),
           "checkpointing on, mmap threshold 1 MiB": (1, FIXED_MMAP, "run"),
           "checkpointing on, no trackers (plain loop)": (1, {}, "plain")}
TIME_TARGET_S = {"llama-3.2-1b lora": 3.0, "llama-3.2-1b qlora": 5.0}
# small-llama as asked; its 24 MB of weights are near a process's noise, so also the 1B
CHECKPOINTS = ("small-llama", "llama-3.2-1b")
REPEATS = 3


# ---- worker side: one case in this process ----

def _reference_cell(adapter: str) -> Any:
    from memprof import suite

    cell = next(c for c in suite.load("reference").cells
                if c.adapter.kind == adapter and c.optimizer.label == "adamw_torch")
    return cell.with_values({"budget.device": "cpu"})


def _bytes(model: Any) -> dict[str, int]:
    from memprof.measure.accounting import weight_bytes

    w = weight_bytes(model)
    return {"frozen_bytes": w.frozen.total, "trainable_bytes": w.trainable.total, "buffer_bytes": w.buffers.total}


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status (VmHWM, RssAnon, ...), in bytes."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def work(case: str, arg: str) -> dict[str, Any]:
    """Run one case after the zygote's imports; the figures as a dict. Anonymous RSS is sampled beside it: the
    high-water mark also counts file pages mapped in (a safetensors checkpoint), which the kernel can drop."""
    from memprof.measure.host import high_water_bytes
    from memprof.run.zygote import preload

    preload()
    out: dict[str, Any] = {"loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
                           "rss_before_bytes": _status_bytes("VmRSS")}
    with _Highest(lambda: _status_bytes("RssAnon")) as anon:
        out.update(CASES[case](arg))
    out.update(ru_maxrss_bytes=high_water_bytes(),
               vm_hwm_bytes=_status_bytes("VmHWM"), case_peak_rss_anon_bytes=anon.value,
               loadavg_after=Path("/proc/loadavg").read_text().split()[:3])
    out.setdefault("peak_rss_bytes", out["vm_hwm_bytes"])
    out.setdefault("peak_rss_anon_bytes", out["case_peak_rss_anon_bytes"])
    return out


class _Highest:
    """The highest value ``read()`` gave, read every 10 ms on a thread of its own while the block runs. This
    script's own sampler, not memprof's: it runs against any revision's memprof (``--before``)."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read, self.value = read, read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.value = max(self.value, self.read())

    def __enter__(self) -> _Highest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.value = max(self.value, self.read())


def _timed(owner: Any, name: str, times: dict[str, float]) -> None:
    """Wrap ``owner.name`` so that the seconds spent in it add up in ``times[name]``."""
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def _build(adapter: str) -> dict[str, Any]:
    """A reference-suite cell's ``Training.build`` on the CPU, with the seconds of its parts."""
    import peft
    import torch

    from memprof.train import models
    from memprof.train.training import Training

    parts: dict[str, float] = {}
    for owner, name in ((models, "build_model"), (models, "materialize"), (peft, "prepare_model_for_kbit_training"),
                        (peft, "get_peft_model")):
        if hasattr(owner, name):  # a revision without memprof.train.materialize
            _timed(owner, name, parts)
    t0 = time.perf_counter()
    built = Training(_reference_cell(adapter), torch.device("cpu")).build()
    return {"setup_s": time.perf_counter() - t0, "parts_s": parts, **_bytes(built.model)}


def _run(cell: str) -> dict[str, Any]:
    """A suite's cell (``FILE#INDEX``) through ``run_cell``, as memprof's worker runs it."""
    from memprof import suite
    from memprof.run.launch import run_cell

    suite_file, index = cell.rsplit("#", 1)
    result = run_cell(suite.load(suite_file).cells[int(index)])
    r = result.record
    return {"setup_s": r.setup_s, "status": r.status.value, "error": r.error, "frozen_bytes": r.frozen_weight_bytes,
            "trainable_bytes": r.trainable_weight_bytes, "base_bf16_bytes": 2 * (r.total_params - r.trainable_params),
            "losses": [s["loss"] for s in result.steps], "step_time_s": [s["step_time_s"] for s in result.steps],
            "record_peak_rss_bytes": r.peak_rss_bytes, "gradient_checkpointing": r.config.levers.gradient_checkpointing,
            **_timeline_figures(result.timeline)}


def _timeline_figures(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """What an 8B case's RSS samples (memprof's Sampler rows) say: the setup's own peak (the samples until the first
    step; anonymous RSS is sampled over the whole case only), and where the highest sample fell, with glibc's free
    heap there, under this process's malloc settings."""
    highest = max(timeline, key=lambda row: row["rss_bytes"])
    return {"heap_free_at_highest_sample_bytes": highest.get("heap_free_bytes"),
            "highest_sample_phase": f"{highest['phase']}" + (f"@{highest['step']}" if highest["step"] >= 0 else ""),
            "malloc": os.environ.get("GLIBC_TUNABLES", "default"),
            "peak_rss_bytes": max(row["rss_bytes"] for row in timeline if row["phase"] == "setup"),
            "peak_rss_anon_bytes": None}


def _plain(cell: str) -> dict[str, Any]:
    """A suite's cell (``FILE#INDEX``) built as memprof builds it and trained by memprof's loop with nothing
    observing it (``NullProbe``: no trackers, no snapshots), as a user's own loop runs: its high-water mark and
    glibc's free heap at its highest RSS sample, beside ``_run``'s, tell what the harness adds."""
    import torch

    from memprof import suite
    from memprof.measure.readings import memory_sources
    from memprof.measure.sampler import Sampler
    from memprof.train.loop import NullProbe
    from memprof.train.training import Training

    suite_file, index = cell.rsplit("#", 1)
    config = suite.load(suite_file).cells[int(index)]
    sampler = Sampler(memory_sources(torch.device("cpu")).sources, 0.01)
    with sampler:
        t0 = time.perf_counter()
        built = Training(config, torch.device("cpu")).build()
        setup_s = time.perf_counter() - t0
        sampler.mark(-1, "training")  # no step to name: the plain loop tells the sampler nothing
        logs = built.train(NullProbe())
    return {"setup_s": setup_s, "status": "ok", **_bytes(built.model), "losses": [log.loss for log in logs],
            "step_time_s": [log.step_time_s for log in logs],
            "gradient_checkpointing": config.levers.gradient_checkpointing, **_timeline_figures(sampler.timeline)}


def _load_4bit(checkpoint: str, pretrained: bool) -> dict[str, Any]:
    """A saved checkpoint through transformers' 4-bit loader, or its architecture through memprof.train.materialize."""
    import torch

    from memprof.config.spec import ModelSpec
    from memprof.suite.schema import AdapterTable
    from memprof.train import models

    qlora = AdapterTable(kind="qlora", r=16, alpha=32, target_modules="all-linear",
                         compute_dtype="bfloat16").to_spec("qlora")
    spec = (ModelSpec(name="checkpoint", path=checkpoint) if pretrained
            else ModelSpec.model_validate_json(Path(checkpoint, "spec.json").read_text()))
    t0 = time.perf_counter()
    model = models.build_model(spec, qlora, "bf16", torch.device("cpu"))
    return {"setup_s": time.perf_counter() - t0, **_bytes(model)}


def _save(checkpoint: str) -> dict[str, Any]:
    """The model of ``checkpoint``/spec.json, saved there as a bf16 checkpoint."""
    import torch

    from memprof.config.spec import ModelSpec
    from memprof.suite.schema import AdapterTable
    from memprof.train import models

    spec = ModelSpec.model_validate_json(Path(checkpoint, "spec.json").read_text())
    model = models.build_model(spec, AdapterTable(kind="none").to_spec("none"), "bf16", torch.device("cpu"))
    model.save_pretrained(checkpoint)
    return {"bf16_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def _init_cost(preset: str) -> dict[str, Any]:
    """Seconds to make ``preset``'s weights each way, one at a time, each in a fresh tensor (its first-touch page
    faults included), on one thread as memprof.train.materialize runs: the weights an adapter leaves frozen in bf16
    (every linear but a tied head, and the embeddings) and its 4-bit linears."""
    import bitsandbytes.functional as bnb_f
    import torch
    from bitsandbytes.nn import Params4bit
    from transformers import AutoModelForCausalLM

    from memprof.config.spec import ModelSpec
    from memprof.train import models
    from memprof.train.fourbit import random_params4bit
    from memprof.train.materialize import _Init

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.build_config(ModelSpec(name=preset, preset=preset)))
    head = model.get_output_embeddings()
    linears = [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    frozen = [*linears, model.get_input_embeddings().weight.shape]
    if head.weight is not model.get_input_embeddings().weight:
        frozen.append(head.weight.shape)
    init = _Init(torch.device("cpu"), tile=True)

    def seconds(shapes: list[torch.Size], make: Any) -> float:
        t0 = time.perf_counter()
        for shape in shapes:
            make(shape)
        return time.perf_counter() - t0

    def bf16(shape: torch.Size) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16)

    def old_four_bit(shape: torch.Size) -> Any:
        return bnb_f.quantize_4bit(bf16(shape).normal_(0.0, 0.02), quant_type="nf4", compress_statistics=True)

    def new_four_bit(shape: torch.Size) -> Any:
        settings = Params4bit(torch.empty(shape, dtype=torch.bfloat16, device="meta"), quant_type="nf4",
                              compress_statistics=True)
        return random_params4bit(settings, init.pool(settings, 0.0, 0.02), init.generator)

    return {"frozen_params": sum(s.numel() for s in frozen), "linear_params": sum(s.numel() for s in linears),
            "linears": len(linears), "threads": torch.get_num_threads(),
            "frozen_zeros_s": seconds(frozen, lambda s: bf16(s).zero_()),
            "frozen_normal_s": seconds(frozen, lambda s: bf16(s).normal_(0.0, 0.02)),
            "frozen_tiled_s": seconds(frozen, lambda s: init.fill(bf16(s), 0.0, 0.02)),
            "four_bit_quantize_s": seconds(linears, old_four_bit),
            "four_bit_random_s": seconds(linears, new_four_bit)}


def _kbit_cast(preset: str) -> dict[str, Any]:
    """peft's ``prepare_model_for_kbit_training`` on ``preset``'s materialised 4-bit base (no adapter yet), as
    ``memprof.train.models.attach_adapter`` calls it: seconds, the bf16 bytes it casts, and the host RSS before,
    at its peak (VmHWM restarted just before) and after."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from memprof.config.spec import ModelSpec, QuantSpec
    from memprof.train import models
    from memprof.train.materialize import materialize

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(models.build_config(ModelSpec(name=preset, preset=preset)),
                                                 dtype=torch.bfloat16)
    models.quantize_linears_4bit(model, QuantSpec(compute_dtype="bfloat16"))
    materialize(model, torch.device("cpu"), frozen=True)
    cast = [p for p in model.parameters() if p.dtype == torch.bfloat16 and type(p).__name__ != "Params4bit"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return {"cast_s": time.perf_counter() - t0, "cast_params": sum(p.numel() for p in cast),
            "largest_cast_params": max(p.numel() for p in cast), "rss_before_cast_bytes": before,
            "rss_peak_cast_bytes": _status_bytes("VmHWM"), "rss_after_cast_bytes": _status_bytes("VmRSS")}


CASES = {"build": _build, "run": _run, "plain": _plain, "save": _save, "init": _init_cost, "kbit": _kbit_cast,
         "pretrained": lambda checkpoint: _load_4bit(checkpoint, pretrained=True),
         "materialized": lambda checkpoint: _load_4bit(checkpoint, pretrained=False)}


# ---- parent side: one process per case, a table ----

def run_case(source: Path, case: str, arg: str, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": str(source)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", case, arg], env=env,
                          capture_output=True, text=True, cwd=source, check=False)
    if proc.returncode != 0:
        return {"failed": proc.stderr[-3000:], "process_s": time.perf_counter() - t0}
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - t0
    print(case, arg if len(arg) < 40 else "...", json.dumps(figures)[:400], flush=True)
    return figures


class Partial:
    """Figures of the cases finished so far, kept in a file so that a run cut short (a shared host's other work
    may end it) goes on where it stopped: ``get(key, measure)`` measures only what the file lacks."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: dict[str, Any] = json.loads(path.read_text()) if path and path.exists() else {}

    def get(self, key: str, measure: Any) -> Any:
        if key not in self.done:
            self.done[key] = measure()
            if self.path:
                self.path.write_text(json.dumps(self.done))
        return self.done[key]


def measure(source: Path, label: str, skip_8b: bool, repeats: int, partial: Partial) -> dict[str, Any]:
    cases: dict[str, Any] = {f"llama-3.2-1b {a}": [partial.get(f"{label} build {a} {i}",
                                                               lambda a=a: run_case(source, "build", a))
                                                   for i in range(repeats)]
                             for a in ("lora", "qlora")}
    if not skip_8b:
        cases["llama-3.1-8b qlora"] = {
            name: partial.get(f"{label} run 8b {name}",
                              lambda i=index, e=extra, c=case: run_case(source, c, f"{SUITE_8B}#{i}", e))
            for name, (index, extra, case) in EIGHT_B.items()}
    return cases


def checkpoint_cases(source: Path, preset: str) -> dict[str, dict[str, Any]]:
    """A bf16 checkpoint of ``preset`` saved by one process, loaded 4-bit by transformers' loader in another and
    built 4-bit by memprof in a third."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "spec.json").write_text(json.dumps({"name": preset, "preset": preset}))
        saved = run_case(source, "save", tmp)
        return {"save": saved, "from_pretrained 4-bit": run_case(source, "pretrained", tmp),
                "memprof materialize 4-bit": run_case(source, "materialized", tmp)}


def export(rev: str, into: Path) -> Path:
    """The memprof package of git revision ``rev``, as a tree of its own (nothing checked out)."""
    archive = subprocess.run(["git", "archive", rev, "memprof"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "ARG"), help=argparse.SUPPRESS)
    parser.add_argument("--before", metavar="REV", help="also measure this git revision's memprof")
    parser.add_argument("--skip-8b", action="store_true", help="leave out the 8B cell (minutes on a CPU)")
    parser.add_argument("--partial", type=Path, help="keep finished cases in this file, and reuse those it holds")
    parser.add_argument("--render", action="store_true",
                        help="only write setup_time.md again from setup_time.json (with its 'notes', if any)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(*args.worker)))
        return
    if args.render:
        (OUT / "setup_time.md").write_text(markdown(json.loads((OUT / "setup_time.json").read_text())))
        return

    from memprof.results import env

    machine = env.capture()
    partial = Partial(args.partial)
    result: dict[str, Any] = {
        "machine": {**{k: machine[k] for k in ("host", "cpu", "cpu_count", "memory_bytes", "platform", "python",
                                               "versions", "git_revision")},
                    "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]},
        "after": measure(REPO, "after", args.skip_8b, REPEATS, partial),
        "checkpoint": {preset: partial.get(f"checkpoint {preset}", lambda p=preset: checkpoint_cases(REPO, p))
                       for preset in CHECKPOINTS},
        "init": partial.get("init", lambda: run_case(REPO, "init", "llama-3.2-1b")),
        "kbit": {preset: partial.get(f"kbit {preset}", lambda p=preset: run_case(REPO, "kbit", p))
                 for preset in ("llama-3.2-1b", "llama-3.1-8b")},
    }
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            result["before"] = {"revision": args.before,
                                **measure(export(args.before, Path(tmp)), f"before {args.before}", skip_8b=True,
                                          repeats=1, partial=partial)}
    result["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "setup_time.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (OUT / "setup_time.md").write_text(md)
    print(md)


def _gb(n: float | None) -> str:
    return "—" if n is None else f"{n / GB:.2f} GB"


def _median(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = sorted((f for f in runs if "failed" not in f), key=lambda f: f["setup_s"])
    return ok[len(ok) // 2] if ok else None


def _verdicts(name: str, runs: list[dict[str, Any]]) -> str:
    ok = [f for f in runs if "failed" not in f]
    out = []
    if name in TIME_TARGET_S:
        met = sum(f["setup_s"] <= TIME_TARGET_S[name] for f in ok)
        out.append(f"setup ≤ {TIME_TARGET_S[name]:.0f} s: {'met' if met == len(runs) else 'missed'} "
                   f"({met}/{len(runs)} runs)")
    if name in SLACK:
        met = sum(f["peak_rss_bytes"] <= f["frozen_bytes"] + f["trainable_bytes"] + SLACK[name] for f in ok)
        out.append(f"peak ≤ frozen + trainable + {SLACK[name] / GB:.1f} GB: "
                   f"{'met' if met == len(runs) else 'missed'} ({met}/{len(runs)} runs)")
    return "; ".join(out)


def _row(label: str, name: str, runs: list[dict[str, Any]]) -> str:
    failed = [f for f in runs if "failed" in f]
    if failed:
        return f"| {label} | {name} | failed: {failed[0]['failed'].splitlines()[-1][:120]} | | | | | | | |"
    m = _median(runs)
    assert m is not None
    each = " / ".join(f"{f['setup_s']:.1f}" for f in runs)
    return (f"| {label} | {name} | {each} s | {m['setup_s']:.1f} s | "
            f"{_gb(max(f['peak_rss_bytes'] for f in runs))} | "
            f"{_gb(max((f['peak_rss_anon_bytes'] or 0) for f in runs) or None)} | {_gb(m['rss_before_bytes'])} | "
            f"{_gb(m['frozen_bytes'])} + {_gb(m['trainable_bytes'])} | "
            f"{' / '.join(f['loadavg_before'][0] for f in runs)} | {_verdicts(name, runs)} |")


def _parts(label: str, name: str, f: dict[str, Any]) -> str:
    p = f.get("parts_s", {})
    build = p.get("build_model", 0.0)
    inside = sum(p.get(k, 0.0) for k in ("materialize", "prepare_model_for_kbit_training", "get_peft_model"))
    cells = [p.get(k) for k in ("materialize", "prepare_model_for_kbit_training", "get_peft_model")]
    return (f"| {label} | {name} | {f['setup_s']:.2f} s | "
            + " | ".join("—" if c is None else f"{c:.2f} s" for c in cells)
            + f" | {build - inside:.2f} s | {f['setup_s'] - build:.2f} s |")


def _eight_b(cases: dict[str, dict[str, Any]]) -> list[str]:
    """The 8B cell's table: setup, the setup's and the whole run's peaks against the target, per case."""
    lines = ["", ("Llama-3.1-8B QLoRA (benchmarks/setup_time_8b.toml: r=16 all-linear, adamw_torch, b1 x 64, 2 steps) "
                  "through `run_cell` (the plain loop: built the same way, trained with nothing observing it), one "
                  "fresh process per case. Setup peak: memprof's 10 ms RSS samples until the first step; whole run: "
                  "the process's high-water mark (VmHWM), imports included; heap free: glibc's free heap (mallinfo2) "
                  "at the highest RSS sample."), "",
             ("| case | malloc | setup | setup peak | whole-run peak | highest sample in | heap free there | "
              "frozen + trainable | losses | step times | whole run ≤ frozen + trainable + 1.5 GB |"),
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- |"]
    for name, f in cases.items():
        if "failed" in f:
            lines.append(f"| {name} | failed: {f['failed'].splitlines()[-1][:120]} | | | | | | | | | |")
            continue
        weights = f["frozen_bytes"] + f["trainable_bytes"]
        met = f["vm_hwm_bytes"] <= weights + SLACK_8B
        lines.append(f"| {name} | {f['malloc']} | {f['setup_s']:.1f} s | {_gb(f['peak_rss_bytes'])} | "
                     f"{_gb(f['vm_hwm_bytes'])} | {f['highest_sample_phase']} | "
                     f"{_gb(f['heap_free_at_highest_sample_bytes'])} | {_gb(f['frozen_bytes'])} + "
                     f"{_gb(f['trainable_bytes'])} | {', '.join(f'{x:.3f}' for x in f['losses'])} | "
                     f"{', '.join(f'{x:.0f} s' for x in f['step_time_s'])} | "
                     f"{'met' if met else 'missed'} ({_gb(weights + SLACK_8B)}) |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k in
                         ("torch", "transformers", "peft", "bitsandbytes"))
    after_rev = m["git_revision"][:12]
    lines = [
        f"# Setup time and host memory of a cell's build ({m['cpu']}, {m['cpu_count']} cores, CPU device)",
        "",
        (f"{versions}; Python {m['python']}; memprof {after_rev}. The host is shared with other work: load average "
         f"(1 min) {m['loadavg_start'][0]} at the start, {m['loadavg_end'][0]} at the end, and each case's own "
         "below; times are what a cell saw on it, not an idle machine's."),
        "",
        ("Setup = `memprof.train.training.Training.build` (model, adapter, optimizer, data) in a fresh process, "
         "after the imports a zygote worker already has, with the threads a one-job run gives a cell (all cores). "
         "Peak RSS is the process's high-water mark (VmHWM), imports included, the largest over the runs; peak anon is "
         "the sampled peak of anonymous RSS (no file pages). A target is met when every run meets it."),
        "",
        ("| build | case | setup, each run | median | peak RSS | peak anon | RSS after imports | frozen + trainable "
         "| load (1 min) before each | targets |"),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    builds = [(f"after ({after_rev})", result["after"])]
    if "before" in result:
        builds.insert(0, (f"before ({result['before']['revision']})",
                          {k: v for k, v in result["before"].items() if k != "revision"}))
    for label, cases in builds:
        lines += [_row(label, name, runs) for name, runs in cases.items() if isinstance(runs, list)]
    lines += ["", "Where the setup's time goes (the median run; seconds inside each call):", "",
              ("| build | case | setup | materialize | prepare_model_for_kbit_training | get_peft_model | rest of "
               "build_model (meta build, 4-bit swap) | optimizer, data |"),
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, cases in builds:
        for name, runs in cases.items():
            median = _median(runs) if isinstance(runs, list) else None
            if median:
                lines.append(_parts(label, name, median))
    eight = result["after"].get("llama-3.1-8b qlora")
    if eight:
        lines += _eight_b(eight)
    q = result.get("init")
    if q and "failed" not in q:
        lines += ["", (f"What making llama-3.2-1b's weights costs each way, one at a time into fresh tensors "
                       f"(first-touch page faults included), on {q['threads']} thread as materialize runs:"), "",
                  ("| weights | parameters | allocate + zero (floor) | normal_ per element | tiled block | "
                  "bf16 normal_ + quantize_4bit | random_params4bit |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                  (f"| frozen bf16 (LoRA base: linears, embeddings) | {q['frozen_params'] / 1e9:.2f} B | "
                   f"{q['frozen_zeros_s']:.2f} s | {q['frozen_normal_s']:.2f} s | {q['frozen_tiled_s']:.2f} s | | |"),
                  (f"| 4-bit NF4, double quantisation ({q['linears']} linears) | {q['linear_params'] / 1e9:.2f} B | "
                   f"| | | {q['four_bit_quantize_s']:.1f} s | {q['four_bit_random_s']:.2f} s |")]
    kbit = result.get("kbit", {})
    if kbit:
        lines += ["", ("peft's `prepare_model_for_kbit_training` casts every 16-bit parameter that is not 4-bit "
                       "(embeddings, norms, an untied head) to fp32, one at a time: each new fp32 copy coexists "
                       "with its bf16 original until the assignment frees it. What the cast costs where it runs "
                       "(a checkpoint loaded in bf16; memprof's preset builds make those parameters fp32 and leave "
                       "it nothing to cast), on a materialised bf16 4-bit base, no adapter yet:"), "",
                  ("| model | bf16 parameters cast (largest) | cast time | RSS before | peak during | after | "
                  "peak − after |"),
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for preset, f in kbit.items():
            if "failed" in f:
                lines.append(f"| {preset} | failed | | | | | |")
                continue
            lines.append(f"| {preset} | {f['cast_params'] / 1e9:.3f} B ({f['largest_cast_params'] / 1e9:.3f} B) | "
                         f"{f['cast_s']:.2f} s | {_gb(f['rss_before_cast_bytes'])} | {_gb(f['rss_peak_cast_bytes'])} "
                         f"| {_gb(f['rss_after_cast_bytes'])} | "
                         f"{_gb(f['rss_peak_cast_bytes'] - f['rss_after_cast_bytes'])} |")
    lines += ["", ("A local checkpoint (bf16, saved with save_pretrained) built 4-bit on the CPU with a QLoRA "
                   "adapter: transformers' loader (memprof's route for a `path` model) beside "
                   "memprof.train.materialize for the same architecture (random weights, not the checkpoint's):"), "",
              "| checkpoint | loader | time | peak RSS | peak anon | RSS after imports | frozen + trainable |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for preset, c in result["checkpoint"].items():
        for name in ("from_pretrained 4-bit", "memprof materialize 4-bit"):
            f = c[name]
            if "failed" in f or "failed" in c["save"]:
                lines.append(f"| {preset} | {name} | failed | | | | |")
                continue
            lines.append(f"| {preset} ({_gb(c['save']['bf16_bytes'])} bf16) | {name} | {f['setup_s']:.1f} s | "
                         f"{_gb(f['peak_rss_bytes'])} | {_gb(f['peak_rss_anon_bytes'])} | "
                         f"{_gb(f['rss_before_bytes'])} | {_gb(f['frozen_bytes'])} + {_gb(f['trainable_bytes'])} |")
    if result.get("notes"):
        lines += ["", "Notes:", "", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
