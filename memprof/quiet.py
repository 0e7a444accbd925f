"""Silence what libraries print that says nothing about the user's run (imported by ``memprof/__init__``, so before
any of them loads). Each filter matches one message, so anything else they say still shows."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings


def quiet_libraries() -> None:
    """bitsandbytes' hint to install ``kernels`` for its CPU 4-bit inference kernel (printed on AVX512-BF16 CPUs when
    it loads): memprof disables that path on its layers (``train.models``). peft's read of transformers' deprecated
    ``is_gradient_checkpointing``. Kineto's ``STAGE``/``USDT`` lines on every profiler start and stop (level 6 keeps
    none; a level the user set stays). Where torchao is installed (peft imports it): on a CPU-only torch, its
    failure to load its CUDA kernels, and torch's notice that torchao registers enums it no longer needs to. peft's
    warning that the rank and alpha patterns it adds itself for MoE experts' fused ``gate_up_proj`` (transformers 5
    keeps gate and up as one parameter) match no targeted module: it looks at module names, the experts are targeted
    as parameters, and the patterns apply (their LoRA has rank 2r); a pattern of the user's that matches nothing still
    warns."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage())
    logging.getLogger("torchao").addFilter(
        lambda record: not (record.getMessage().startswith("Failed to load") and _cpu_only_torch()))
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    peft_added = str([r".*\.gate_up_proj"])  # as peft's warning lists the patterns
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=r"The following (rank|alpha)_pattern keys did "
                            + re.escape(f"not match any targeted module and were ignored: {peft_added}.") + "$")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _cpu_only_torch() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.version.cuda is None
