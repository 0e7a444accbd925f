"""``memprof run``: a suite's cells, each in its own process, then their table (and, with --compare-to, the
comparison with a baseline)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from memprof.cli import output
from memprof.cli.checks import check_file, check_folder, refuse
from memprof.cli.compare import add_compare_options, compare_rules, compare_sets
from memprof.cli.exit_codes import EXIT_CELLS_FAILED, EXIT_INTERRUPTED
from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.config.spec import CellConfig


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a suite: every cell in its own process")
    run.add_argument("suite", nargs="?", help="suite file, or a shipped suite name (default: quick; with --resume: "
                                              "the suite the run started with)")
    run.add_argument("--dry-run", action="store_true", help="check the suite as a run would (models, adapters and "
                     "optimizers on the meta device), list the cells and exit")
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's device")
    run.add_argument("--sample-interval", type=float, default=None,
                     help="memory sampling interval, seconds (default: 0.01 on the CPU, 0.05 on CUDA)")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run N cells at a time (one GPU each on CUDA; cores shared out on the CPU, at most one job "
                          "per core)")
    run.add_argument("--executor", choices=["local", "ray"], default="local",
                     help="where cells run: local processes (default), or tasks on a Ray cluster, one GPU each "
                          '(pip install "memprof[ray]")')
    run.add_argument("--address", metavar="ADDRESS", help="with --executor ray: the cluster (auto, "
                     "ray://head:10001, host:port; default: RAY_ADDRESS, else a new local Ray instance)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="finish an interrupted run in its own folder: run only the cells it lacks")
    run.add_argument("--compare-to", type=Path, metavar="BASELINE",
                     help="then compare the run to this result folder; exit with the comparison's code")
    run.add_argument("--allow-failures", action="store_true",
                     help=f"exit 0 even when cells crashed or timed out (default: exit {EXIT_CELLS_FAILED})")
    add_compare_options(run)
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    if args.resume is not None and not (args.resume / "manifest.json").is_file():
        raise UserError(str(args.resume), "not a memprof result folder (no manifest.json)")
    if args.suite is None and args.resume is not None:
        if not (args.resume / "suite.toml").is_file():
            raise UserError(str(args.resume), "has no suite.toml (its copy of the suite it ran): give that suite, "
                                              f"`memprof run SUITE --resume {args.resume}`")
        suite = suite_mod.load(str(args.resume / "suite.toml"))
    else:
        suite = suite_mod.load(args.suite or "quick")
    cells = suite.cells
    if args.device:
        cells = [c.with_values({"budget.device": args.device}) for c in cells]
    _budget_on_the_cpu_only(cells, suite.path)
    _check_run_flags(args)
    if args.dry_run:
        from memprof.run.preflight import check_all
        from memprof.views.tables import cells_table

        # a run's own checks, here in this process: each model built on the meta device, its adapter, each optimizer
        refuse(suite, check_all(suite.preflight_pairs()))
        output.out.print(cells_table(cells, f"{suite.name}: {len(cells)} cells ({suite.path})"))
        return 0
    if args.executor == "local" and args.resume is None:  # Ray's cells run on its nodes; a resume's folder first
        _cuda_where_asked(cells, "--device" if args.device else f"{suite.path}: device")
    baseline = None
    if args.compare_to:
        from memprof.analysis import compare

        baseline = compare.load(args.compare_to)  # a bad baseline fails before the run, not after it
        compare.share_some(baseline, {c.repeat_key for c in cells}, {suite.name}, suite.path)
    from memprof.run.runner import run_suite
    from memprof.views.progress import ProgressView
    from memprof.views.tables import results_table

    where = " (Ray)" if args.executor == "ray" else f" ({args.jobs} jobs)" if args.jobs > 1 else ""
    progress = ProgressView(output.console, suite.name + where)
    try:
        outcome = run_suite(suite, cells, args.out, args.sample_interval, progress, resume=args.resume,
                            jobs=args.jobs, executor=args.executor, address=args.address)
    finally:
        progress.close()
    if outcome.run_dir is None:
        output.console.print("interrupted before any cell ran; nothing was written")
        return EXIT_INTERRUPTED
    output.out.print(results_table(outcome.records, output.out.width, title=f"{suite.name} — {outcome.run_dir}"))
    hint = ""
    if outcome.interrupted:
        again = " --executor ray" + (f" --address {args.address}" if args.address else "") \
            if args.executor == "ray" else f" --jobs {args.jobs}" if args.jobs > 1 else ""
        hint = f" [yellow](interrupted; finish it with: memprof run --resume {outcome.run_dir}{again})[/]"
    output.console.print(f"results: {outcome.run_dir}{hint}", highlight=False, soft_wrap=True)
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    from memprof.results.record import HARNESS_FAILURES

    failed = [r for r in outcome.records if r.status in HARNESS_FAILURES]
    if failed and not args.allow_failures:
        output.console.print(f"[red]{len(failed)} of {len(outcome.records)} cells "
                             f"{' or '.join(sorted({r.status.value for r in failed}))}[/]: exit {EXIT_CELLS_FAILED} "
                             "(--allow-failures exits 0; OOM and divergence are results and never change the code)",
                             highlight=False, soft_wrap=True)
    code = compare_sets(baseline, compare.load(outcome.run_dir), args) if baseline is not None else 0
    return EXIT_CELLS_FAILED if failed and not args.allow_failures else code


def _check_run_flags(args: argparse.Namespace) -> None:
    """``memprof run``'s flags, checked before anything runs (``--dry-run`` included)."""
    import math

    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1 (got {args.jobs})")
    if args.executor == "ray":
        from memprof.run.ray_pool import require_ray

        require_ray()  # --dry-run too: a run would fail on it
        if args.jobs != 1:
            raise UserError("--jobs", "is for the local executor: on Ray every GPU (or core) of the cluster runs a "
                                      "cell")
    if args.address is not None and args.executor != "ray":
        raise UserError("--address", "needs --executor ray")
    if args.sample_interval is not None and not (math.isfinite(args.sample_interval) and args.sample_interval > 0):
        raise UserError("--sample-interval", f"must be a positive number of seconds (got {args.sample_interval})")
    compare_rules(args, ())  # with or without --compare-to: a rule that is never checked is a mistake too
    if args.compare_to is None:
        unused = next((flag for flag, given in (("--rule", args.rule), ("--markdown", args.markdown),
                                                 ("--allow-different-machines", args.allow_different_machines))
                       if given), None)
        if unused:
            raise UserError(unused, "is for the comparison: it needs --compare-to")
    if args.markdown is not None:
        check_file("--markdown", args.markdown)
    if args.resume is None:  # a resumed run writes in its own folder
        check_folder("--out", args.out)


