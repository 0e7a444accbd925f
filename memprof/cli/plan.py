"""``memprof plan``: peak memory per GPU predicted without weights or a GPU, for one configuration or a suite's
cells; or the coefficients refitted from result folders."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from memprof.cli import output
from memprof.cli.checks import refuse
from memprof.cli.config_flags import add_config_options, cell_request
from memprof.errors import UserError


def add_commands(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="predict peak memory per GPU without weights or a GPU; or refit it")
    plan.add_argument("suite", nargs="?", help="plan every cell of this suite file instead of one configuration")
    add_config_options(plan)
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
        output.out.print(plan_views.calibration_table(fitted, str(target)))
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

        refuse(suite, config_problems(suite.cells))  # what peft says of each adapter table, without a model
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
        requests = [cell_request(args, weights=False)]
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
            output.out.print(table)
        reasons = {(r.request.model.name, r.request.adapter.name, r.request.optimizer.label, r.error): r.status
                   for r in refused}  # what a run would end with, once per model, adapter and optimizer
        for (model, adapter, optimizer, error), status in list(reasons.items())[:8]:
            output.out.print(f"[dim]{escape(f'{model} / {adapter} / {optimizer}: {status}: {error}')}[/]",
                             highlight=False)
    else:
        output.out.print(plan_views.parts_table(plans[0]))
        output.out.print(plan_views.verdict_table(plans[0], verdicts[0]))
    long = [p for p in plans if p.exact.shape.max_positions and p.request.shape.seq_len > p.exact.shape.max_positions]
    for p in long[:4]:
        output.out.print(f"[yellow]{p.request.model.name}: seq_len {p.request.shape.seq_len:,} is beyond its "
                         f"max_position_embeddings ({p.exact.shape.max_positions:,}): the plan counts the bytes, but "
                         f"the model was not trained for that length[/]", highlight=False)
    outside = [p for p in plans if p.method != "analytic"]
    if outside:
        fitted = sum(p.method == "fitted" for p in outside)
        output.out.print(f"[dim]{len(outside)} of {len(plans)} plans are outside the analytic model (Llama, Qwen2, "
                         f"Qwen3 and Mistral decoders without per-module LoRA ranks, layer subsets or modules to save"
                         f"{' on a GPU' if args.device == 'cuda' else ''}): their step is run on the meta device"
                         + (f", {fitted} of them (which it cannot run) fitted to CPU runs. {calibration.note}"
                            if fitted else ".") + "[/]", highlight=False)
    return 0
