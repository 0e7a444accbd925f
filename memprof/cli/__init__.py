"""The ``memprof`` command line. User errors are one line and exit 2; ``--debug`` shows tracebacks."""

from __future__ import annotations

import argparse
import sys

from rich.markup import escape

from memprof.cli import compare, crosscheck, fit, optimizers, output, plan, results, run
from memprof.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as err:
        if args.debug:
            raise
        output.console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        code = err.exit_code
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memprof", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (run, compare, optimizers, crosscheck, plan, fit, results):  # in the order --help lists them
        commands.add_commands(sub)
    for p in sub.choices.values():  # after the command too: `memprof run --debug ...`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser
