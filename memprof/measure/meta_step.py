"""Saved activations of any dense decoder, measured on the meta device: the model built at its real size from its
config (shapes, no memory), one forward of a micro-batch under ``SavedActivations``. Autograd saves on the meta
device what it saves on a real one, op by op, except inside ``F.scaled_dot_product_attention``, whose meta kernel is
the math path; there the kernel a real device would run (``step_memory.sdpa_backend``) is stood in for by one that
saves what that kernel saves. The plan uses it for architectures ``step_memory``'s formulas do not cover
(``tests/test_meta_step.py`` holds it to a real CPU step, byte for byte).

QLoRA is measured as LoRA on the model its 4-bit weights stand in for: bitsandbytes' 4-bit matmul saves nothing but
its packed weight, as a frozen linear saves only its weight, and peft's k-bit preparation makes the residual
stream fp32 (the whole model is built in fp32 then).

A mixture of experts routes tokens by their values, which the meta device has not, but transformers' grouped experts
never read them: tokens are sorted by expert and each expert's share is given by offsets into one grouped matmul,
whose saved tensors are the same whatever the routing. Two ops need help on the meta device: peft's LoRA on the
fused expert weights folds its factors under ``torch.autocast(device_type="meta")``, which has no autocast, and
grouped_mm's meta kernel checks CUDA's bf16-only rule (see ``_experts_on_meta``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec
from memprof.measure import step_memory
from memprof.measure.activations import SavedActivations


class _SavesLikeAKernel(torch.autograd.Function):
    """Attention whose autograd node saves what a fused kernel's does: q, k and v as given, the output (laid out as q
    is, as the kernels lay theirs out: for a q viewed from [batch, seq, heads, dim] o_proj's input is then a view of
    it), an fp32 logsumexp (the mem-efficient kernel's padded to 32 rows), on CUDA the dropout seed and offset, and
    the attention mask when there is one (sliding-window layers), as sdpa turns a boolean mask into an additive one
    in q's dtype on every call."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                efficient: bool, cuda: bool) -> torch.Tensor:
        b, h, s, _ = q.shape
        out = torch.empty_like(q)
        lse = q.new_empty(b, h, -(-s // 32) * 32 if efficient else s, dtype=torch.float32)
        saved = [q, k, v, out, lse] + ([q.new_empty(2, dtype=torch.int64)] if cuda else [])
        if mask is not None:
            saved.append(mask if mask.is_floating_point() else q.new_empty(mask.shape))
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:  # never run: the meta step has no backward
        raise NotImplementedError


@contextlib.contextmanager
def _sdpa_as(device: str) -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as ``device``'s kernel would save it (the math path runs as it is)."""
    real = F.scaled_dot_product_attention

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
             *args: Any, **kwargs: Any) -> torch.Tensor:
        gqa = k.shape[1] < q.shape[1]
        kernel = step_memory.sdpa_backend("sdpa", device, q.element_size(), gqa)
        if attn_mask is not None and device != "cpu":
            kernel = "efficient" if kernel == "flash" else kernel  # flash takes no mask on CUDA
        if kernel == "math":
            return real(q, k, v, attn_mask, *args, **kwargs)
        return _SavesLikeAKernel.apply(q, k, v, attn_mask, kernel == "efficient", device != "cpu")

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class _GroupedMatmul(torch.autograd.Function):
    """``F.grouped_mm(a, b, offs=offs)`` of a 2-D ``a`` and 3-D ``b``, saving what aten's formula saves: ``b`` when
    ``a`` needs a gradient, ``a`` when ``b`` does, and the offsets."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        needs_a, needs_b, _ = ctx.needs_input_grad
        ctx.save_for_backward(*([b] if needs_a else []), offs, *([a] if needs_b else []))
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:  # never run: the meta step has no backward
        raise NotImplementedError


@contextlib.contextmanager
def _experts_on_meta() -> Iterator[None]:
    """A mixture's experts as they run on a real device: ``torch.autocast`` on the meta device as a no-op (peft folds
    LoRA factors into the expert weights with autocast off), and grouped matmuls in the dtypes the CPU kernel takes
    (QLoRA's and fp32's experts are fp32) where the meta kernel takes only bf16."""
    autocast, grouped_mm = torch.autocast, F.grouped_mm

    def no_autocast_on_meta(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    def any_dtype(a: torch.Tensor, b: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
        return grouped_mm(a, b, offs=offs) if a.dtype == torch.bfloat16 else _GroupedMatmul.apply(a, b, offs)

    torch.autocast, F.grouped_mm = no_autocast_on_meta, any_dtype
    try:
        yield
    finally:
        torch.autocast, F.grouped_mm = autocast, grouped_mm


@contextlib.contextmanager
def _unpacked() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids by their values, which the meta device has not;
    memprof's batches are never packed."""
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = real


def _stand_in(adapter: AdapterSpec, precision: str) -> tuple[AdapterSpec, str]:
    """The adapter and precision whose saved activations a QLoRA cell's equal (see the module docstring)."""
    if adapter.kind != "qlora":
        return adapter, precision
    lora = adapter.model_copy(update={"kind": "lora"})
    return lora, "fp32" if adapter.quant.prepare_for_kbit_training else precision


@functools.lru_cache(maxsize=64)
def _meta_model(model_json: str, adapter_json: str, precision: str, attn: str, checkpointing: str) -> nn.Module | None:
    """The model on the meta device as a cell builds it (None where a module needs real tensors to build), kept for
    the next micro-batch shape: building and wrapping it takes seconds, a meta forward a fraction of one."""
    from transformers import AutoModelForCausalLM

    from memprof.train import models

    spec = ModelSpec.model_validate_json(model_json)
    config = models.build_config(spec)
    adapter, precision = _stand_in(AdapterSpec.model_validate_json(adapter_json), precision)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[precision], attn_implementation=attn,
                                                     trust_remote_code=spec.trust_remote_code)
            model = models.attach_adapter(model, adapter)
    except ValueError as err:
        raise models.kernel_unavailable(err, attn) or err
    except (RuntimeError, NotImplementedError, TypeError):  # a module that needs real tensors to build
        return None
    model.config.use_cache = False
    model.train()
    if checkpointing != "off":
        models.enable_checkpointing(model, reentrant=checkpointing == "reentrant")
    return model


