"""The flags that describe one configuration (``memprof plan`` and ``memprof fit``), and the cell they describe."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.config.spec import CellConfig


def add_config_options(p: argparse.ArgumentParser) -> None:
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


def cell_request(args: argparse.Namespace, weights: bool) -> CellConfig:
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
