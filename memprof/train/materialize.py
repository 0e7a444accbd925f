"""Make a model built on the meta device real on its cell's device, module by module.

In: a transformers ``PreTrainedModel`` built under ``torch.device("meta")``, its linears possibly already swapped
for bitsandbytes ``Linear4bit`` layers on meta (``memprof.train.models.quantize_linears_4bit``). Out: the same model,
every parameter and buffer on ``device``, initialised as transformers' own ``_init_weights`` asks (recomputed
rotary buffers, ones for norms, zeros for biases, a normal draw for weights), tied weights tied again.

Weights are random (they change neither memory nor speed), and two kinds are made cheaper than transformers makes
them, both from a generator seeded by the cell's seed:

- each 4-bit weight is made directly as 4-bit codes (``memprof.train.fourbit.random_params4bit``), never as a
  16/32-bit weight that bitsandbytes then quantises: the device holds no unquantised weight, and the CPU skips
  ``quantize_4bit``;
- with ``frozen`` (an adapter will train, the base stays frozen), every normal draw ``_init_weights`` asks for is
  one standard-normal block, drawn once, scaled to the mean and std asked for and tiled across the weight from a
  random offset: a copy instead of a random draw per element. The block's length is a prime, so no row length
  divides it and no two rows of a weight repeat one another. Trainable weights (a full fine-tune, peft's adapter
  matrices) keep their per-element draws.

For QLoRA the parameters that are not 4-bit (embeddings, norms, the head) may be made in fp32 straight away
(``param_dtype``), as peft's k-bit preparation would cast them: its cast then finds nothing to do.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import nn

from memprof.train.fourbit import BlockPool, is_four_bit, random_params4bit

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TILE = 1_048_573  # the largest prime below 2**20: 4 MiB of fp32 draws, tiled


def materialize(model: PreTrainedModel, device: torch.device, frozen: bool,
                param_dtype: torch.dtype | None = None) -> None:
    """Allocate and initialise every meta tensor of ``model`` on ``device``; ``frozen``: its weights will not
    train, so their normal draws may be tiled; ``param_dtype``: the dtype of every floating parameter that is not
    4-bit, where it differs from the model's (peft's k-bit preparation casts those to fp32 one by one, each fp32
    copy beside its 16-bit original: made in fp32, none is held twice)."""
    four_bit = [m for m in model.modules() if is_four_bit(getattr(m, "weight", None))]
    init = _Init(device, tile=frozen, param_dtype=param_dtype) if frozen or four_bit else None
    with _one_thread(device), init.patched() if init else _nothing():
        for module in four_bit:
            _four_bit(model, module, init)
            if device.type == "cpu":  # its temporaries (block picks, absmax) freed between the blocks it keeps
                _return_freed_heap()
        # Tie targets (the output head of a tied-embedding model) stay on meta until tied: a copy would be
        # allocated and initialised only to be thrown away; initialising a meta tensor is a no-op.
        targets = set(model.all_tied_weights_keys)
        for prefix, module in model.named_modules():
            for name, tensor in module.named_parameters(recurse=False):
                if tensor.is_meta and _join(prefix, name) not in targets:
                    setattr(module, name, _empty_like(tensor, device, param_dtype))
            for name, tensor in module.named_buffers(recurse=False):
                if tensor.is_meta:
                    setattr(module, name, _empty_like(tensor, device))
        # Every module not initialised yet: weights drawn from the device's default generator (seeded by the
        # cell) or tiled, non-persistent buffers such as rotary ``inv_freq`` recomputed, as from_pretrained does
        # for missing keys.
        model.initialize_weights()
    model.tie_weights(recompute_mapping=False)
    left = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after materialising: {left[:5]}")
    if device.type == "cpu":
        _return_freed_heap()


class _Init:
    """transformers' ``normal_`` while a model is initialised: on a meta tensor it only notes the mean and std
    asked for (what a 4-bit weight is drawn with); with ``tile`` it tiles a seeded block instead of drawing."""

    def __init__(self, device: torch.device, tile: bool, param_dtype: torch.dtype | None = None) -> None:
        # One draw from the default generator, which the cell's seed seeded: the same seed, the same weights.
        seed = int(torch.randint(2**62, (1,)).item())
        self.generator = torch.Generator(device).manual_seed(seed)
        self.device, self.tile, self.param_dtype = device, tile, param_dtype
        self.asked: dict[int, tuple[float, float]] = {}
        self.pools: dict[tuple, BlockPool] = {}
        self._block: torch.Tensor | None = None
        self._tiles: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def patched(self) -> Iterator[None]:
        from transformers import initialization

        original = initialization.normal_

        def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
            if getattr(tensor, "_is_hf_initialized", False):
                return tensor
            if tensor.is_meta:
                self.asked[id(tensor)] = (mean, std)
                return tensor
            if self.tile:
                return self.fill(tensor, mean, std)
            return original(tensor, mean=mean, std=std, generator=generator)

        initialization.normal_ = normal_
        try:
            yield
        finally:
            initialization.normal_ = original

    @torch.no_grad()
    def fill(self, tensor: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        """``tensor`` filled with the block, scaled to N(``mean``, ``std``), from a random offset, repeated."""
        key = (tensor.dtype, mean, std)
        if key not in self._tiles:  # the scaled block twice over: any offset's period is a view of it
            if self._block is None:
                self._block = torch.randn(TILE, generator=self.generator, device=self.device)
            self._tiles[key] = (self._block * std + mean).to(tensor.dtype).repeat(2)
        start = int(torch.randint(TILE, (1,), generator=self.generator, device=self.device).item())
        values = self._tiles[key][start:start + TILE]
        flat = tensor.view(-1)
        whole, rest = divmod(flat.numel(), TILE)
        if whole:
            flat[:whole * TILE].view(whole, TILE).copy_(values.expand(whole, TILE))
        if rest:
            flat[whole * TILE:].copy_(values[:rest])
        return tensor

    def pool(self, settings: torch.Tensor, mean: float, std: float) -> BlockPool:
        key = (settings.quant_type, settings.blocksize, settings.dtype, mean, std)
        if key not in self.pools:
            self.pools[key] = BlockPool.draw(settings.quant_type, settings.blocksize, settings.dtype, mean, std,
                                             self.generator)
        return self.pools[key]


def _four_bit(model: PreTrainedModel, module: nn.Module, init: _Init) -> None:
    """Give a meta ``Linear4bit`` its bias and a random 4-bit weight on the device. transformers' init runs on the
    module first, its weight still on meta: that zeroes the bias, marks the module initialised (so
    ``initialize_weights`` skips it), and says which normal the weight is drawn from."""
    settings = module.weight  # the meta Params4bit carries the quantisation settings and the weight's dtype
    if module.bias is not None:
        module.bias = _empty_like(module.bias, init.device, init.param_dtype)
    model._initialize_weights(module)
    default = getattr(model.config, "initializer_range", None) or 0.02  # _init_weights' own fallback
    mean, std = init.asked.pop(id(settings), (0.0, default))
    module.weight = random_params4bit(settings, init.pool(settings, mean, std), init.generator)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, one intra-op thread while materialising. The work is first-touch page faults and copies, which a
    second thread does not speed up (0.23 s for 0.5 GB of bf16 with 1 thread or 2 on the 2-core EPYC of
    results/benchmarks/setup_time.md), and a few small ops per layer, each of which pays an OpenMP barrier that
    stalls whenever another process holds a core (a 1B QLoRA build 4.4-5.1 s with 2 threads, 2.7 s with 1, at
    load 2 on 2 cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _return_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS. glibc keeps freed blocks below its (self-raising, up to 32 MiB)
    mmap threshold in the heap, interleaved with the tensors kept: without this a CPU build's temporaries stay in
    its RSS. A no-op where the C library has no ``malloc_trim`` (not glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (a build calls it after every 4-bit linear), or None."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def _empty_like(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised copy of ``tensor`` on ``device``, floating point in ``dtype`` if given; a parameter stays a
    parameter."""
    empty = torch.empty_like(tensor, device=device, dtype=dtype if dtype and tensor.is_floating_point() else None)
    return nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
