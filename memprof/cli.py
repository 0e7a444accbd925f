"""The ``memprof`` command line. User errors are one line and exit 2; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from memprof.errors import UserError

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
    run.add_argument("suite", nargs="?", default="quick", help="suite file, or a shipped suite name (default: quick)")
    run.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    run.add_argument("--out", type=Path, default=Path("results"), help="results root (default: results/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the suite's device")
    run.add_argument("--sample-interval", type=float, default=0.01, help="memory sampling interval, seconds")
    run.set_defaults(func=cmd_run)

    opts = sub.add_parser("optimizers", help="list the optimizer catalogue")
    opts.set_defaults(func=cmd_optimizers)
    for p in (run, opts):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from memprof import suite as suite_mod

    suite = suite_mod.load(args.suite)
    cells = suite.cells
    if args.device:
        cells = [replace(c, device=args.device) for c in cells]
    if args.dry_run:
        from memprof.views import cells_table

        out.print(cells_table(cells, f"{suite.name}: {len(cells)} cells ({suite.path})"))
        return 0
    from memprof.runner import run_suite

    return run_suite(suite, cells, args.out, args.sample_interval, console, out)


def cmd_optimizers(args: argparse.Namespace) -> int:
    from rich.table import Table

    from memprof.catalogue import ENTRIES

    table = Table(title="memprof optimizer catalogue", header_style="bold")
    for name in ("name", "library", "states kept", "bytes/param", "needs CUDA", "installed"):
        table.add_column(name)
    for e in ENTRIES:
        per_param = "depends on shape" if e.bytes_per_param is None else f"{e.bytes_per_param:g}"
        installed = "yes" if e.installed else f"[dim]no: pip install {e.install or e.requires}[/dim]"
        table.add_row(e.name, e.library, e.states, per_param, "yes" if e.needs_cuda else "no", installed)
    out.print(table)
    return 0


if __name__ == "__main__":
    main()
