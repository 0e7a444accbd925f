"""bitsandbytes 4-bit weights: telling them apart from other tensors, and making random ones without quantising.

A preset model's weights are random (they change neither memory nor speed), so a QLoRA build has no weight to
quantise: ``random_params4bit`` makes each 4-bit weight directly in bitsandbytes' own layout, the packed ``uint8``
``Params4bit`` and its ``QuantState`` (absmax, code book, block size, quant type, dtype, shape; with double
quantisation the absmax quantised again by ``bitsandbytes.functional.quantize_blockwise`` into a nested state, as
``quantize_4bit`` nests it). Its blocks are drawn, by a seeded generator, from a pool that bitsandbytes'
``quantize_4bit`` made of a normal sample with the init's mean and std: each block of the weight is a block of a
real quantised init, codes and absmax together, so it dequantises to what quantising transformers' init gives, at a
gather's cost instead of quantising every weight (on a CPU, ``quantize_4bit`` takes about 45 ns a parameter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bitsandbytes.nn import Params4bit

POOL_VALUES = 1 << 20  # values quantised for a pool: 16384 blocks of 64
NESTED_BLOCKSIZE = 256  # quantize_4bit's block size for double quantisation of the absmax


def is_four_bit(p: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``), told apart without importing bitsandbytes."""
    return type(p).__name__ == "Params4bit"


@dataclass(frozen=True)
class BlockPool:
    """Quantised blocks of a normal sample: ``codes[i]`` the packed bytes of block ``i`` (two 4-bit codes a
    byte), ``absmax[i]`` its scale, both as ``bitsandbytes.functional.quantize_4bit`` made them."""

    codes: torch.Tensor  # (blocks, blocksize // 2) uint8
    absmax: torch.Tensor  # (blocks,) float32

    @classmethod
    def draw(cls, quant_type: str, blocksize: int, dtype: torch.dtype, mean: float, std: float,
             generator: torch.Generator) -> BlockPool:
        """Quantise ``POOL_VALUES`` draws of N(``mean``, ``std``) in ``dtype`` on the generator's device."""
        import bitsandbytes.functional as bnb_f

        sample = torch.randn(POOL_VALUES, generator=generator, device=generator.device).mul_(std).add_(mean)
        packed, state = bnb_f.quantize_4bit(sample.to(dtype), blocksize=blocksize, quant_type=quant_type,
                                            compress_statistics=False, quant_storage=torch.uint8)
        return cls(packed.view(-1, blocksize // 2), state.absmax)


def random_params4bit(settings: Params4bit, pool: BlockPool, generator: torch.Generator) -> Params4bit:
    """A quantised ``Params4bit`` of ``settings``' shape, dtype and quantisation (block size, quant type, double
    quantisation, storage dtype), on the generator's device, each block a block of ``pool`` drawn at random. Its
    tensors have the shapes, dtypes and bytes of ``quantize_4bit``'s for a weight of that shape."""
    import bitsandbytes.functional as bnb_f
    from bitsandbytes.nn import Params4bit

    device, numel, blocksize = generator.device, settings.numel(), settings.blocksize
    blocks = -(-numel // blocksize)
    picks = torch.randint(pool.absmax.numel(), (blocks,), generator=generator, device=device)
    packed = pool.codes.index_select(0, picks).view(-1)
    size = (numel + 1) // 2  # quantize_4bit pads an odd count with one code
    if packed.numel() != size:  # a last, partial block: keep only its bytes
        packed = packed[:size].clone()
    if settings.quant_storage != torch.uint8:
        packed = packed.view(settings.quant_storage)
    absmax = pool.absmax.index_select(0, picks)
    code = bnb_f.get_4bit_type(settings.quant_type, device=device)
    common = {"shape": settings.shape, "dtype": settings.dtype, "blocksize": blocksize, "code": code,
              "quant_type": settings.quant_type}
    if settings.compress_statistics:
        offset = absmax.mean()
        nested, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = bnb_f.QuantState(absmax=nested, offset=offset, state2=state2, **common)
    else:
        state = bnb_f.QuantState(absmax=absmax, **common)
    return Params4bit(packed.unsqueeze(1), requires_grad=False, quant_state=state, blocksize=blocksize,
                      compress_statistics=settings.compress_statistics, quant_type=settings.quant_type,
                      quant_storage=settings.quant_storage, module=settings.module, bnb_quantized=True)
