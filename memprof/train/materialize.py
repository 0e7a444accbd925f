"""Make a model built on the meta device real on its cell's device, module by module.

In: a transformers ``PreTrainedModel`` built under ``torch.device("meta")``, its linears possibly already swapped
for bitsandbytes ``Linear4bit`` layers on meta (``memprof.train.models.quantize_linears_4bit``). Out: the same model,
every parameter and buffer on ``device`` and initialised by transformers' own ``_init_weights`` (random weights,
recomputed rotary buffers), tied weights tied again. Each 4-bit layer gets its 16/32-bit weight on ``device``, is
initialised and quantised before the next one is made, so neither the host nor the device ever holds more than
one layer's unquantised weight.
"""

from __future__ import annotations

import ctypes
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import nn

from memprof.train.fourbit import is_four_bit

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def materialize(model: PreTrainedModel, device: torch.device) -> None:
    """Allocate and initialise every meta tensor of ``model`` on ``device``, quantising 4-bit layers one by one."""
    for module in model.modules():
        if is_four_bit(getattr(module, "weight", None)):
            _quantize(model, module, device)
    # Tie targets (the output head of a tied-embedding model) stay on meta until tied: a copy would be allocated
    # and initialised only to be thrown away; initialising a meta tensor is a no-op.
    targets = set(model.all_tied_weights_keys)
    for prefix, module in model.named_modules():
        for name, tensor in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if tensor.is_meta and _join(prefix, name) not in targets:
                setattr(module, name, _empty_like(tensor, device))
    # Every module not initialised yet: weights drawn from the device's default generator (seeded by the cell),
    # non-persistent buffers such as rotary ``inv_freq`` recomputed, as from_pretrained does for missing keys.
    model.initialize_weights()
    model.tie_weights(recompute_mapping=False)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after materialising: {left[:5]}")


def _quantize(model: PreTrainedModel, module: nn.Module, device: torch.device) -> None:
    """Give a meta ``Linear4bit`` a weight on ``device``, initialise it as transformers initialises a linear and
    quantise it; the unquantised weight is freed when this returns."""
    from bitsandbytes.nn import Params4bit

    settings = module.weight  # the meta Params4bit carries the quantisation settings and the weight's dtype
    module.weight = nn.Parameter(torch.empty(settings.shape, dtype=settings.dtype, device=device),
                                 requires_grad=False)
    if module.bias is not None:
        module.bias = _empty_like(module.bias, device)
    model._initialize_weights(module)  # also marks the module initialised, so initialize_weights skips it
    # Params4bit quantises itself (bitsandbytes.functional.quantize_4bit) on its first move to a device
    module.weight = Params4bit(module.weight.data, requires_grad=False, blocksize=settings.blocksize,
                               compress_statistics=settings.compress_statistics, quant_type=settings.quant_type,
                               quant_storage=settings.quant_storage).to(device)
    if device.type == "cpu":
        _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS. glibc keeps freed blocks below its (self-raising, up to 32 MiB)
    mmap threshold in the heap, and the weight and quantisation temporaries of each layer, interleaved with the
    4-bit weights kept, fragment it: without this the RSS of a CPU build grows by about the unquantised model
    anyway. A no-op where the C library has no ``malloc_trim`` (not glibc)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _empty_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An uninitialised copy of ``tensor`` on ``device``; a parameter stays a parameter."""
    empty = torch.empty_like(tensor, device=device)
    return nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
