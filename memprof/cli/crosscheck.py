"""``memprof crosscheck``: one cell trained under PyTorch's memory profiler, its categories set against memprof's
exact bytes."""

from __future__ import annotations

import argparse

from memprof.cli import output
from memprof.cli.checks import refuse
from memprof.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    xc = sub.add_parser("crosscheck", help="train one cell under PyTorch's memory profiler and compare its "
                                           "categories with memprof's exact bytes; exit 1 on disagreement")
    xc.add_argument("suite", help="suite file, or a shipped suite name")
    xc.add_argument("--cell", type=int, default=0, metavar="N", help="the cell's index in the suite (default: 0)")
    xc.set_defaults(func=cmd_crosscheck)


def cmd_crosscheck(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    suite = suite_mod.load(args.suite)
    if not 0 <= args.cell < len(suite.cells):
        raise UserError(f"{suite.path}: --cell", f"{args.cell} is not a cell index (0..{len(suite.cells) - 1})")
    cell = suite.cells[args.cell]
    from memprof.run.preflight import check_all

    refuse(suite, check_all([cell]))  # what a run checks before any cell: one line, not a traceback
    from memprof.measure.crosscheck import crosscheck, exit_code
    from memprof.train.optim import OptimizerUnavailable
    from memprof.views.tables import crosscheck_table

    try:
        rows = crosscheck(cell)
    except OptimizerUnavailable as err:
        raise UserError(f"{suite.path}: cell {args.cell}", str(err)) from None
    output.out.print(crosscheck_table(rows, f"PyTorch profiler vs memprof: cell {args.cell} {cell.key}"))
    return exit_code(rows)
