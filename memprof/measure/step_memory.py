"""What a training step holds in memory, part by part: the analytic model of a Llama-family decoder step (Llama,
Qwen2, Qwen3, Mistral) under memprof's loop (forward ``model(input_ids=x, labels=x).loss`` or, with ``loss_chunk``,
memprof's chunked loss, backward, clip, optimizer step, ``zero_grad(set_to_none=True)``), as formulas of the model
config, the micro-batch and the training setup.

Enters: a ``StepShape`` (``step_shape`` makes one from a ``CellConfig``). Leaves: the bytes autograd saves
(``activation_bytes``, what ``SavedActivations`` measures) and, for each moment a step's peak can fall at, the named
parts alive then (``moments``, ``peak_parts``). ``memprof.measure.attribution`` names a measured peak's parts with it;
``memprof.plan`` predicts one. Checked to the byte against 21 cells measured on an NVIDIA H200 (torch 2.11 cu130,
transformers 5.17, peft 0.21, bitsandbytes 0.50.2), and within 0.19% against 19 on an H100 (2026-11-28, the 70B
QLoRA cell the farthest): ``tests/test_attribution.py``, ``tests/test_plan_accuracy.py`` and
``benchmarks/plan_accuracy.py``. The tensor-level reasoning behind each formula is in ``docs/step-memory.md``. The
chunked loss's parts were checked only on the CPU (against torch.profiler's allocator events and SavedActivations,
``tests/test_loss_chunk.py``); on CUDA they are the same autograd graph's tensors, not measured, so its moments are
listed in ``ESTIMATES``.

Conventions: T = batch x seq tokens; h hidden; i intermediate; nh heads; nkv kv heads; d head_dim; V vocab; L
layers; r rank. ``model_bytes`` m: 2 for bf16/fp16, 4 for fp32; ``adapter_bytes`` a: peft keeps LoRA weights in fp32
on a 16-bit base (``autocast_adapter_dtype=True``). The residual stream's and the projections' dtype is m, but 4 under
QLoRA (``prepare_model_for_kbit_training`` casts the embedding and norm weights to fp32, and bitsandbytes' Linear4bit
returns its input's dtype). "saved" = storages autograd keeps from forward for backward, each once (parameters
excluded; under checkpointing, the checkpointed layers' tensor inputs); "transient" = alive at a moment, not saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memprof.config.catalogue import CATALOGUE

if TYPE_CHECKING:
    from memprof.config.spec import AdapterSpec, CellConfig
    from memprof.train.sharding import Gathered

MiB = 1 << 20
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
CUBLAS_WORKSPACE_SM90 = 32 * MiB  # torch's default cuBLAS(+Lt, unified) workspace on compute capability 9.x
CUBLAS_WORKSPACE_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8  # torch's default elsewhere (:4096:2:16:8)


def logit_tokens(tokens: int, loss_chunk: int) -> int:
    """Tokens whose logits exist at once: a chunk's (the last may be shorter) with ``loss_chunk``, else all."""
    return min(loss_chunk, tokens) if loss_chunk else tokens


