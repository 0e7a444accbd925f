"""The ``memprof`` command line. User errors are one line and exit 2; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.analysis.compare import ResultSet
    from memprof.results.metrics import Rule
    from memprof.config.spec import CellConfig
    from memprof.run.messages import Problem
    from memprof.suite import Suite

# Exit codes (README "Exit codes"): a crashed or timed-out cell is the harness failing, not an answer the user asked
# for (``memprof.results.record.HARNESS_FAILURES``); an OOM, a divergence or an optimizer unavailable here are
# answers, and never change the code.
EXIT_CELLS_FAILED = 3
EXIT_INTERRUPTED = 130


def _console(stderr: bool) -> Console:
    """Piped output (a CI log, a file) gets a readable width instead of rich's 80-column fallback, which cuts the
    progress line's step counts and names."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() or "COLUMNS" in os.environ else 120)


console, out = _console(stderr=True), _console(stderr=False)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        code = err.exit_code
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memprof", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

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
    _add_compare_options(run)
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compare", help="compare two result sets cell by cell; exit 1 on a regression")
    comp.add_argument("baseline", type=Path, help="result folder (or its records.jsonl / cells.csv)")
    comp.add_argument("current", type=Path, help="result folder (or its records.jsonl / cells.csv)")
    comp.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout (no table)")
    comp.add_argument("--all", action="store_true", help="show every metric of every cell")
    _add_compare_options(comp)
    comp.set_defaults(func=cmd_compare)

    opts = sub.add_parser("optimizers", help="list the optimizer catalogue")
    opts.set_defaults(func=cmd_optimizers)

    xc = sub.add_parser("crosscheck", help="train one cell under PyTorch's memory profiler and compare its "
                                           "categories with memprof's exact bytes; exit 1 on disagreement")
    xc.add_argument("suite", help="suite file, or a shipped suite name")
    xc.add_argument("--cell", type=int, default=0, metavar="N", help="the cell's index in the suite (default: 0)")
    xc.set_defaults(func=cmd_crosscheck)
    _add_plan_commands(sub)
    _add_report_command(sub)
    _add_levers_command(sub)
    _add_attribute_command(sub)
    for p in (run, comp, opts, xc):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


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
        _refuse(suite, check_all(suite.preflight_pairs()))
        out.print(cells_table(cells, f"{suite.name}: {len(cells)} cells ({suite.path})"))
        return 0
    baseline = None
    if args.compare_to:
        from memprof.analysis import compare

        baseline = compare.load(args.compare_to)  # a bad baseline fails before the run, not after it
        compare.share_some(baseline, {c.repeat_key for c in cells}, {suite.name}, suite.path)
    from memprof.run.runner import run_suite
    from memprof.views.progress import ProgressView
    from memprof.views.tables import results_table

    where = " (Ray)" if args.executor == "ray" else f" ({args.jobs} jobs)" if args.jobs > 1 else ""
    progress = ProgressView(console, suite.name + where)
    try:
        outcome = run_suite(suite, cells, args.out, args.sample_interval, progress, resume=args.resume,
                            jobs=args.jobs, executor=args.executor, address=args.address)
    finally:
        progress.close()
    if outcome.run_dir is None:
        console.print("interrupted before any cell ran; nothing was written")
        return EXIT_INTERRUPTED
    out.print(results_table(outcome.records, out.width, title=f"{suite.name} — {outcome.run_dir}"))
    hint = ""
    if outcome.interrupted:
        again = " --executor ray" + (f" --address {args.address}" if args.address else "") \
            if args.executor == "ray" else f" --jobs {args.jobs}" if args.jobs > 1 else ""
        hint = f" [yellow](interrupted; finish it with: memprof run --resume {outcome.run_dir}{again})[/]"
    console.print(f"results: {outcome.run_dir}{hint}", highlight=False, soft_wrap=True)
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    from memprof.results.record import HARNESS_FAILURES

    failed = [r for r in outcome.records if r.status in HARNESS_FAILURES]
    if failed and not args.allow_failures:
        console.print(f"[red]{len(failed)} of {len(outcome.records)} cells "
                      f"{' or '.join(sorted({r.status.value for r in failed}))}[/]: exit {EXIT_CELLS_FAILED} "
                      "(--allow-failures exits 0; OOM and divergence are results and never change the code)",
                      highlight=False, soft_wrap=True)
    code = _compare(baseline, compare.load(outcome.run_dir), args) if baseline is not None else 0
    return EXIT_CELLS_FAILED if failed and not args.allow_failures else code


def _check_run_flags(args: argparse.Namespace) -> None:
    """``memprof run``'s flags, checked before anything runs (``--dry-run`` included)."""
    import math

    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1 (got {args.jobs})")
    if args.executor == "ray" and args.jobs != 1:
        raise UserError("--jobs", "is for the local executor: on Ray every GPU (or core) of the cluster runs a cell")
    if args.address is not None and args.executor != "ray":
        raise UserError("--address", "needs --executor ray")
    if args.sample_interval is not None and not (math.isfinite(args.sample_interval) and args.sample_interval > 0):
        raise UserError("--sample-interval", f"must be a positive number of seconds (got {args.sample_interval})")
    _rules(args, ())  # with or without --compare-to: a rule that is never checked is a mistake too
    if args.compare_to is None:
        unused = next((flag for flag, given in (("--rule", args.rule), ("--markdown", args.markdown),
                                                 ("--allow-different-machines", args.allow_different_machines))
                       if given), None)
        if unused:
            raise UserError(unused, "is for the comparison: it needs --compare-to")
    if args.markdown is not None:
        _check_file("--markdown", args.markdown)
    if args.resume is None:  # a resumed run writes in its own folder
        _check_folder("--out", args.out)


def _check_folder(flag: str, path: Path) -> None:
    """Refuse ``path``, a folder to write in, when it or the nearest of its parents that exists is a file."""
    taken = next((p for p in (path, *path.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise UserError(flag, f"{taken} is a file, not a folder")


def _check_file(flag: str, path: Path) -> None:
    """Refuse ``path``, a file to write, when it is a folder or its folder does not exist: before any work."""
    if path.is_dir():
        raise UserError(flag, f"{path} is a folder, not a file")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise UserError(flag, f"{path.parent} {what}: {path.name} cannot be written there")


def _refuse(suite: Suite, problems: list[Problem]) -> None:
    """The first problem the checks found (``memprof.run.preflight``), as the suite's one-line error."""
    if problems:
        p = problems[0]
        raise suite.preflight_error(p.model, p.adapter, p.field, p.error)


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


def cmd_compare(args: argparse.Namespace) -> int:
    from memprof.analysis import compare

    if args.markdown is not None:
        _check_file("--markdown", args.markdown)
    return _compare(compare.load(args.baseline), compare.load(args.current), args)


def _add_compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", action="append", default=[], metavar="METRIC:RULE",
                   help="override a comparison rule: peak_rss_delta_bytes:10%%, tokens_per_s:factor=1.2,p=0.01, "
                        "final_loss_smoothed:abs=0.1, optimizer_state_bytes:exact, activation_bytes:off")
    p.add_argument("--allow-different-machines", action="store_true",
                   help="compare memory peaks and timings even when the machines differ")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write a PR-comment summary to FILE")


def _rules(args: argparse.Namespace, suite_rules: tuple[tuple[str, str], ...],
           suite_path: str = "") -> dict[str, Rule]:
    """The default rules, then the current suite's [compare] table, then --rule flags."""
    from memprof.results.metrics import resolve_rules, split_rule

    rules = resolve_rules(suite_rules, f"{suite_path}: compare")
    return resolve_rules([split_rule(text) for text in args.rule], "--rule", rules)


def _compare(baseline: ResultSet, current: ResultSet, args: argparse.Namespace) -> int:
    import json

    from memprof.analysis import compare
    from memprof.views import compare as compare_views

    rules = _rules(args, current.suite_rules, str(current.suite_path))
    result = compare.compare(baseline, current, rules, args.allow_different_machines)
    for side in (baseline, current):
        _warn(side.warning)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in compare_views.header_lines(result):
            out.print(line, highlight=False, soft_wrap=True)
        out.print(compare_views.comparison_table(result, out.width, getattr(args, "all", False)))
        out.print(compare_views.summary_line(result), highlight=False)
    if args.markdown:  # after the verdict: a file that cannot be written does not hide it
        try:
            args.markdown.write_text(compare_views.markdown(result), encoding="utf-8")
        except OSError as err:
            raise UserError(str(args.markdown), f"cannot write: {err}") from None
    return result.exit_code


def cmd_crosscheck(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    suite = suite_mod.load(args.suite)
    if not 0 <= args.cell < len(suite.cells):
        raise UserError(f"{suite.path}: --cell", f"{args.cell} is not a cell index (0..{len(suite.cells) - 1})")
    cell = suite.cells[args.cell]
    from memprof.run.preflight import check_all

    _refuse(suite, check_all([cell]))  # what a run checks before any cell: one line, not a traceback
    from memprof.measure.crosscheck import crosscheck, exit_code
    from memprof.train.optim import OptimizerUnavailable
    from memprof.views.tables import crosscheck_table

    try:
        rows = crosscheck(cell)
    except OptimizerUnavailable as err:
        raise UserError(f"{suite.path}: cell {args.cell}", str(err)) from None
    out.print(crosscheck_table(rows, f"PyTorch profiler vs memprof: cell {args.cell} {cell.key}"))
    return exit_code(rows)


def cmd_optimizers(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from memprof.config.catalogue import ENTRIES

    # no outer edge and one gap between columns: at 80 columns the prose keeps room once the names stand whole
    table = Table(title="memprof optimizer catalogue (exact bytes: memprof.measure.formulas)", header_style="bold",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("name", no_wrap=True)  # a name is typed as it stands: never broken
    table.add_column("library", no_wrap=True)
    table.add_column("states kept", min_width=12)  # prose, the one column that wraps
    table.add_column("bytes/param", no_wrap=True)
    table.add_column("available", no_wrap=True)
    missing = [e for e in ENTRIES if not e.installed]
    for e in ENTRIES:
        per_param = "by shape" if e.bytes_per_param is None else f"{e.bytes_per_param:.3g}"
        available = "[dim]no: see below[/dim]" if not e.installed else "CUDA only" if e.needs_cuda else "yes"
        table.add_row(e.name, e.library, e.states, per_param, available)
    out.print(table)
    for e in missing:  # whole lines, so a command copies in one piece at any width
        cuda = " (then CUDA only)" if e.needs_cuda else ""
        out.print(f"{e.name}{cuda}: pip install {e.install or e.requires}", highlight=False, soft_wrap=True)
    return 0


def _add_plan_commands(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="predict peak memory per GPU without weights or a GPU; or refit it")
    plan.add_argument("suite", nargs="?", help="plan every cell of this suite file instead of one configuration")
    _add_config_options(plan)
    from memprof.plan.gpus import CARDS, DEFAULT_CARDS

    plan.add_argument("--gpu", nargs="+", metavar="GPU", help=f"cards ({', '.join(CARDS)}, at the memory the driver "
                      "reports) or sizes in GiB (80GB = 80 GiB, a little more than a real 80 GB card's 79.6 GiB); "
                      f"default: {' '.join(DEFAULT_CARDS)}. With --device cpu: memory sizes only (default: this "
                      "host's RAM)")
    plan.add_argument("--budget-bytes", type=int, metavar="N", help="also plan against a budget of N bytes")
    plan.add_argument("--calibration", type=Path, metavar="FILE", help="coefficients to use (default: the shipped "
                      "memprof/plan/calibration.json, from CPU runs)")
    plan.add_argument("--calibrate", type=Path, nargs="+", metavar="RUN_DIR",
                      help="refit the coefficients from these result folders and write them (then exit)")
    plan.add_argument("--calibration-out", type=Path, metavar="FILE",
                      help="where --calibrate writes (default: the package's calibration.json)")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="plan a GPU's memory (default) or a CPU run's RSS growth, checked against this host's RAM "
                           "(or --gpu sizes)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    plan.set_defaults(func=cmd_plan)

    fit = sub.add_parser("fit", help="find the largest batch size (or length) that trains here, by isolated trials")
    _add_config_options(fit)
    fit.add_argument("--search", choices=["batch_size", "seq_len"], default="batch_size", help="what to grow")
    fit.add_argument("--memory-budget", metavar="SIZE", help="the limit, as bytes, a size (512MiB, 24GB) or a card "
                     "(rtx-4090) (required on the CPU, where it "
                     "caps each trial's address space; on CUDA default: the card)")
    fit.add_argument("--margin", type=float, default=0.05, help="a trial fits if its peak stays under (1 - margin) "
                     "x the limit (default 0.05)")
    fit.add_argument("--steps", type=int, default=2, help="optimizer steps per trial (default 2)")
    fit.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    fit.add_argument("--start", type=int, default=None, help="first value tried, at most --max, rounded down to a "
                     "multiple of the granularity (default: 1 batch, or the granularity for lengths)")
    fit.add_argument("--max", type=int, default=1 << 16, help="largest value tried, never exceeded: the answer is at "
                     "most its largest multiple of the granularity (default 65536; at least the granularity)")
    fit.add_argument("--granularity", type=int, default=None, help="search in multiples of this (default: 1 for "
                     "batch sizes, 64 for lengths)")
    fit.add_argument("--timeout", type=float, default=600.0, help="seconds per trial (default 600); a trial that "
                     "runs longer stops the search, as a crash does")
    fit.add_argument("--json", action="store_true", help="print the search as JSON on stdout")
    fit.set_defaults(func=cmd_fit)
    for p in (plan, fit):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a preset (memprof/config/presets.py) or a local HF config/checkpoint "
                   "folder")
    p.add_argument("--adapter", default="lora", help="none, lora, qlora or dora (default: lora)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--target-modules", default="all-linear",
                   help="all-linear (default), attention, or a comma-separated list of module names")
    p.add_argument("--optimizer", default="adamw_torch", help="a catalogue name (memprof optimizers)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="weights and compute dtype (default: the device's own, bf16 on CUDA and fp32 on the CPU)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa",
                   help="attention kernel (default sdpa; eager keeps a seq×seq matrix per head and layer)")
    p.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS", help="compute the loss in chunks of this "
                   "many tokens, so only one chunk's fp32 logits live at a time (default 0: transformers' loss)")
    p.add_argument("--world-size", type=int, default=1, help="ranks the run is sharded over (default 1)")
    p.add_argument("--strategy", choices=["ddp", "zero1", "fsdp2"],
                   help="what the ranks shard: ddp nothing, zero1 the optimizer state, fsdp2 everything")


def _request(args: argparse.Namespace, weights: bool) -> CellConfig:
    """The cell the flags describe (without --precision, the device's own: plan and fit alike), put through a run's
    checks (``memprof.run.preflight``): a model that does not build, or targets it lacks, are one line naming the
    flag, before ``plan`` plans or ``fit`` runs a trial; with ``weights`` (fit), a model folder that holds none too."""
    from memprof.plan.fit import on_cuda
    from memprof.plan.predict import cell_from_flags
    from memprof.run.preflight import check_all
    from memprof.suite.load import OPTIMIZER_FIELD

    if not args.model:
        raise UserError("--model", "required (or give a suite file to plan)")
    precision = args.precision or ("bf16" if on_cuda(args.device) else "fp32")
    request = cell_from_flags(args.model, args.adapter, args.rank, args.target_modules, args.optimizer,
                              args.batch_size, args.seq_len, precision, args.grad_accum,
                              args.gradient_checkpointing, args.attn, args.world_size, args.strategy,
                              args.loss_chunk)
    problems = check_all([request], weights)
    if problems:
        field, error = problems[0].field, problems[0].error
        flags = {"model": f"--model {args.model}", "target_modules": "--target-modules", "r": "--rank"}
        # a model's own key (model.vocab_size, of a folder's config.json) is the --model flag's
        raise UserError("--optimizer" if field.startswith(OPTIMIZER_FIELD) else
                        flags.get(field.split(".")[0], "--adapter"), error)
    return request


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from memprof.plan import calibration as calibration_mod
    from memprof.plan import gpus as gpus_mod
    from memprof.plan import predict as plan_mod
    from memprof.train.optim import OptimizerRefused
    from memprof.views import plan as plan_views

    if args.calibrate:
        from memprof.plan.calibrate import calibrate

        fitted = calibrate(args.calibrate, calibration_mod.load(args.calibration or calibration_mod.DEFAULT_PATH))
        target = args.calibration_out or calibration_mod.DEFAULT_PATH
        calibration_mod.save(fitted, target)
        out.print(plan_views.calibration_table(fitted, str(target)))
        return 0
    if args.device == "cpu":  # a CPU run has no card: its RSS growth is checked against memory sizes
        gpus = [gpus_mod.memory_size(text) for text in args.gpu] if args.gpu else [gpus_mod.host_memory()]
    else:
        gpus = [gpus_mod.parse_gpu(name) for name in args.gpu or gpus_mod.DEFAULT_CARDS]
    if args.budget_bytes is not None:
        gpus.append(gpus_mod.budget(f"{args.budget_bytes:,} B", args.budget_bytes))
    if args.suite:
        from memprof import suite as suite_mod

        if args.model:
            raise UserError("--model", "give either a suite or --model, not both")
        suite = suite_mod.load(args.suite)
        from memprof.run.preflight import config_problems

        _refuse(suite, config_problems(suite.cells))  # what peft says of each adapter table, without a model
        requests = plan_mod.requests_from_cells(suite.cells)
        levers: dict[str, object] = {}
        if args.gradient_checkpointing:
            levers["levers.gradient_checkpointing"] = "on"
        if args.attn != "sdpa":
            levers["levers.attn_implementation"] = args.attn
        if args.strategy or args.world_size != 1:
            levers["levers.parallel"] = plan_mod.sharding_flags(args.world_size, args.strategy)
        if args.loss_chunk:
            levers["levers.loss_chunk"] = args.loss_chunk
        requests = [r.with_values(levers) for r in requests]
    else:
        requests = [_request(args, weights=False)]
    calibration = calibration_mod.load(args.calibration or calibration_mod.DEFAULT_PATH)
    try:
        results, verdicts = plan_mod.plan_with_verdicts(requests, calibration, args.device, gpus)
    except OptimizerRefused as err:
        raise suite.optimizer_error(err.label, str(err)) if args.suite else UserError("--optimizer", str(err)) \
            from None
    refused = [r for r in results if isinstance(r, plan_mod.Refusal)]
    if refused and not args.suite:  # one configuration: what a run of it would end with, as the error
        error = refused[0].error
        raise UserError("--loss-chunk" if error.startswith("loss_chunk") else
                        "--attn" if refused[0].status == "unavailable" else "--model", error)
    if args.json:
        print(json.dumps([{**r.to_dict(), "gpus": [v.to_dict() for v in verdicts[i]]} if i in verdicts else
                          r.to_dict() for i, r in enumerate(results)], indent=2))
        return 0
    plans = [r for r in results if isinstance(r, plan_mod.Plan)]
    if args.suite:
        for table in plan_views.suite_tables(results, gpus, verdicts):
            out.print(table)
        reasons = {(r.request.model.name, r.request.adapter.name, r.request.optimizer.label, r.error): r.status
                   for r in refused}  # what a run would end with, once per model, adapter and optimizer
        for (model, adapter, optimizer, error), status in list(reasons.items())[:8]:
            out.print(f"[dim]{escape(f'{model} / {adapter} / {optimizer}: {status}: {error}')}[/]", highlight=False)
    else:
        out.print(plan_views.parts_table(plans[0]))
        out.print(plan_views.verdict_table(plans[0], verdicts[0]))
    long = [p for p in plans if p.exact.shape.max_positions and p.request.shape.seq_len > p.exact.shape.max_positions]
    for p in long[:4]:
        out.print(f"[yellow]{p.request.model.name}: seq_len {p.request.shape.seq_len:,} is beyond its "
                  f"max_position_embeddings ({p.exact.shape.max_positions:,}): the plan counts the bytes, but the "
                  f"model was not trained for that length[/]", highlight=False)
    outside = [p for p in plans if p.method != "analytic"]
    if outside:
        fitted = sum(p.method == "fitted" for p in outside)
        out.print(f"[dim]{len(outside)} of {len(plans)} plans are outside the analytic model (Llama, Qwen2, Qwen3 "
                  f"and Mistral decoders without per-module LoRA ranks, layer subsets or modules to save"
                  f"{' on a GPU' if args.device == 'cuda' else ''}): their step is run on the meta device"
                  + (f", {fitted} of them (which it cannot run) fitted to CPU runs. {calibration.note}" if fitted
                     else ".") + "[/]", highlight=False)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from memprof.plan import fit as fit_mod
    from memprof.plan import gpus as gpus_mod
    from memprof.views import plan as plan_views

    request = _request(args, weights=True)
    granularity = args.granularity if args.granularity is not None else 1 if args.search == "batch_size" else 64

    def progress(trial: fit_mod.Trial) -> None:
        verdict = " (does not fit)" if trial.fits is False else ""
        console.print(f"  {args.search} {trial.value}: {trial.status}{verdict}", highlight=False)

    budget = None if args.memory_budget is None else \
        gpus_mod.parse_gpu(args.memory_budget, "--memory-budget").capacity_bytes
    result = fit_mod.run_search(request, args.search, budget, args.margin, args.steps, args.device,
                                granularity if args.start is None else args.start, args.max, granularity,
                                args.timeout, progress)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        out.print(plan_views.search_table(result))
        if result.failed is None and not result.interrupted:
            answer = f"{result.best:,}" if result.best else "none (the smallest value did not fit)"
            out.print(f"largest {args.search} that fits: [bold]{answer}[/] ({len(result.trials)} trials, "
                      f"{result.wall_s:.1f} s)", highlight=False)
    if result.interrupted:
        fitted, refused = result.bounds
        known = ", ".join(([f"{args.search} {fitted:,} fits"] if fitted else [])
                          + ([f"{args.search} {refused:,} does not"] if refused else []))
        console.print(f"[yellow]interrupted, so the search has no answer"
                      f"{f' (so far: {known})' if known else ''}[/]", highlight=False)
        return EXIT_INTERRUPTED
    if result.failed is None:
        return 0
    # like a crashed cell of `memprof run`: the harness failed, and the search has no answer
    t = result.failed
    message = (f"{args.search} {t.value}: {t.status}, so the search stopped (only an oom or a peak over the limit "
               f"says a value does not fit): {t.error}")
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return EXIT_CELLS_FAILED


def _add_attribute_command(sub: argparse._SubParsersAction) -> None:
    attribute = sub.add_parser("attribute", help="split each cell's peak into the parts alive at its moment (any "
                                                 "result folder, older ones included)")
    attribute.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    attribute.add_argument("--markdown", action="store_true", help="print a Markdown table")
    attribute.add_argument("--out", type=Path, metavar="DIR", help="also write the folder again, records "
                           "attributed and in the current schema, to DIR")
    attribute.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    attribute.set_defaults(func=cmd_attribute)


def _add_levers_command(sub: argparse._SubParsersAction) -> None:
    levers = sub.add_parser("levers", help="a run's cells as a Markdown table, per rank: weights, gradients, state, "
                                           "activations and peak under each lever")
    levers.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    levers.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    levers.set_defaults(func=cmd_levers)


def cmd_attribute(args: argparse.Namespace) -> int:
    from memprof.measure.attribution import attribute_run
    from memprof.results.store import some_records, torn_last_line
    from memprof.views.tables import breakdown_markdown, breakdown_table

    records = some_records(attribute_run(args.run_dir), args.run_dir / "records.jsonl")
    if args.markdown:
        print(breakdown_markdown(records))
    else:
        out.print(breakdown_table(records, f"the peak of each cell of {args.run_dir}, part by part", out.width))
    if args.out is not None:
        from memprof.results.store import copy_run

        copy_run(args.run_dir, args.out, records)
        console.print(f"attributed records: {args.out}")
    _warn(torn_last_line(args.run_dir))
    return 0


def cmd_levers(args: argparse.Namespace) -> int:
    from memprof.results.store import read_records, some_records, torn_last_line
    from memprof.views.tables import levers_markdown

    print(levers_markdown(some_records(read_records(args.run_dir), args.run_dir / "records.jsonl")))
    _warn(torn_last_line(args.run_dir))
    return 0


def _warn(warning: str) -> None:
    """A warning (what a command read but left out) as one yellow line on stderr; '' says nothing."""
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="tables (mean ± 95%% CI over repeats, time to target, best LR per rank, "
                                           "diagnoses) and loss/LR plots of a run, as terminal tables and HTML")
    report.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    report.add_argument("--out", type=Path, help="where to write report.html and the PNGs (default: RUN_DIR/report)")
    report.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from memprof.analysis import report
    from memprof.measure.attribution import attribute
    from memprof.results.store import torn_last_line
    from memprof.views import plots, report as report_views
    from memprof.views.tables import rich_tables

    if args.out is not None:
        _check_folder("--out", args.out)  # before the rendering, not after it
    run = report.load_run(args.run_dir)
    run = replace(run, records=[attribute(r, r.peak_phase) for r in run.records])  # records of any memprof version
    memory = [report_views.memory_table(run)]
    tables = report.tables(run)
    picture = plots.memory_figure(run)
    sections = [report_views.Section("Memory", memory, [picture] if picture else []),
                report_views.Section("Convergence and speed", tables, plots.figures(run))]
    page = report_views.write(run, sections, args.out or args.run_dir / "report")
    out.print(rich_tables(memory + tables, out.width))
    console.print(f"report: {page}")
    _warn(torn_last_line(args.run_dir))
    return 0


if __name__ == "__main__":
    main()
