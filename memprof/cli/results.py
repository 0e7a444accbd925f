"""The commands that read one result folder: ``memprof report`` (tables and plots), ``memprof levers`` (a Markdown
table per rank) and ``memprof attribute`` (each cell's peak, part by part)."""

from __future__ import annotations

import argparse
from pathlib import Path

from memprof.cli import output
from memprof.cli.checks import check_folder


def add_commands(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="tables (mean ± 95%% CI over repeats, time to target, best LR per rank, "
                                           "diagnoses) and loss/LR plots of a run, as terminal tables and HTML")
    report.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    report.add_argument("--out", type=Path, help="where to write report.html and the PNGs (default: RUN_DIR/report)")
    report.set_defaults(func=cmd_report)

    levers = sub.add_parser("levers", help="a run's cells as a Markdown table, per rank: weights, gradients, state, "
                                           "activations and peak under each lever")
    levers.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    levers.set_defaults(func=cmd_levers)

    attribute = sub.add_parser("attribute", help="split each cell's peak into the parts alive at its moment (any "
                                                 "result folder, older ones included)")
    attribute.add_argument("run_dir", type=Path, help="a result folder (results/<suite>-<stamp>)")
    attribute.add_argument("--markdown", action="store_true", help="print a Markdown table")
    attribute.add_argument("--out", type=Path, metavar="DIR", help="also write the folder again, records "
                           "attributed and in the current schema, to DIR")
    attribute.set_defaults(func=cmd_attribute)


def cmd_report(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from memprof.analysis import report
    from memprof.measure.attribution import attribute
    from memprof.results.store import torn_last_line
    from memprof.views import plots, report as report_views
    from memprof.views.tables import rich_tables

    if args.out is not None:
        check_folder("--out", args.out)  # before the rendering, not after it
    run = report.load_run(args.run_dir)
    run = replace(run, records=[attribute(r, r.peak_phase) for r in run.records])  # records of any memprof version
    memory = [report_views.memory_table(run)]
    tables = report.tables(run)
    picture = plots.memory_figure(run)
    sections = [report_views.Section("Memory", memory, [picture] if picture else []),
                report_views.Section("Convergence and speed", tables, plots.figures(run))]
    page = report_views.write(run, sections, args.out or args.run_dir / "report")
    output.out.print(rich_tables(memory + tables, output.out.width))
    output.console.print(f"report: {page}")
    said = report.NO_STEP_LOGS.format(args.run_dir)
    if not report.has_step_logs(run) and not any(said in t.notes for t in tables):  # a note of the target table
        output.warn(said)
    output.warn(torn_last_line(args.run_dir))
    return 0


def cmd_levers(args: argparse.Namespace) -> int:
    from memprof.results.store import read_records, some_records, torn_last_line
    from memprof.views.tables import levers_markdown

    print(levers_markdown(some_records(read_records(args.run_dir), args.run_dir / "records.jsonl")))
    output.warn(torn_last_line(args.run_dir))
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from memprof.measure.attribution import attribute_run
    from memprof.results.store import some_records, torn_last_line
    from memprof.views.tables import breakdown_markdown, breakdown_table

    records = some_records(attribute_run(args.run_dir), args.run_dir / "records.jsonl")
    if args.markdown:
        print(breakdown_markdown(records))
    else:
        output.out.print(breakdown_table(records, f"the peak of each cell of {args.run_dir}, part by part",
                                         output.out.width))
    if args.out is not None:
        from memprof.results.store import copy_run

        copy_run(args.run_dir, args.out, records)
        output.console.print(f"attributed records: {args.out}")
    output.warn(torn_last_line(args.run_dir))
    return 0
