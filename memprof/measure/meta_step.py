"""One training step of any decoder, run on the meta device: the model built at its real size from its config
(shapes, no memory), one micro-batch's forward and backward under ``_LiveBytes``, which counts the bytes of every
storage an op makes while it lives, by what made it. Autograd saves and frees on the meta device what it does on a
real one, op by op, except inside ``F.scaled_dot_product_attention``, whose meta kernel is the math path; there the
kernel a real device would run (``step_memory.sdpa_backend``) is stood in for by one that saves what that kernel
saves and makes the gradients it makes. What kernels allocate inside themselves (cuBLAS's workspaces, a flash
kernel's scratch) no op makes: the plan adds what it knows of them. The plan uses the step for the architectures
``step_memory``'s formulas do not cover (``tests/test_meta_step.py`` holds it to a real CPU step).

QLoRA is run as LoRA on the model its 4-bit weights stand in for: bitsandbytes' 4-bit matmul saves nothing but its
packed weight, as a frozen linear saves only its weight, and peft's k-bit preparation makes the residual stream
fp32 (the whole model is built in fp32 then); the weight it dequantises for a matmul is the plan's to add.

A mixture of experts routes tokens by their values, which the meta device has not, but transformers' grouped experts
never read them: tokens are sorted by expert and each expert's share is given by offsets into one grouped matmul,
whose saved tensors are the same whatever the routing. Two ops need help on the meta device: peft's LoRA on the
fused expert weights folds its factors under ``torch.autocast(device_type="meta")``, which has no autocast, and
grouped_mm's meta kernel checks CUDA's bf16-only rule (see ``_experts_on_meta``).
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec
from memprof.measure import step_memory
from memprof.measure.activations import SavedActivations


class StepFails(Exception):
    """The cell's step raises on the meta device for a reason of its own, not the meta device's (peft's LoRA on a
    linear layer that returns a tuple, a shape that does not fit): a run of the cell crashes the same way."""


class _SavesLikeAKernel(torch.autograd.Function):
    """Attention whose autograd node saves what a fused kernel's does: q, k and v as given, the output (laid out as q
    is, as the kernels lay theirs out: for a q viewed from [batch, seq, heads, dim] o_proj's input is then a view of
    it), an fp32 logsumexp (the mem-efficient kernel's padded to 32 rows), on CUDA the dropout seed and offset, and
    the attention mask when there is one (sliding-window layers), as sdpa turns a boolean mask into an additive one
    in q's dtype on every call. Its backward makes the gradients of q, k and v (what a kernel allocates beside them
    is its own scratch, not modelled)."""

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
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None


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
        ctx.shapes = a.shape, b.shape
        return a.new_empty(a.shape[0], b.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (a, b), (needs_a, needs_b, _) = ctx.shapes, ctx.needs_input_grad
        return grad.new_empty(a) if needs_a else None, grad.new_empty(b) if needs_b else None, None


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


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or results (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages ops make while they live (a view or an in-place result keeps an input's storage and
    is not counted again), by what made them, and those bytes at their highest total: the step's peak above what was
    allocated before it (weights, the batch). What ops make is named by the step's moment (``moment``, moved on by
    ``_measure``'s hooks): activations in forward, the loss's logits from the output head's forward until the decoder's
    output has its gradient, then the layer at work (activations' gradients, recomputed layers); a storage becomes a
    gradient when autograd accumulates it into a parameter's ``.grad``."""

    KINDS = {"forward": "activations", "loss forward": "loss_logits", "loss backward": "loss_logits",
             "backward": "layer"}

    def __init__(self, params: list[nn.Parameter], scratch: dict[Any, Any]) -> None:
        super().__init__()
        self.scratch = scratch  # op -> the bytes its kernel allocates inside itself beside its outputs
        self.moment = "forward"
        self.live = {"activations": 0, "loss_logits": 0, "layer": 0, "gradients": 0}
        self.peak, self.peak_moment = dict(self.live), self.moment
        self.most = dict(self.live)  # each kind's own highest bytes
        self._storages: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [kind, bytes]
        self._params = params
        self._hooks: list[Any] = []

    def __enter__(self) -> _LiveBytes:
        self._hooks = [p.register_post_accumulate_grad_hook(self._gradient) for p in self._params]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if id(st := t.untyped_storage()) not in inputs and st not in self._storages:
                entry = [self.KINDS[self.moment], st.nbytes()]
                self._storages[st] = entry
                weakref.finalize(st, self._freed, entry)
                self.live[entry[0]] += entry[1]
                self.most[entry[0]] = max(self.most[entry[0]], self.live[entry[0]])
        kind, scratch = self.KINDS[self.moment], self.scratch[func](*args) if func in self.scratch else 0
        self.live[kind] += scratch
        if sum(self.live.values()) > sum(self.peak.values()):
            self.peak, self.peak_moment = dict(self.live), self.moment
        self.live[kind] -= scratch
        return out

    def _freed(self, entry: list[Any]) -> None:
        self.live[entry[0]] -= entry[1]

    def _gradient(self, param: nn.Parameter) -> None:
        entry = self._storages.get(param.grad.untyped_storage())
        if entry is not None and entry[0] != "gradients":
            self.live[entry[0]] -= entry[1]
            self.live["gradients"] += entry[1]
            entry[0] = "gradients"