def _cuda_where_asked(cells: list[CellConfig], source: str) -> None:
    """Refuse a run on CUDA on a host without a CUDA device, before any cell runs (each would crash on it)."""
    import torch  # device_count asks NVML first: it starts no CUDA context in this process

    if any(c.budget.device == "cuda" for c in cells) and torch.cuda.device_count() == 0:
        raise UserError(source, f"cuda, but this host has no CUDA device that torch {torch.__version__} sees (run "
                                "with --device cpu)")


def _budget_on_the_cpu_only(cells: list[CellConfig], source: Path) -> None:
    """A memory budget caps a worker's address space (``RLIMIT_AS``): it does not bound GPU memory, and a CUDA
    context reserves far more address space than it uses. A suite that asks for one on the GPU fails here, before
    any cell runs."""
    budgeted = [c for c in cells if c.budget.memory_budget_bytes]
    if not budgeted:
        return
    import torch  # device_count asks NVML first: it starts no CUDA context in this process

    if any(c.budget.device == "cuda" or (c.budget.device == "auto" and torch.cuda.device_count() > 0)
           for c in budgeted):
        raise UserError(f"{source}: memory_budget_bytes",
                        "is a CPU budget (the worker's address space), which does not bound GPU memory: on a GPU "
                        "leave it 0 (`memprof fit --memory-budget` holds trials against a GPU's size), or run with "
                        "--device cpu")