@dataclass(frozen=True)
class StepShape:
    """One micro-batch of one training cell: model config, tokens, dtypes, adapter, kernel and checkpointing."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    batch: int
    seq: int
    adapter: str = "lora"  # lora | qlora | dora | none (full fine-tune)
    attn: str = "sdpa"  # sdpa | eager
    checkpointing: bool = False  # non-reentrant, per decoder layer (transformers' activation_checkpointing_enable)
    model_bytes: int = 2  # bf16/fp16 = 2, fp32 = 4
    adapter_bytes: int = 4  # peft upcasts adapter weights to fp32 on a 16-bit base
    rank: int = 16
    lora_targets: tuple[str, ...] = field(default=ALL_LINEAR)
    lora_dropout: float = 0.0  # peft's lora_dropout: > 0 saves a mask and the dropped copy per LoRA module
    kbit_prepare: bool = True  # QLoRA: peft's prepare_model_for_kbit_training ran (non-4-bit weights cast to fp32)
    compute_bytes: int = 2  # QLoRA: bitsandbytes' compute dtype (only the 4-bit matmul's transients depend on it)
    fused_optimizer: bool = False  # bitsandbytes' and torch's fused optimizers: one kernel per tensor, in place
    device: str = "cuda"  # cuda | cpu: the SDPA kernel, dropout masks, cuBLAS workspaces, softmax-backward tmp
    cuda_major: int = 9  # compute capability major: 9 = H100/H200
    softmax_bwd_tmp: bool | None = None  # CUDA's softmax backward allocates tmp = grad * output (CPU's does not)
    bnb_fused_max_rows: int | None = None  # bitsandbytes' fused 4-bit GEMM up to this many rows (CUDA 1536; CPU 0)
    loss_chunk: int = 0  # tokens per chunk of memprof's chunked loss; 0: transformers' loss over the whole logits
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k, before RoPE
    tied_embeddings: bool = False  # the output head is the input embedding (one weight, one gradient)
    accumulating: bool = False  # grad_accum > 1: a later micro-batch runs beside the earlier ones' gradients

    def __post_init__(self) -> None:
        cuda = self.device == "cuda"
        if self.softmax_bwd_tmp is None:
            object.__setattr__(self, "softmax_bwd_tmp", cuda)
        if self.bnb_fused_max_rows is None:  # on the CPU bitsandbytes dequantises the whole weight every call
            object.__setattr__(self, "bnb_fused_max_rows", 1536 if cuda else 0)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def loss_tokens(self) -> int:
        return logit_tokens(self.tokens, self.loss_chunk)

    @property
    def fp32_kbit(self) -> bool:
        # QLoRA after prepare_model_for_kbit_training: embedding, norms and lm_head in fp32 whatever the precision
        return self.adapter == "qlora" and self.kbit_prepare

    @property
    def fp32_logits(self) -> bool:
        # lm_head's output: fp32 under prepared QLoRA (fp32 head, fp32 final-norm output), else the model dtype
        return self.fp32_kbit or self.model_bytes == 4

    @property
    def stream_bytes(self) -> int:
        # QLoRA: prepare_model_for_kbit_training casts embedding and norm weights to fp32 -> fp32 residual stream;
        # without it the embedding output and the stream stay in the model precision
        return 4 if self.fp32_kbit else self.model_bytes

    @property
    def proj_bytes(self) -> int:
        # QLoRA: Linear4bit returns its input's dtype (the stream's); LoRA/DoRA: peft casts the sum back to the base
        # result's dtype (the model's)
        return 4 if self.fp32_kbit else self.model_bytes

    @property
    def norm_out_bytes(self) -> int:
        # RMSNorm returns weight * x.to(input dtype): fp32 weight (prepared QLoRA) promotes to fp32
        return 4 if self.fp32_kbit else self.stream_bytes

    @property
    def dropout_mask_bytes(self) -> int:
        # LoRA dropout on x (already cast to the adapter dtype): CUDA's fused native_dropout saves a bool mask; the
        # CPU's x * noise saves the scaled keep-mask noise in x's dtype
        return 1 if self.device == "cuda" else self.adapter_bytes

    @property
    def sdpa_backend(self) -> str | None:
        return sdpa_backend(self.attn, self.device, self.proj_bytes, self.kv_heads < self.heads)

    def lora(self, module: str) -> bool:
        return self.adapter in ("lora", "qlora", "dora") and module in self.lora_targets


def sdpa_backend(attn: str, device: str, qkv_bytes: int, gqa: bool) -> str | None:
    """The kernel F.scaled_dot_product_attention runs on sm80+ for these calls (no mask, is_causal=True;
    transformers passes enable_gqa=True when there is no mask and nkv < nh instead of repeating k/v); None for
    another attention implementation."""
    if attn != "sdpa":
        return None
    if device == "cpu":
        # torch's CPU flash kernel (_scaled_dot_product_flash_attention_for_cpu) takes fp32, bf16 and fp16 and
        # enable_gqa natively: it saves q, k, v (kv-head size), out and an fp32 logsumexp, no rng state
        return "flash"
    if qkv_bytes == 2:
        return "flash"  # flash (or cuDNN on recent torch/cuDNN: the same saved bytes); both take GQA natively
    # fp32 q/k/v: flash and cuDNN need 16-bit; with enable_gqa the mem-efficient kernel is not eligible either
    # (torch 2.11), so the math path runs: the measured QLoRA activations match it to the byte.
    return "math" if gqa else "efficient"


def _bytes_s2(s: StepShape) -> int:
    """Elements of one attention-score matrix set: batch x heads x seq x seq."""
    return s.batch * s.heads * s.seq * s.seq


def norm_saved(s: StepShape) -> int:
    # RMSNorm: the fp32 copy of its input (pow and mul save it; it IS the input when the stream is fp32) + rsqrt [T, 1]
    return s.tokens * s.hidden * 4 + s.tokens * 4


def _needs_grad(s: StepShape, first: bool = False) -> dict[str, bool]:
    """Which of a decoder layer's tensors require grad. Every layer's input does, except the first layer's under an
    adapter (the frozen embedding's output); there only what a LoRA module makes, and what follows it, does."""
    x = not first or s.adapter == "none"  # the layer's input (and the frozen input norm's output)
    g = {"x": x, "q": x or s.lora("q"), "k": x or s.lora("k"), "v": x or s.lora("v")}
    g["attn"] = g["q"] or g["k"] or g["v"]  # the attention output
    g["mid"] = x or g["attn"] or s.lora("o")  # o_proj's output, the residual after attention, the post norm's output
    g["gate"], g["up"] = g["mid"] or s.lora("gate"), g["mid"] or s.lora("up")
    g["down"] = g["gate"] or g["up"]  # down_proj's input act(gate) * up
    return g


# LoRA module groups: (group, members, input width, input's grad flag in _needs_grad, input dtype attribute)
_GROUPS = (("qkv", ("q", "k", "v"), "hidden", "x", "norm_out_bytes"),
           ("gate_up", ("gate", "up"), "hidden", "mid", "norm_out_bytes"),
           ("o", ("o",), "attn_width", "attn", "proj_bytes"),
           ("down", ("down",), "intermediate", "down", "proj_bytes"))


def _out_features(s: StepShape, module: str) -> int:
    return {"q": s.heads * s.head_dim, "k": s.kv_heads * s.head_dim, "v": s.kv_heads * s.head_dim, "o": s.hidden,
            "gate": s.intermediate, "up": s.intermediate, "down": s.hidden}[module]


def _in_features(s: StepShape, module: str) -> int:
    return {"o": s.heads * s.head_dim, "down": s.intermediate}.get(module, s.hidden)


def lora_input_parts(s: StepShape, first: bool = False) -> dict[str, int]:
    """The inputs lora_A saves (it needs x for its weight gradient): peft casts x to the adapter dtype per LoRA layer,
    so modules sharing an input (q/k/v; gate/up) each keep their own copy when a cast happens, one shared copy when
    it does not (fp32 model, prepared QLoRA: the input is already fp32). With lora_dropout each module saves its own
    dropout output and, when its input requires grad, the dropout mask (no copy of x is saved then)."""
    T, a = s.tokens, s.adapter_bytes
    grads = _needs_grad(s, first)
    out: dict[str, int] = {}
    for group, members, width_name, grad, in_attr in _GROUPS:
        width = s.heads * s.head_dim if width_name == "attn_width" else getattr(s, width_name)
        targeted = [m for m in members if s.lora(m)]
        if not targeted:
            continue
        if s.lora_dropout > 0:
            out[f"lora_x_{group}"] = len(targeted) * T * width * a  # each module's dropout(x), saved by lora_A
            if grads[grad]:  # x * mask saves the mask for x's gradient (CPU: fp32 noise; CUDA: bool)
                out[f"lora_mask_{group}"] = len(targeted) * T * width * s.dropout_mask_bytes
            continue
        cast = getattr(s, in_attr) != a
        copies = len(targeted) if cast else 1
        if group == "o" and not cast and s.sdpa_backend == "flash" and grads["attn"]:
            copies = 0  # o's input is the flash output's storage (already saved by sdpa): counted once
        out[f"lora_x_{group}"] = copies * T * width * a  # x (cast to the adapter dtype) saved by lora_A's matmul
    return out


def dora_parts(s: StepShape, first: bool = False) -> dict[str, int]:
    """peft's DoRA (use_dora) per adapted module, on top of LoRA's saved inputs and lora_A outputs: result_dora =
    (m / ||W + BA||.detach() - 1) * base_result + m / ||..|| * lora_result * scaling. The ``dora_dead_*`` parts are
    saved by get_lora_weight's lora_B(lora_A(eye(in))), whose graph only feeds the detached norm: it dies in forward,
    so they are never alive at a peak, but memprof's tracker counts them (when no later storage reuses their address:
    its count is keyed by data pointer, so a dead storage's address taken by a later saved tensor hides that one)."""
    T, a, p, r = s.tokens, s.adapter_bytes, s.proj_bytes, s.rank
    grads = _needs_grad(s, first)
    grad_of = {m: grads[grad] for _, members, _, grad, _ in _GROUPS for m in members}
    out = {"dora_base_result": 0, "dora_lora_result": 0, "dora_vectors": 0, "dora_weight_copy": 0,
           "dora_dead_eye": 0, "dora_dead_eye_A_out": 0}
    for m in (m for m in ALL_LINEAR if s.lora(m)):
        n_out, n_in = _out_features(s, m), _in_features(s, m)
        # (mag - 1) * base_result saves base_result: the base layer's output, or with dropout F.linear(dropout(x), W)
        # in the adapter dtype
        out["dora_base_result"] += T * n_out * (a if s.lora_dropout > 0 else p)
        out["dora_lora_result"] += T * n_out * a  # mag_norm_scale * lora_result saves lora_result (fp32)
        # fp32 vectors: weight_norm (saved by magnitude / weight_norm), mag_norm_scale (saved by * lora_result) and,
        # when base_result requires grad, mag_norm_scale - 1
        out["dora_vectors"] += n_out * 4 * (3 if grad_of[m] else 2)
        if s.lora_dropout > 0 and grad_of[m] and s.model_bytes != a:
            out["dora_weight_copy"] += n_out * n_in * a  # F.linear(dropout(x), W.to(fp32)) saves the fp32 weight copy
        out["dora_dead_eye"] += n_in * n_in * a  # torch.eye(in) saved by lora_A (dead graph)
        out["dora_dead_eye_A_out"] += n_in * r * a  # lora_A(eye) saved by lora_B (dead graph)
    return out


def layer_saved_parts(s: StepShape, first: bool = False) -> dict[str, int]:
    """Storages one decoder layer saves for backward without checkpointing (memprof's activation_bytes per layer).
    Verified to the byte on the H200 records (sdpa, eager, LoRA, QLoRA) and against memprof on the CPU
    (tests/test_step_memory.py). ``first``: the first layer under an adapter, whose input needs no grad; its "norms"
    still count two norms when its post-attention norm saves (the final norm stands in for its input norm, which saves
    nothing)."""
    T, h, i, nh, nkv, d = s.tokens, s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim
    p = s.proj_bytes
    g = _needs_grad(s, first)
    # input_layernorm + post_attention_layernorm (first layer: the final norm + its post norm when that saves)
    parts: dict[str, int] = {"norms": (2 if g["mid"] else 1) * norm_saved(s)}
    if s.qk_norm:  # as norm_saved over each head: the fp32 copy of q_proj's (k_proj's) output and the rsqrt
        parts["qk_norms"] = g["q"] * T * nh * (d + 1) * 4 + g["k"] * T * nkv * (d + 1) * 4
    if s.adapter == "none":
        parts["norm_normed"] = 2 * T * h * s.stream_bytes  # trainable norm weight: mul saves x.to(input dtype)
        if s.qk_norm:
            parts["qk_norm_normed"] = T * (nh + nkv) * d * p
        parts["linear_x_qkv"] = T * h * s.norm_out_bytes  # q/k/v share one input; weights train -> saved once
        parts["linear_x_gate_up"] = T * h * s.norm_out_bytes  # gate/up share the post-attention norm output
        parts["linear_x_o"] = 0 if s.sdpa_backend == "flash" else T * nh * d * p  # flash output's storage
        parts["linear_x_down"] = T * i * p  # act(gate) * up
    else:
        parts.update(lora_input_parts(s, first))
        parts["lora_A_out"] = sum(s.lora(mod) for mod in ALL_LINEAR) * T * s.rank * s.adapter_bytes  # saved by lora_B
        if s.adapter == "dora":
            parts.update(dora_parts(s, first))
    # silu saves its input (gate out) when gate's output requires grad; silu(gate) * up saves each factor when the
    # other requires grad
    parts["mlp"] = (2 * g["gate"] + g["up"]) * T * i * p
    backend = s.sdpa_backend
    qk = g["q"] or g["k"]  # the scores (and the softmax) require grad
    if s.attn == "eager":
        # q (after RoPE), repeat_kv'd k and v: q @ k^T saves each factor when the other requires grad; probs @ v
        # saves v when the probs require grad
        parts["attn_qkv"] = (g["k"] + g["q"] + qk) * T * nh * d * p
        if p != 4:
            parts["attn_softmax_fp32"] = _bytes_s2(s) * 4 * qk  # softmax(dtype=fp32) saves its fp32 result
            parts["attn_probs"] = _bytes_s2(s) * p * g["v"]  # .to(query dtype) copy, saved by the probs @ v matmul
        else:  # fp32: the .to() is a no-op, the softmax result is the probs
            parts["attn_softmax_fp32"] = _bytes_s2(s) * 4 * (qk or g["v"])
        # dropout p=0 returns its input (no mask); the additive mask and the scaling save nothing
    elif not g["attn"]:
        pass  # no input of the attention requires grad: no backward node, nothing saved
    elif backend == "flash":
        parts["attn_q_out"] = 2 * T * nh * d * p  # flash saves q (after RoPE) and its output
        parts["attn_kv"] = 2 * T * nkv * d * p  # and k, v at kv-head size (enable_gqa: no repeat)
        parts["attn_lse"] = s.batch * nh * s.seq * 4  # softmax logsumexp [b, nh, s] fp32
        if s.device == "cuda":
            parts["attn_rng"] = 16  # philox seed and offset: two 8-byte int64 scalars (dropout 0); none on the CPU
    elif backend == "math":
        parts["attn_qkv"] = 3 * T * nh * d * p  # q*scale, repeat_interleave'd k*scale and v
        parts["attn_softmax"] = _bytes_s2(s) * p  # _safe_softmax result (also the probs @ v input)
    else:  # efficient (fp32 without GQA); unverified here
        parts["attn_q_out"] = 2 * T * nh * d * p
        parts["attn_kv"] = 2 * T * nkv * d * p
        parts["attn_lse"] = s.batch * nh * (-(-s.seq // 32) * 32) * 4
        parts["attn_rng"] = 16
    return parts


def dead_saved_bytes(s: StepShape) -> int:
    """Bytes in activation_bytes that are never alive at once with the rest: saved by graphs that die in forward
    (DoRA's weight-norm branch). Zero under checkpointing: the checkpoint's own hooks hide the layers' insides."""
    if s.adapter != "dora" or s.checkpointing:
        return 0
    per_layer = sum(v for k, v in dora_parts(s).items() if k.startswith("dora_dead"))
    return s.layers * per_layer


def layer_saved_bytes(s: StepShape, first: bool = False) -> int:
    return sum(layer_saved_parts(s, first).values())


def target_bytes(s: StepShape) -> int:
    # nll_loss saves the shifted labels: pad(labels,(0,1))[..., 1:].contiguous() is a copy for b > 1; for b = 1 the
    # slice is already contiguous, so the saved storage is the padded labels themselves (s + 1 int64)
    return (s.seq + 1) * 8 if s.batch == 1 else s.tokens * 8


def outside_saved_parts(s: StepShape) -> dict[str, int]:
    """Saved storages outside the decoder layers (plus, under checkpointing, what the checkpoint keeps per layer)."""
    T, h, V = s.tokens, s.hidden, s.vocab
    if s.loss_chunk:
        # each chunk's checkpoint keeps its inputs: views of the shifted labels (stored as nll_loss's target would
        # be) and of the final norm's output; the mean's division keeps the int64 count of labelled tokens
        parts = {"loss_labels": target_bytes(s), "loss_token_count": 8}
        if s.adapter != "none":  # a full fine-tune's trainable head saves that storage anyway: lm_head_x below
            parts["loss_hidden"] = T * h * s.norm_out_bytes
    else:
        parts = {
            "log_softmax_out": T * V * 4,  # cross_entropy = log_softmax (saves its fp32 result) + nll (saves it too)
            "nll_target": target_bytes(s),
            "nll_total_weight": 4,  # fp32 scalar
        }
    if s.adapter == "none":
        parts["embedding_indices"] = T * 8  # the embedding trains: its backward keeps input_ids
        parts["lm_head_x"] = T * h * s.norm_out_bytes  # tied lm_head trains: keeps the final norm output
    if not s.checkpointing:
        first = _needs_grad(s, first=True)
        if s.layers > 1 or first["q"] or first["k"]:  # q * cos, k * cos save cos/sin when q or k requires grad
            parts["rope_cos_sin"] = 2 * s.seq * s.head_dim * s.stream_bytes  # [1, s, d] each, shared by all layers
        # the first layer's input norm saves nothing for an adapter (the embedding output needs no grad) and the final
        # norm saves: the 2-norms-per-layer count covers both; a full fine-tune also saves the first one
        if s.adapter == "none":
            parts["extra_norm"] = norm_saved(s) + T * h * s.stream_bytes
        else:  # what the first layer does not save because its input needs no grad (0 for all-linear, no dropout)
            parts["first_layer_no_grad_input"] = layer_saved_bytes(s, first=True) - layer_saved_bytes(s)
        return parts
    parts["final_norm"] = norm_saved(s) + (T * h * s.stream_bytes if s.adapter == "none" else 0)
    parts["ckpt_layer_inputs"] = s.layers * T * h * s.stream_bytes  # each checkpointed layer keeps its hidden input
    parts["ckpt_position_ids"] = s.seq * 8  # int64 [1, s], one storage shared by all layers
    if s.attn == "eager":
        parts["ckpt_eager_mask"] = s.batch * s.seq * s.seq * s.stream_bytes  # [b, 1, s, s] additive mask
    # rope cos/sin reach the layers inside a tuple kwarg: alive, but memprof's counter does not see them
    return parts


def activation_bytes(s: StepShape) -> int:
    """What memprof's SavedActivations reports for this micro-batch: the storages saved for backward and alive
    together at the end of forward (not those of graphs that die in forward: DoRA's weight-norm branch)."""
    inside = 0 if s.checkpointing else s.layers * layer_saved_bytes(s)
    return inside + sum(outside_saved_parts(s).values()) - dead_saved_bytes(s)


def workspace_bytes(s: StepShape) -> int:
    return cublas_workspace_bytes(s.device, s.cuda_major)


def cublas_workspace_bytes(device: str, cuda_major: int = 9) -> int:
    """cuBLAS workspace, allocated through the caching allocator once per (handle, stream): one handle for the
    forward (main) thread and one for autograd's CUDA device thread that runs backward; none on the CPU."""
    if device == "cpu":
        return 0
    return 2 * (CUBLAS_WORKSPACE_SM90 if cuda_major >= 9 else CUBLAS_WORKSPACE_OTHER)


def logits_bytes(s: StepShape) -> int:
    # lm_head output dtype: fp32 under prepared QLoRA (fp32 tied weight, fp32 final-norm output), else the model dtype
    return s.tokens * s.vocab * (4 if s.fp32_kbit else s.model_bytes)


def loss_forward_transient(s: StepShape) -> dict[str, int]:
    """Alive (not saved) while log_softmax runs in forward: the logits and, for 16-bit logits, their fp32 copy
    (ForCausalLMLoss does logits.float(): a no-op for fp32 logits). Chunked: one chunk's fp32 logits (16-bit ones
    are dropped once cast) and log_softmax's output, which the chunk's checkpoint does not keep."""
    if s.loss_chunk:
        chunk = s.loss_tokens * s.vocab * 4
        return {"logits" if s.fp32_logits else "logits_fp32_copy": chunk, "log_softmax_out": chunk}
    out = {"logits": logits_bytes(s)}
    if logits_bytes(s) != s.tokens * s.vocab * 4:
        out["logits_fp32_copy"] = s.tokens * s.vocab * 4
    return out


def loss_backward_transient(s: StepShape) -> dict[str, int]:
    """The peak of backward's first nodes: nll_loss's backward makes a dense fp32 [T, V] gradient, then
    log_softmax's backward makes another while both that and the saved log_softmax output are alive
    (the CUDA log_softmax backward allocates nothing else). Same for every model precision: the loss is fp32.
    Chunked: ``chunked_loss_backward_parts``."""
    if s.loss_chunk:
        return chunked_loss_backward_parts(s)
    T, V = s.tokens, s.vocab
    return {"nll_grad": T * V * 4, "log_softmax_grad": T * V * 4}


def chunked_loss_backward_parts(s: StepShape) -> dict[str, int]:
    """The chunked loss at the log_softmax backward of its first chunk, which backward reaches last: that chunk's
    recomputed log_softmax output and two fp32 gradients, and the gradients of the hidden states of every other
    chunk, in the hidden states' dtype (``split``'s backward joins them once all are made). A full fine-tune's
    trainable head has its weight gradient summed over those chunks too."""
    chunk = s.loss_tokens * s.vocab * 4
    parts = {"log_softmax_out": chunk, "nll_grad": chunk, "log_softmax_grad": chunk,
             "hidden_grad": (s.tokens - s.loss_tokens) * s.hidden * s.norm_out_bytes}
    if s.adapter == "none" and s.loss_tokens < s.tokens:
        parts["gradients"] = s.vocab * s.hidden * s.model_bytes
    return parts


def chunked_head_backward_parts(s: StepShape) -> dict[str, int]:
    """A full fine-tune under the chunked loss, at the second chunk backward reaches: autograd adds that chunk's
    head weight gradient to the first's out of place (later chunks add in place), so three [V, h] tensors are
    alive, with the two chunks' hidden-state gradients. Nothing of the kind without chunks or a trainable head."""
    if s.adapter != "none" or s.loss_tokens == s.tokens:
        return {}
    chunks = -(-s.tokens // s.loss_tokens)
    head = s.vocab * s.hidden * s.model_bytes
    last_two = s.tokens - (chunks - 2) * s.loss_tokens
    return {"gradients": head, "head_grad_sum": 2 * head, "hidden_grad": last_two * s.hidden * s.norm_out_bytes}


def qlora_matmul_transient(s: StepShape, out_features: int, in_features: int, backward: bool = False) -> dict[str, int]:
    """One bitsandbytes 4-bit matmul (nf4, double quant) with compute dtype c (``compute_bytes``). Forward: x cast to
    the compute dtype ([T, in] c B when it is not already in it; not saved: MatMul4Bit keeps only the packed weight, in
    ctx.tensors), then either bnb's fused kernel (CUDA: T <= 1536 rows on sm90 per its heuristic; no weight buffer)
    or dequantise-then-F.linear (CUDA above that, the CPU always: a [out, in] compute-dtype weight plus the fp32
    absmax), the [T, out] output in the compute dtype and its cast back to the input dtype (the stream's).
    Backward: always dequantises the weight ([out, in] c B, plus absmax) for grad_input = grad @ W."""
    T, c = s.tokens, s.compute_bytes
    dequant = dequantised_weight_parts(out_features * in_features, c)
    if backward:
        return {**dequant, "grad_input": T * in_features * c}
    cast = c != s.stream_bytes  # .to(compute dtype) and .to(input dtype) are no-ops when they agree
    parts = {"x_compute_dtype": T * in_features * c * cast, "out_compute_dtype": T * out_features * c * cast}
    if T > s.bnb_fused_max_rows:
        parts.update(dequant)
    return parts


def dequantised_weight_parts(numel: int, compute_bytes: int) -> dict[str, int]:
    """A 4-bit weight of ``numel`` elements as bitsandbytes dequantises it for a matmul: in the compute dtype, with
    its fp32 absmax (one per 64-element block)."""
    return {"dequantised_weight": numel * compute_bytes, "absmax_fp32": numel // 64 * 4}


def optimizer_temporaries(device: str, fused: bool, gradients: int, largest_trainable: int) -> int:
    """What an optimizer step makes beside the gradients and its state: foreach AdamW (CUDA's default) about one more
    list of parameter-sized tensors; on the CPU torch's AdamW defaults to the single-tensor loop: about two temporaries
    of the largest trainable tensor (exp_avg_sq.sqrt() and its division by the bias correction); a fused optimizer
    (bitsandbytes', adamw_torch_fused) updates each tensor in place in one kernel."""
    if fused:
        return 0
    return 2 * largest_trainable if device == "cpu" else gradients


def lora_grad_bytes(s: StepShape, modules: tuple[str, ...]) -> int:
    """Gradient bytes of one layer's LoRA A and B for the given modules (accumulated as backward reaches them)."""
    size = {"q": (s.hidden, s.heads * s.head_dim), "k": (s.hidden, s.kv_heads * s.head_dim),
            "v": (s.hidden, s.kv_heads * s.head_dim), "o": (s.heads * s.head_dim, s.hidden),
            "gate": (s.hidden, s.intermediate), "up": (s.hidden, s.intermediate), "down": (s.intermediate, s.hidden)}
    return sum(s.rank * (size[m][0] + size[m][1]) * s.adapter_bytes for m in modules if s.lora(m))


def largest_trainable_bytes(s: StepShape) -> int:
    """The largest trainable tensor: a full fine-tune's embedding / lm_head or MLP weight, else a LoRA A or B."""
    if s.adapter == "none":
        return max(s.vocab * s.hidden, s.intermediate * s.hidden) * s.model_bytes
    return max((s.rank * max(_in_features(s, m), _out_features(s, m)) * s.adapter_bytes
                for m in ALL_LINEAR if s.lora(m)), default=0)


def gradients_before_first_layer(s: StepShape, gradients: int) -> int:
    """The gradients made when backward reaches layer 0, of ``gradients`` (all of the step's): an adapter's are its
    layers', L - 1 of L made; a full fine-tune's are also the head's, made first, and not the embedding's, made last,
    unless the two are one weight (benchmarks/moment_replay.py)."""
    if s.adapter != "none":
        return gradients * (s.layers - 1) // s.layers
    head = s.vocab * s.hidden * s.model_bytes
    embedding = 0 if s.tied_embeddings else head
    layers = gradients - head - embedding - s.hidden * s.model_bytes  # less the final norm's weight
    return gradients - embedding - layers // s.layers


def attention_backward_parts(s: StepShape) -> dict[str, int]:
    """What one layer holds at the top of its attention backward (the layer's MLP, post-attention norm and o_proj
    are done and their saved tensors freed): the attention-side saved tensors still needed plus the transients.

    eager / math on CUDA: at softmax's backward the fp32 scores-shaped tensors alive are the saved softmax output,
    its incoming fp32 gradient, the CUDA kernel's ``tmp = grad * output`` and the fp32 grad_input: 16 B per element
    (the 16-bit probs and their 16-bit gradient are freed by then). flash: dq's fp32 accumulator, dq, and the
    full-head dk/dv that GQA then sums (an estimate from the kernel's layout, not checked against a peak)."""
    T, nh, d, p = s.tokens, s.heads, s.head_dim, s.proj_bytes
    full = layer_saved_parts(s)
    parts = {"norm_in": norm_saved(s)}
    parts.update({k: v for k, v in full.items() if k in ("lora_x_qkv", "lora_mask_qkv", "linear_x_qkv")})
    parts["lora_A_out_qkv"] = sum(s.lora(m) for m in ("q", "k", "v")) * T * s.rank * s.adapter_bytes
    if s.attn == "eager" or s.sdpa_backend == "math":
        parts["attn_q_k"] = 2 * T * nh * d * p  # saved by scores = q @ k^T (v's copy is freed with probs @ v)
        parts["softmax_out"] = _bytes_s2(s) * 4 if s.attn == "eager" else _bytes_s2(s) * p
        # fp32 incoming grad + fp32 grad_input (+ CUDA's tmp = grad * output)
        parts["softmax_bwd_transient"] = _bytes_s2(s) * (12 if s.softmax_bwd_tmp else 8)
        parts["grad_v"] = T * nh * d * p  # probs @ v backward's dv, waiting for repeat_kv's backward
    else:
        parts.update({k: v for k, v in full.items() if k.startswith("attn_")})
        parts["flash_bwd_transient"] = T * nh * d * (p + 4 + p + 2 * p) + s.batch * nh * s.seq * 4
    parts["residual_grad"] = T * s.hidden * s.stream_bytes
    parts["lora_grads_so_far"] = lora_grad_bytes(s, ("o", "gate", "up", "down"))
    return parts


def recompute_forward_parts(s: StepShape) -> dict[str, int]:
    """Checkpointing: the first recomputed layer at its softmax during the recompute, which backward's first
    unpack of a saved tensor of that layer triggers (the down_proj LoRA-B node). Eager: the masked 16-bit scores,
    their fp32 upcast and the fp32 result (10 B per element for 16-bit); q and the repeated k, v; k, v before
    repeat_kv (locals); the incoming gradients of the down_proj node. An estimate checked on a CPU replay (at
    aten::softmax), never the peak in the H200 cells."""
    T, h, nh, nkv, d, p = s.tokens, s.hidden, s.heads, s.kv_heads, s.head_dim, s.proj_bytes
    parts = {"norm_in": norm_saved(s), "lora_A_out_qkv": sum(s.lora(m) for m in ("q", "k", "v")) * T * s.rank *
             s.adapter_bytes}
    parts.update({k: v for k, v in layer_saved_parts(s).items() if k in ("lora_x_qkv", "lora_mask_qkv",
                                                                           "linear_x_qkv")})
    parts["incoming_grads"] = T * h * (s.stream_bytes + s.adapter_bytes + 2 * s.model_bytes)
    if s.attn == "eager" or s.sdpa_backend == "math":
        parts["attn_q_krep_vrep"] = 3 * T * nh * d * p
        parts["attn_k_v"] = 2 * T * nkv * d * p if nkv < nh else 0
        parts["softmax_fwd_transient"] = _bytes_s2(s) * ((p + 4 + 4) if p != 4 else (4 + 4))
    return parts


def forward_softmax_parts(s: StepShape) -> dict[str, int]:
    """Forward, eager/math: the last layer's softmax (everything before it saved or kept): the masked scores and
    (16-bit) their fp32 upcast on top of the saved result. Without checkpointing the earlier layers' saved tensors
    are alive; with it, only the layer inputs. An estimate, never the peak in the H200 cells."""
    T, h, nh, d, p = s.tokens, s.hidden, s.heads, s.head_dim, s.proj_bytes
    if not (s.attn == "eager" or s.sdpa_backend == "math"):
        return {}
    if s.checkpointing:  # saved tensors become the checkpoint's holders: only the attention's locals are alive
        return {"layer_x_normed": T * h * s.norm_out_bytes, "attn_q_krep_vrep": 3 * T * nh * d * p,
                "attn_k_v": 2 * T * s.kv_heads * d * p if s.kv_heads < nh else 0,
                "softmax_fwd_transient": _bytes_s2(s) * ((p + 4 + 4) if p != 4 else (4 + 4))}
    saved = layer_saved_parts(s)
    after = sum(v for k, v in saved.items() if k in ("mlp", "lora_x_o", "lora_x_gate_up", "lora_x_down", "lora_mask_o",
                                                     "lora_mask_gate_up", "lora_mask_down", "linear_x_o",
                                                     "linear_x_gate_up", "linear_x_down"))
    after += norm_saved(s) + sum(s.lora(m) for m in ("o", "gate", "up", "down")) * T * s.rank * s.adapter_bytes
    after += _bytes_s2(s) * p if "attn_probs" in saved else 0
    return {"minus_not_yet_saved": -after, "softmax_fwd_transient": _bytes_s2(s) * ((p + 4) if p != 4 else 4)}


def mlp_backward_parts(s: StepShape) -> dict[str, int]:
    """An estimate from a CPU replay of the top of the last layer's MLP backward, checked on CUDA once
    (small-llama fp32, where it is the peak): the whole layer's saved tensors plus about one fp32 [T, i]
    gradient (two on CUDA) and a few [T, h] ones; under checkpointing two fp32 [T, i] tensors of the recompute are
    still alive when the first node runs (benchmarks/moment_replay.py: 0.1% to 10.8% over the replayed backward
    peak where this moment is the largest)."""
    T, h, i = s.tokens, s.hidden, s.intermediate
    a = s.adapter_bytes if s.adapter != "none" else s.proj_bytes  # a full fine-tune's gradients: the model's dtype
    transient = (2 * T * i * a + 3 * T * h * a) if s.checkpointing else (T * i * a + T * h * (a + s.stream_bytes))
    if s.device != "cpu" and not s.checkpointing:
        # one more [T, i] gradient on CUDA: at small-llama's fp32 peak on an H200 (2026-11-28, allocator history) 18
        # such blocks were alive, where the layers save 16 and the CPU replay has one transient
        transient += T * i * a
    parts = {"layer_saved": layer_saved_bytes(s), "mlp_bwd_transient": transient}
    if s.adapter == "qlora":  # down_proj's grad_input dequantises its 4-bit weight
        parts.update(qlora_matmul_transient(s, h, i, backward=True))
    return parts


def lora_merge_forward_parts(s: StepShape) -> dict[str, int]:
    """Forward, LoRA on a 16-bit base: peft's ``result + lora_B(lora_A(x)) * scaling`` for the widest module
    (up_proj, [T, i]) holds the base result (16-bit), the fp32 LoRA output, its scaled copy and the fp32 sum before
    casting back. An estimate (CPU replay: 15.5-16 B per element against the 14 counted here); the layer's down_proj
    input and LoRA output and up_proj's output are not made yet."""
    if not s.lora("up") or s.adapter_bytes == s.proj_bytes:
        return {}
    T, i, a, p = s.tokens, s.intermediate, s.adapter_bytes, s.proj_bytes
    not_yet = T * i * p + (T * i * a if s.lora("down") else 0) + s.lora("down") * T * s.rank * a
    return {"minus_not_yet_saved": -not_yet, "lora_merge_transient": T * i * (p + 3 * a)}


def moments(s: StepShape, weights: int, optimizer: int, gradients: int | None = None,
            activations: int | None = None) -> dict[str, dict[str, int]]:
    """Every moment of the step the peak can fall at, each as the named parts alive then (``PHASES`` says which
    phase of the loop a moment is in).

    ``weights`` = frozen + trainable + buffers, ``optimizer`` = optimizer state minus paged (both exact from the
    record or memprof's formulas); ``gradients`` defaults to the trainable LoRA bytes of the whole model;
    ``activations`` defaults to this module's formula (pass the measured ``activation_bytes`` to attribute a run).
    The optimizer state exists from the first step on, and the peak of a run is a later step's, so it is alive at
    every candidate; gradients are None (set_to_none) until backward makes them.
    """
    A = activation_bytes(s) if activations is None else activations
    G = gradients if gradients is not None else s.layers * lora_grad_bytes(s, ALL_LINEAR)
    base = {"weights": weights, "optimizer_state": optimizer, "input_ids": s.tokens * 8}
    if workspace_bytes(s):
        base["cublas_workspaces"] = workspace_bytes(s)
    outside = outside_saved_parts(s)
    out: dict[str, dict[str, int]] = {}

    loss = "chunked loss" if s.loss_chunk else "loss"
    out[f"{loss} forward"] = {**base, "activations": A, **loss_forward_transient(s)}
    out[f"{loss} backward"] = {**base, "activations": A, **loss_backward_transient(s)}
    head = chunked_head_backward_parts(s)
    if head:
        out["chunked loss head backward"] = {**base, "activations": A, **head}

    # first layer processed in backward (index L-1): the loss's tensors and the final norm's are freed by then
    freed = sum(outside.get(name, 0) for name in ("log_softmax_out", "nll_target", "nll_total_weight", "loss_labels",
                                                  "loss_token_count", "loss_hidden"))
    if s.checkpointing:
        layer_input = s.tokens * s.hidden * s.stream_bytes  # what a checkpointed layer keeps; also a residual grad
        kept = {"ckpt_kept": A - freed - outside["final_norm"],
                "rope_cos_sin": 2 * s.seq * s.head_dim * s.stream_bytes}
        out["recomputed attention backward"] = {**base, **kept, **attention_backward_parts(s)}
        out["recompute forward"] = {**base, **kept, **recompute_forward_parts(s), "residual_grad": layer_input}
        out["recomputed MLP backward"] = {**base, **kept, **mlp_backward_parts(s)}
        # the last layer backward reaches (layer 0): the other layers' inputs are freed and their gradients made, which
        # for a large adapter outweighs them (the 70B QLoRA r64 cell on an H100: its allocator peak, 51.66 GB, within
        # 0.07% of this moment's MLP backward, 1.2 GB above the end of backward)
        first = {"ckpt_kept": kept["ckpt_kept"] - (s.layers - 1) * layer_input,
                 "rope_cos_sin": kept["rope_cos_sin"], "gradients": gradients_before_first_layer(s, G)}
        out["layer 0 recomputed attention backward"] = {**base, **first, **attention_backward_parts(s)}
        out["layer 0 recompute forward"] = {**base, **first, **recompute_forward_parts(s), "residual_grad": layer_input}
        out["layer 0 recomputed MLP backward"] = {**base, **first, **mlp_backward_parts(s)}
    else:
        # all other layers' saved tensors stay; the last layer's attention-side ones are listed in the parts
        rest = A - freed - norm_saved(s) - layer_saved_bytes(s)  # final norm counted as one of the layer norms
        out["attention backward"] = {**base, "other_layers_saved": rest,
                                                            **attention_backward_parts(s)}
        out["MLP backward"] = {**base, "other_layers_saved": rest,
                                                                 **mlp_backward_parts(s)}
        merge = lora_merge_forward_parts(s)
        if merge:
            out["LoRA merge forward"] = {
                **base, "activations_so_far": A - freed - norm_saved(s), **merge}
    fwd = forward_softmax_parts(s)
    if fwd:
        if s.checkpointing:  # the layers' kept inputs, as at the recompute above
            out["softmax forward"] = {**base, **kept, **fwd}
        else:
            out["softmax forward"] = {**base, "activations_so_far": A - freed - norm_saved(s),
                                                             **fwd}
    if s.adapter == "qlora" and not s.checkpointing:
        # the last layer's up_proj 4-bit matmul: gate's output and act are made, up's output and down's inputs not yet
        not_yet = s.tokens * s.intermediate * (s.proj_bytes + s.adapter_bytes) + s.tokens * s.rank * s.adapter_bytes
        out["4-bit matmul forward"] = {
            **base, "activations_so_far": A - freed - norm_saved(s) - not_yet,
            **qlora_matmul_transient(s, s.intermediate, s.hidden)}
    # end of backward: every gradient made (LoRA: small; full fine-tune: the whole model's)
    out["backward end"] = {**base, "gradients": G}
    # optimizer step: gradients complete, and the optimizer's own temporaries
    temporaries = optimizer_temporaries(s.device, s.fused_optimizer, G, largest_trainable_bytes(s))
    name = "per_tensor_temporaries" if s.device == "cpu" else "foreach_temporaries"
    out["optimizer step"] = {**base, "gradients": G, **({name: temporaries} if temporaries else {})}
    # held-out evaluation under no_grad: the logits, their fp32 copy and log_softmax's output (no saved tensors);
    # chunked: one chunk's, with the final hidden states the chunks are cut from
    if s.loss_chunk:
        out["eval"] = {**base, **loss_forward_transient(s), "eval_hidden": s.tokens * s.hidden * s.norm_out_bytes}
    else:
        out["eval"] = {**base, **loss_forward_transient(s), "log_softmax_out": s.tokens * s.vocab * 4}
    if s.accumulating:  # every gradient is there from the first micro-batch on (eval comes after zero_grad)
        for name, parts in out.items():
            if name != "eval":
                parts["gradients"] = G
    return out


# FSDP2 at each moment: the root unit's weights alone once the last layer's forward is done (its head and loss, and
# an eval's); at the loss's backward also the last layer's, whose all-gather the root's pre-backward issues; inside
# a layer, that layer's and the next one's (gathered ahead); none at the end of backward, which reshards every unit
_GATHERED_LAYERS = {"loss forward": 0, "chunked loss forward": 0, "eval": 0, "loss backward": 1,
                    "chunked loss backward": 1, "chunked loss head backward": 1}
_RESHARDED = ("backward end", "optimizer step")


def gathered_layers(moment: str) -> int:
    """How many decoder layers' weights FSDP2 holds all-gathered at ``moment`` beside the root unit's."""
    return _GATHERED_LAYERS.get(moment, 2)


def with_gathered(every: dict[str, dict[str, int]], gathered: Gathered) -> dict[str, dict[str, int]]:
    """``moments`` with an FSDP2 rank's all-gathered weights (``memprof.train.sharding.gathered``) where FSDP2 holds
    them (``_GATHERED_LAYERS``)."""
    if not gathered.root and not gathered.layers:
        return every
    return {name: parts if name in _RESHARDED else
            {**parts, "gathered_weights": gathered.with_layers(gathered_layers(name))} for name, parts in every.items()}


def peak_parts(s: StepShape, weights: int, optimizer: int, gradients: int | None = None,
               activations: int | None = None) -> tuple[str, dict[str, int]]:
    """The moment of the step with the most bytes allocated, and its named parts (arguments as ``moments``)."""
    every = moments(s, weights, optimizer, gradients, activations)
    best = max(every, key=lambda name: sum(every[name].values()))
    return best, every[best]


# The phase of the loop each moment is in (as the probe names phases), and the moments whose parts are estimates
# rather than checked against a measured peak: from CPU replays, or (the chunked loss's) exact on the CPU but never
# measured on a GPU.
PHASES = {"loss forward": "forward", "softmax forward": "forward", "LoRA merge forward": "forward",
          "4-bit matmul forward": "forward", "chunked loss forward": "forward", "loss backward": "backward",
          "chunked loss backward": "backward", "chunked loss head backward": "backward",
          "attention backward": "backward", "MLP backward": "backward", "recompute forward": "backward",
          "recomputed attention backward": "backward", "recomputed MLP backward": "backward",
          "layer 0 recomputed attention backward": "backward", "layer 0 recompute forward": "backward",
          "layer 0 recomputed MLP backward": "backward",
          "backward end": "backward", "optimizer step": "optimizer", "eval": "eval"}
ESTIMATES = ("LoRA merge forward", "4-bit matmul forward", "MLP backward", "recomputed MLP backward",
             "layer 0 recomputed attention backward", "layer 0 recompute forward", "layer 0 recomputed MLP backward",
             "optimizer step", "eval", "chunked loss forward", "chunked loss backward", "chunked loss head backward")


def phase(moment: str) -> str:
    """The phase of the loop a moment of ``moments`` is in: forward, backward, optimizer or eval."""
    return PHASES[moment]



# decoder layers as Llama's: RMSNorm, RoPE, q/k/v/o, SwiGLU gate/up/down (Qwen3: and an RMSNorm per q and k head)
MODELLED = ("llama", "qwen2", "qwen3", "mistral")
_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down"}
_FULL_NAMES = {short: f"model.layers.0.{'mlp' if short in ('gate', 'up', 'down') else 'self_attn'}.{name}"
               for name, short in _MODULES.items()}
# LoRA settings the formulas do not follow: a cell with any of them is attributed and planned without them
_NOT_MODELLED = ("rank_pattern", "layers_to_transform", "modules_to_save", "layers_pattern")
MODEL_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_QUANT_COMPUTE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def step_shape(cell: CellConfig, device: str, cuda_major: int = 9) -> StepShape | None:
    """The shape of one micro-batch of ``cell`` on ``device`` (cpu, or cuda with compute capability major
    ``cuda_major``), or None where the formulas do not cover the cell: another architecture, a model known only by
    name, or a LoRA setting they do not follow (per-module ranks, layer subsets, modules to save)."""
    from memprof.train.models import ModelLoadError, build_config

    adapter = cell.adapter
    lora = adapter.lora
    if not cell.model.known or any(lora.get(name) for name in _NOT_MODELLED):
        return None
    targets = lora_targets(lora.get("target_modules")) if adapter.kind != "none" else ALL_LINEAR
    if targets is None:
        return None
    try:
        config = build_config(cell.model)
    except ModelLoadError:
        return None
    if config.model_type not in MODELLED:
        return None
    heads = config.num_attention_heads
    return StepShape(hidden=config.hidden_size, intermediate=config.intermediate_size,
                     layers=config.num_hidden_layers, heads=heads,
                     kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                     head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                     vocab=config.vocab_size, batch=cell.shape.batch_size, seq=cell.shape.seq_len,
                     adapter=adapter.kind, attn=cell.levers.attn_implementation,
                     checkpointing=cell.levers.gradient_checkpointing != "off",
                     model_bytes=MODEL_BYTES[cell.shape.precision], rank=int(lora.get("r", 8)) if lora else 8,
                     lora_targets=targets, lora_dropout=float(lora.get("lora_dropout") or 0.0),
                     kbit_prepare=adapter.quant.prepare_for_kbit_training,
                     compute_bytes=compute_bytes(adapter),
                     fused_optimizer=fused_optimizer(cell.optimizer.name), device=device,
                     cuda_major=cuda_major, loss_chunk=cell.levers.loss_chunk,
                     qk_norm=config.model_type == "qwen3",
                     tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                     accumulating=cell.shape.grad_accum > 1)


def compute_bytes(adapter: AdapterSpec) -> int:
    """The element size of bitsandbytes' compute dtype under a QLoRA ``adapter``."""
    return MODEL_BYTES[_QUANT_COMPUTE[adapter.quant.compute_dtype]]


def fused_optimizer(optimizer: str) -> bool:
    """Whether ``optimizer`` updates each tensor in place in one kernel (bitsandbytes', torch's ``_fused``)."""
    entry = CATALOGUE.get(optimizer)
    return optimizer.endswith("_fused") or (entry is not None and entry.library == "bitsandbytes")


def lora_targets(target_modules: object) -> tuple[str, ...] | None:
    """peft's ``target_modules`` as this module's short names (q, k, v, o, gate, up, down); None when it names
    anything else."""
    if target_modules == "all-linear":
        return ALL_LINEAR
    if target_modules in ("attention", None):  # memprof's default, as peft's for Llama is q and v only
        return ("q", "k", "v", "o") if target_modules == "attention" else ("q", "v")
    if isinstance(target_modules, str):  # a regular expression over full module names, as peft matches it
        import re

        pattern = re.compile(target_modules)
        return tuple(short for short, full in _FULL_NAMES.items() if pattern.fullmatch(full))
    names = list(target_modules)  # type: ignore[call-overload]
    if not all(name in _MODULES for name in names):
        return None
    return tuple(short for name, short in _MODULES.items() if name in names)