# What CUDA kernels allocate inside themselves, which no op makes on the meta device (step_memory's rules, checked on
# an H200): softmax's backward makes tmp = grad * output, the size of its gradient (eager attention's fp32 scores)
SCRATCH = {"cpu": {}, "cuda": {
    torch.ops.aten._softmax_backward_data.default: lambda grad, *rest: grad.numel() * grad.element_size()}}


@dataclass(frozen=True)
class StepPeak:
    """One micro-batch's forward and backward on the meta device: what forward saved for backward, and at the step's
    highest live bytes (above the weights and the batch) the moment and what held them (``_LiveBytes``' kinds)."""

    saved: int
    moment: str
    parts: dict[str, int]
    pressure: int  # the smaller of the loss's and a layer's own highest bytes: freed blocks the caching allocator
    #                cannot reuse for each other
    largest_gradient: int  # the largest trainable tensor's bytes
    largest_frozen_linear: int  # the most elements of a frozen linear layer's weight in the decoder (QLoRA: 4-bit)

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


@functools.lru_cache(maxsize=64)
def _meta_model(model_json: str, adapter_json: str, precision: str, attn: str, checkpointing: str) -> nn.Module | None:
    """The model on the meta device as a cell builds it (None where a module needs real tensors to build), kept for
    the next micro-batch shape: building and wrapping it takes seconds, a step on it about one."""
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


def _measure(model: nn.Module, x: torch.Tensor, loss_function: Any, scratch: dict[Any, Any]) -> StepPeak:
    """One forward and backward of ``loss_function(model, x)`` under ``SavedActivations`` and ``_LiveBytes`` (with
    ``scratch``'s kernels' own allocations); gradients already there are not counted."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    live = _LiveBytes(trainable, scratch)

    def layers_begin(grad: torch.Tensor) -> None:
        live.moment = "backward"

    def decoder_out(module: nn.Module, args: Any, out: Any) -> None:
        out[0].register_hook(layers_begin)

    def head_in(module: nn.Module, args: Any) -> None:
        live.moment = "loss forward" if live.moment == "forward" else live.moment

    hooks = [model.get_decoder().register_forward_hook(decoder_out),
             model.get_output_embeddings().register_forward_pre_hook(head_in)]
    try:
        with live:
            with SavedActivations(model) as saved:
                loss = loss_function(model, x)
            live.moment = "loss backward"
            loss.backward()
            del loss
    finally:
        for hook in hooks:
            hook.remove()
    frozen = (m.weight.numel() for m in model.get_decoder().modules()
              if isinstance(m, nn.Linear) and not m.weight.requires_grad)
    return StepPeak(saved.bytes, live.peak_moment, live.peak, min(live.most["loss_logits"], live.most["layer"]),
                    max((p.numel() * p.element_size() for p in trainable), default=0), max(frozen, default=0))


@functools.lru_cache(maxsize=1024)
def _step(model_json: str, adapter_json: str, precision: str, attn: str, checkpointing: str, loss_chunk: int,
          batch: int, seq: int, accumulating: bool, device: str) -> StepPeak | None:
    """``_measure`` of a micro-batch on the meta model, its kernels standing in for ``device``'s; when
    ``accumulating``, of the second micro-batch of a step, the first one's gradients there."""
    from memprof.train import models

    model = _meta_model(model_json, adapter_json, precision, attn, checkpointing)
    if model is None:
        return None
    levers = Levers(loss_chunk=loss_chunk)
    if refusal := models.loss_chunk_unavailable(model.config, levers):
        raise refusal
    x = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    loss_function = models.loss_function(levers)
    try:
        with _unpacked(), _sdpa_as(device), _experts_on_meta():
            if accumulating:
                loss_function(model, x).backward()
            return _measure(model, x, loss_function, SCRATCH[device])
    except (RuntimeError, NotImplementedError):  # an op with no meta kernel, or one that needs values
        return None
    except Exception as err:  # noqa: BLE001 - any other failure is the step's own
        raise StepFails(_where(err)) from err
    finally:
        model.zero_grad(set_to_none=True)


