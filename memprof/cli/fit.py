"""``memprof fit``: the largest batch size (or sequence length) that trains here, found by isolated trials."""

from __future__ import annotations

import argparse

from rich.markup import escape

from memprof.cli import output
from memprof.cli.config_flags import add_config_options, cell_request
from memprof.cli.exit_codes import EXIT_CELLS_FAILED, EXIT_INTERRUPTED


def add_commands(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser("fit", help="find the largest batch size (or length) that trains here, by isolated trials")
    add_config_options(fit)
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


def cmd_fit(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from memprof.plan import fit as fit_mod
    from memprof.plan import gpus as gpus_mod
    from memprof.views import plan as plan_views

    request = cell_request(args, weights=True)
    granularity = args.granularity if args.granularity is not None else 1 if args.search == "batch_size" else 64

    def progress(trial: fit_mod.Trial) -> None:
        verdict = " (does not fit)" if trial.fits is False else ""
        output.console.print(f"  {args.search} {trial.value}: {trial.status}{verdict}", highlight=False)

    budget = None if args.memory_budget is None else \
        gpus_mod.parse_gpu(args.memory_budget, "--memory-budget").capacity_bytes
    result = fit_mod.run_search(request, args.search, budget, args.margin, args.steps, args.device,
                                granularity if args.start is None else args.start, args.max, granularity,
                                args.timeout, progress)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        output.out.print(plan_views.search_table(result))
        if result.failed is None and not result.interrupted:
            answer = f"{result.best:,}" if result.best else "none (the smallest value did not fit)"
            output.out.print(f"largest {args.search} that fits: [bold]{answer}[/] ({len(result.trials)} trials, "
                             f"{result.wall_s:.1f} s)", highlight=False)
    if result.interrupted:
        fitted, refused = result.bounds
        known = ", ".join(([f"{args.search} {fitted:,} fits"] if fitted else [])
                          + ([f"{args.search} {refused:,} does not"] if refused else []))
        output.console.print(f"[yellow]interrupted, so the search has no answer"
                             f"{f' (so far: {known})' if known else ''}[/]", highlight=False)
        return EXIT_INTERRUPTED
    if result.failed is None:
        return 0
    # like a crashed cell of `memprof run`: the harness failed, and the search has no answer
    t = result.failed
    message = (f"{args.search} {t.value}: {t.status}, so the search stopped (only an oom or a peak over the limit "
               f"says a value does not fit): {t.error}")
    output.console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return EXIT_CELLS_FAILED
