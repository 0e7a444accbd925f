"""``memprof optimizers``: the optimizer catalogue, and how to install what is missing."""

from __future__ import annotations

import argparse

from memprof.cli import output


def add_commands(sub: argparse._SubParsersAction) -> None:
    opts = sub.add_parser("optimizers", help="list the optimizer catalogue")
    opts.set_defaults(func=cmd_optimizers)


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
    output.out.print(table)
    for e in missing:  # whole lines, so a command copies in one piece at any width
        cuda = " (then CUDA only)" if e.needs_cuda else ""
        output.out.print(f"{e.name}{cuda}: pip install {e.install or e.requires}", highlight=False, soft_wrap=True)
    return 0
