"""The ``memprof`` command line. User errors are one line and exit 2; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.compare import ResultSet, Rule

console = Console(stderr=True)
# Piped output gets a readable width instead of rich's 80-column fallback.
out = Console(width=None if sys.stdout.isatty() else 120)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        if args.debug:
            raise
        console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        code = err.exit_code
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memprof", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite: every cell in its own process")
    run.add_argument("suite", nargs="?", help="suite file, or a shipped suite name (default: quick; with --resume: "
                                              "the suite the run started with)")
    run.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's device")
    run.add_argument("--sample-interval", type=float, default=0.01, help="memory sampling interval, seconds")
    run.add_argument("--jobs", type=int, default=1, metavar="N",
                     help="run N cells at a time (one GPU each on CUDA; cores shared out on the CPU)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="finish an interrupted run in its own folder: run only the cells it lacks")
    run.add_argument("--compare-to", type=Path, metavar="BASELINE",
                     help="then compare the run to this result folder; exit with the comparison's code")
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
    for p in (run, comp, opts, xc):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    if args.resume is not None and not (args.resume / "manifest.json").is_file():
        raise UserError(str(args.resume), "not a memprof result folder (no manifest.json)")
    if args.suite is None and args.resume is not None:
        suite = suite_mod.load(str(args.resume / "suite.toml"))
    else:
        suite = suite_mod.load(args.suite or "quick")
    cells = suite.cells
    if args.device:
        cells = [replace(c, device=args.device) for c in cells]
    if args.dry_run:
        from memprof.views import cells_table

        out.print(cells_table(cells, f"{suite.name}: {len(cells)} cells ({suite.path})"))
        return 0
    from memprof.runner import run_suite

    compare_to = None
    if args.compare_to:
        from memprof import compare

        baseline = compare.load(args.compare_to)  # a bad baseline fails before the run, not after it
        _rules(args, ())

        def compare_to(run_dir: Path) -> int:
            return _compare(baseline, compare.load(run_dir), args)
    if args.jobs < 1:
        raise UserError("--jobs", f"must be at least 1 (got {args.jobs})")
    return run_suite(suite, cells, args.out, args.sample_interval, console, out, compare=compare_to,
                     resume=args.resume, jobs=args.jobs)


def cmd_compare(args: argparse.Namespace) -> int:
    from memprof import compare

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
    from memprof import compare

    rules = compare.resolve_rules(suite_rules, f"{suite_path}: compare")
    return compare.resolve_rules([compare.split_rule(text) for text in args.rule], "--rule", rules)


def _compare(baseline: ResultSet, current: ResultSet, args: argparse.Namespace) -> int:
    import json

    from memprof import compare, compare_views

    rules = _rules(args, current.suite_rules, str(current.suite_path))
    result = compare.compare(baseline, current, rules, args.allow_different_machines)
    if args.markdown:
        try:
            args.markdown.write_text(compare_views.markdown(result), encoding="utf-8")
        except OSError as err:
            raise UserError(str(args.markdown), f"cannot write: {err}") from None
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2))
        return result.exit_code
    for line in compare_views.header_lines(result):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(compare_views.comparison_table(result, getattr(args, "all", False)))
    out.print(compare_views.summary_line(result), highlight=False)
    return result.exit_code


def cmd_crosscheck(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    suite = suite_mod.load(args.suite)
    if not 0 <= args.cell < len(suite.cells):
        raise UserError(f"{suite.path}: --cell", f"{args.cell} is not a cell index (0..{len(suite.cells) - 1})")
    cell = suite.cells[args.cell]
    from memprof.crosscheck import crosscheck, exit_code
    from memprof.optim import OptimizerUnavailable
    from memprof.views import crosscheck_table

    try:
        rows = crosscheck(cell)
    except OptimizerUnavailable as err:
        raise UserError(f"{suite.path}: cell {args.cell}", str(err)) from None
    out.print(crosscheck_table(rows, f"PyTorch profiler vs memprof: cell {args.cell} {cell.key}"))
    return exit_code(rows)


def cmd_optimizers(args: argparse.Namespace) -> int:
    from rich.table import Table

    from memprof.catalogue import ENTRIES

    table = Table(title="memprof optimizer catalogue (exact bytes: memprof.formulas)", header_style="bold")
    for name in ("name", "library", "states kept", "bytes/param", "available"):
        table.add_column(name)
    for e in ENTRIES:
        per_param = "by shape" if e.bytes_per_param is None else f"{e.bytes_per_param:.3g}"
        available = (f"[dim]no: pip install {e.install or e.requires}[/dim]" if not e.installed
                     else "CUDA only" if e.needs_cuda else "yes")
        table.add_row(e.name, e.library, e.states, per_param, available)
    out.print(table)
    return 0


if __name__ == "__main__":
    main()