@functools.lru_cache(maxsize=1024)
def _forward(model_json: str, adapter_json: str, precision: str, attn: str, checkpointing: str, loss_chunk: int,
             batch: int, seq: int, device: str) -> int | None:
    """One forward of a micro-batch on the meta model under ``SavedActivations``: the bytes saved."""
    from memprof.train import models

    model = _meta_model(model_json, adapter_json, precision, attn, checkpointing)
    if model is None:
        return None
    x = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    loss_function = models.loss_function(Levers(loss_chunk=loss_chunk))
    try:
        with _unpacked(), _sdpa_as(device), _experts_on_meta(), SavedActivations(model) as saved:
            loss = loss_function(model, x)  # held, as the loop holds it until backward
    except (RuntimeError, NotImplementedError):  # an op with no meta kernel, or one that needs values
        return None
    del loss
    return saved.bytes


def _measured(cell: CellConfig, device: str) -> int | None:
    """What ``cell``'s micro-batch saves on its meta model."""
    return _forward(cell.model.model_dump_json(), cell.adapter.model_dump_json(), cell.shape.precision,
                    cell.levers.attn_implementation, cell.levers.gradient_checkpointing, cell.levers.loss_chunk,
                    cell.shape.batch_size, cell.shape.seq_len, device)


def _with_layers(cell: CellConfig, layers: int, config: Any, checkpointing: str | None = None) -> CellConfig:
    """``cell`` on ``layers`` decoder layers of its model, in its pattern of layer kinds (and ``checkpointing``, when
    given)."""
    overrides: dict[str, Any] = {"num_hidden_layers": layers}
    types = getattr(config, "layer_types", None)
    if types:
        overrides["layer_types"] = [types[i % len(types)] for i in range(layers)]
    levers = cell.levers.model_copy(update={"gradient_checkpointing": checkpointing or
                                            cell.levers.gradient_checkpointing})
    return cell.model_copy(update={"levers": levers, "model": cell.model.model_copy(
        update={"overrides": {**cell.model.overrides, **overrides}})})


def _period(config: Any) -> int:
    """The length of the repeating pattern of ``config``'s layer types (Gemma's sliding and full attention); 1 for
    layers all alike."""
    types = list(getattr(config, "layer_types", None) or [])
    return next((p for p in range(1, len(types) + 1)
                 if all(types[i] == types[i % p] for i in range(len(types)))), 1)


def activation_bytes(cell: CellConfig, device: str) -> int | None:
    """What one micro-batch of ``cell`` saves in forward on ``device`` (cpu or cuda), measured on the meta device;
    None for a model whose forward the meta device cannot run (an op that reads values).

    Raises:
        LeverUnavailable: the architecture has no path for the cell's attention kernel (Gemma2 and sdpa).

    The whole model would take seconds to build: it is measured on models of its first few layers. Once every kind of
    layer has run (and made what its kind shares, as an attention mask), each further period of the layer pattern
    adds the same bytes."""
    from memprof.train import models

    config = models.build_config(cell.model)
    layers, period = config.num_hidden_layers, _period(config)
    if layers <= 2 * period + 1:
        return _measured(_with_layers(cell, layers, config), device)
    rest = (layers - period - 1) % period
    base, start, block = (_measured(_with_layers(cell, n, config), device)
                          for n in (period + 1 + rest, period + 1, 2 * period + 1))
    if base is None or start is None or block is None:
        return None
    return base + (layers - period - 1 - rest) // period * (block - start)


def layer_bytes(cell: CellConfig, device: str) -> int | None:
    """What one decoder layer but the first saves without checkpointing: what a checkpointed layer holds again while
    backward recomputes it (the mean over a period of the layer pattern); None as above."""
    from memprof.train import models

    config = models.build_config(cell.model)
    period = _period(config)
    start, block = (_measured(_with_layers(cell, n, config, "off"), device) for n in (period + 1, 2 * period + 1))
    return None if start is None or block is None else (block - start) // period