def _where(err: BaseException) -> str:
    """``err`` in one line with the line of code that raised it (the path from the package down)."""
    frame = traceback.extract_tb(err.__traceback__)[-1]
    path = frame.filename.split("site-packages/")[-1]
    return f"{type(err).__name__}: {' '.join(str(err).split())} ({path}:{frame.lineno})"


def step_peak(cell: CellConfig, device: str) -> StepPeak | None:
    """One micro-batch of ``cell`` on ``device`` (cpu or cuda), run on the meta device at the model's full depth (a
    second or so; with gradient accumulation, a later micro-batch, whose gradients from the first are not in the
    parts); None for a model whose step the meta device cannot run (an op that reads values).

    Raises:
        LeverUnavailable: the architecture has no path for the cell's attention kernel (Gemma2 and sdpa), or the
            chunked loss is asked of a model that transforms its logits.
        StepFails: the step itself raises, naming the cell."""
    try:
        return _step(cell.model.model_dump_json(), cell.adapter.model_dump_json(), cell.shape.precision,
                     cell.levers.attn_implementation, cell.levers.gradient_checkpointing, cell.levers.loss_chunk,
                     cell.shape.batch_size, cell.shape.seq_len, cell.shape.grad_accum > 1, device)
    except StepFails as err:
        raise StepFails(f"{cell.model.name} / {cell.adapter.name}: the step fails on the meta device, as a run's "
                        f"would: {err}") from err.__cause__


# The phase of the loop each moment of ``moments`` falls in (the step's peak at one of _LiveBytes' moments)
PHASES = {"forward": "forward", "loss forward": "forward", "loss backward": "backward", "backward": "backward",
          "backward end": "backward", "optimizer step": "optimizer"}
DEQUANTISED = "the 4-bit weight bitsandbytes dequantises"


def moments(cell: CellConfig, device: str, gradients: int) -> tuple[StepPeak, dict[str, dict[str, int]]] | None:
    """The moments of a step whose model ``step_memory``'s formulas do not cover, from its step on the meta device,
    as ``step_memory.moments`` gives them for those it does (weights and optimizer state left to the caller): the
    step's peak, under its moment's name, with a later micro-batch's beside every one of the ``gradients`` and a
    QLoRA layer's dequantised 4-bit weight inside bitsandbytes' kernel (``DEQUANTISED``, derived); the end of
    backward; the optimizer step. With the step itself; None where the meta device cannot run it, or for FSDP2
    (whose shards one process does not hold).

    Raises:
        LeverUnavailable, StepFails: as ``step_peak``."""
    step = step_peak(cell, device) if cell.levers.parallel.strategy != "fsdp2" else None
    if step is None:
        return None
    at_peak = dict(step.parts)
    if cell.adapter.kind == "qlora" and step.moment in ("forward", "backward"):  # inside a layer
        dequantised = step_memory.dequantised_weight_parts(step.largest_frozen_linear,
                                                           step_memory.compute_bytes(cell.adapter))
        at_peak[DEQUANTISED] = sum(dequantised.values())
    if cell.shape.grad_accum > 1:
        at_peak["gradients"] += gradients
    temporaries = step_memory.optimizer_temporaries(device, step_memory.fused_optimizer(cell.optimizer.name),
                                                    gradients, step.largest_gradient)
    return step, {step.moment: at_peak, "backward end": {"gradients": gradients},
                  "optimizer step": {"gradients": gradients, "foreach_temporaries": temporaries}}
