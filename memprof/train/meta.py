"""The model on the meta device: what a cell would build, as shapes and dtypes only, and the bytes it would hold.

Used by `memprof plan` (exact parts without weights) and by its calibration (each measured cell's adapted
weights). Nothing here allocates memory or computes.
"""

from __future__ import annotations

import math
import warnings
import torch
from torch import nn

from memprof.config.spec import AdapterSpec, ModelSpec
from memprof.errors import UserError
from memprof.train.fourbit import NESTED_BLOCKSIZE, is_four_bit

FOUR_BIT_CODE_BYTES = 16 * 4      # the NF4/FP4 code book: 16 fp32 values, one copy per quantised weight
NESTED_CODE_BYTES = 256 * 4       # double quantisation: the absmax blocks' 8-bit dynamic map (256 fp32), one a weight


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one bitsandbytes 4-bit weight with its quant state, as ``quantize_4bit`` stores it.

    Two values per uint8 byte; one absmax per ``blocksize`` block, fp32, or with double quantisation uint8 plus
    an fp32 offset, one fp32 absmax per 256 blocks and a 256-entry fp32 map; and the 16-entry 4-bit code book.
    """
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * blocks + FOUR_BIT_CODE_BYTES
    return packed + blocks + 4 + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + FOUR_BIT_CODE_BYTES


def meta_model(spec: ModelSpec, adapter: AdapterSpec, precision: str) -> nn.Module:
    """What ``memprof.train.models.build_model`` builds, with meta tensors: 4-bit layers stay unquantised (their bytes
    come from ``four_bit_bytes``), peft wraps the model exactly as it wraps a real one.

    Raises:
        UserError: when the model cannot be built as a causal LM, or the adapter does not fit it.
    """
    from transformers import AutoModelForCausalLM

    from memprof.train import models

    try:
        config = models.build_config(spec)
        # peft's k-bit preparation warns about transformers' deprecations: noise for someone planning
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[precision],
                                                     trust_remote_code=spec.trust_remote_code)
            if adapter.kind == "qlora":
                models.quantize_linears_4bit(model, adapter.quant)
            model.config.use_cache = False
            return models.attach_adapter(model, adapter)
    except (models.ModelLoadError, ValueError, KeyError) as err:
        where = spec.path or spec.preset or spec.name or "model"
        text = " ".join(str(err).split())
        if "Unrecognized configuration class" in text:  # transformers then lists every causal-LM config class
            text = text.split(" Model type should be")[0] + " (not a causal language model)"
        raise UserError(str(where), text[:300]) from None


def frozen_weight_bytes(model: nn.Module) -> int:
    """Frozen parameters: 4-bit ones (bitsandbytes ``Params4bit``) as quantised with their quant state, the rest
    as they are. ``model.parameters()`` yields a tied weight once, as storage counting does."""
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        if is_four_bit(p):
            total += four_bit_bytes(p.numel(), p.blocksize, p.compress_statistics)
        else:
            total += p.numel() * p.element_size()
    return total


def adapted_numel(model: nn.Module) -> int:
    """Elements of the base weights that carry a LoRA/DoRA adapter (DoRA saves one weight-sized tensor for each
    per forward, whatever the batch); 4-bit ones count the values they stand for. An adapter on a parameter
    (peft's ``ParamWrapper``, e.g. a mixture of experts' fused expert weights) counts that parameter."""
    from peft.tuners.lora import LoraLayer

    return sum(getattr(m.get_base_layer(), getattr(m, "parameter_name", "weight")).numel()
               for m in model.modules() if isinstance(m, LoraLayer))
