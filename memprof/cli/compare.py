"""``memprof compare``, and the comparison ``memprof run --compare-to`` ends with: its options, its rules and what
it prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from memprof.cli import output
from memprof.cli.checks import check_file
from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.analysis.compare import ResultSet
    from memprof.results.metrics import Rule


def add_commands(sub: argparse._SubParsersAction) -> None:
    comp = sub.add_parser("compare", help="compare two result sets cell by cell; exit 1 on a regression")
    comp.add_argument("baseline", type=Path, help="result folder (or its records.jsonl / cells.csv)")
    comp.add_argument("current", type=Path, help="result folder (or its records.jsonl / cells.csv)")
    comp.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout (no table)")
    comp.add_argument("--all", action="store_true", help="show every metric of every cell")
    add_compare_options(comp)
    comp.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from memprof.analysis import compare

    if args.markdown is not None:
        check_file("--markdown", args.markdown)
    return compare_sets(compare.load(args.baseline), compare.load(args.current), args)


def add_compare_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", action="append", default=[], metavar="METRIC:RULE",
                   help="override a comparison rule: peak_rss_delta_bytes:10%%, tokens_per_s:factor=1.2,p=0.01, "
                        "final_loss_smoothed:abs=0.1, optimizer_state_bytes:exact, activation_bytes:off")
    p.add_argument("--allow-different-machines", action="store_true",
                   help="compare memory peaks and timings even when the machines differ")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write a PR-comment summary to FILE")


def compare_rules(args: argparse.Namespace, suite_rules: tuple[tuple[str, str], ...],
                  suite_path: str = "") -> dict[str, Rule]:
    """The default rules, then the current suite's [compare] table, then --rule flags."""
    from memprof.results.metrics import resolve_rules, split_rule

    rules = resolve_rules(suite_rules, f"{suite_path}: compare")
    return resolve_rules([split_rule(text) for text in args.rule], "--rule", rules)


def compare_sets(baseline: ResultSet, current: ResultSet, args: argparse.Namespace) -> int:
    """The comparison of ``current`` with ``baseline`` under the rules, printed (or as JSON) and written to
    --markdown; its exit code."""
    import json

    from memprof.analysis import compare
    from memprof.views import compare as compare_views

    rules = compare_rules(args, current.suite_rules, str(current.suite_path))
    result = compare.compare(baseline, current, rules, args.allow_different_machines)
    for side in (baseline, current):
        output.warn(side.warning)
    if getattr(args, "json", False):
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in compare_views.header_lines(result):
            output.out.print(line, highlight=False, soft_wrap=True)
        output.out.print(compare_views.comparison_table(result, output.out.width, getattr(args, "all", False)))
        output.out.print(compare_views.summary_line(result), highlight=False)
    if args.markdown:  # checked before the comparison (check_file); a full disk is found only here, after the verdict
        try:
            args.markdown.write_text(compare_views.markdown(result), encoding="utf-8")
        except OSError as err:
            raise UserError("--markdown", f"{args.markdown}: cannot write: {err.strerror or err} (the comparison "
                                          "above is complete; only its Markdown summary is missing)") from None
    return result.exit_code
