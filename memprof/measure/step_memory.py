"""What a training step holds in memory, part by part: the analytic model of a Llama-family decoder step under
memprof's loop (forward ``model(input_ids=x, labels=x).loss``, backward, clip, optimizer step,
``zero_grad(set_to_none=True)``), as formulas of the model config, the micro-batch and the training setup.

Enters: a ``StepShape`` (``step_shape`` makes one from a ``CellConfig``). Leaves: the bytes autograd saves
(``activation_bytes``, what ``SavedActivations`` measures) and, for each moment a step's peak can fall at, the named
parts alive then (``moments``, ``peak_parts``). ``memprof.measure.attribution`` names a measured peak's parts with it;
``memprof.plan`` predicts one. Checked to the byte against 21 cells measured on an NVIDIA H200 (torch 2.11 cu130,
transformers 5.17, peft 0.21, bitsandbytes 0.50.2): ``tests/test_step_memory.py`` and
``benchmarks/plan_accuracy.py``. The tensor-level reasoning behind each formula is in ``docs/step-memory.md``.

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

if TYPE_CHECKING:
    from memprof.config.spec import CellConfig

MiB = 1 << 20
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
CUBLAS_WORKSPACE_SM90 = 32 * MiB  # torch's default cuBLAS(+Lt, unified) workspace on compute capability 9.x
CUBLAS_WORKSPACE_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8  # torch's default elsewhere (:4096:2:16:8)


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
    adapter: str = "lora"  # lora | qlora | none (full fine-tune)
    attn: str = "sdpa"  # sdpa | eager
    checkpointing: bool = False  # non-reentrant, per decoder layer (transformers' activation_checkpointing_enable)
    model_bytes: int = 2  # bf16/fp16 = 2, fp32 = 4
    adapter_bytes: int = 4  # peft upcasts adapter weights to fp32 on a 16-bit base
    rank: int = 16
    lora_targets: tuple[str, ...] = field(default=ALL_LINEAR)
    cuda_major: int = 9  # compute capability major: 9 = H100/H200
    softmax_bwd_tmp: bool = True  # CUDA's softmax backward allocates tmp = grad * output (the CPU kernel does not)
    bnb_fused_max_rows: int = 1536  # bitsandbytes' fused 4-bit GEMM up to this many rows on CUDA (CPU: 0, dequantises)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def stream_bytes(self) -> int:
        # QLoRA: prepare_model_for_kbit_training casts embedding and norm weights to fp32 -> fp32 residual stream
        return 4 if self.adapter == "qlora" else self.model_bytes

    @property
    def proj_bytes(self) -> int:
        # QLoRA: Linear4bit returns its (fp32) input's dtype; LoRA: peft casts the sum back to the base dtype
        return 4 if self.adapter == "qlora" else self.model_bytes

    @property
    def norm_out_bytes(self) -> int:
        # RMSNorm returns weight * x.to(input dtype): fp32 weight (QLoRA) promotes to fp32
        return 4 if self.adapter == "qlora" else self.stream_bytes

    @property
    def sdpa_backend(self) -> str | None:
        """The kernel F.scaled_dot_product_attention runs on sm80+ for these calls (no mask, is_causal=True;
        transformers passes enable_gqa=True when there is no mask and nkv < nh instead of repeating k/v)."""
        if self.attn != "sdpa":
            return None
        if self.proj_bytes == 2:
            return "flash"  # flash (or cuDNN on recent torch/cuDNN: the same saved bytes); both take GQA natively
        # fp32 q/k/v: flash and cuDNN need 16-bit; with enable_gqa the mem-efficient kernel is not eligible either
        # (torch 2.11), so the math path runs: the measured QLoRA activations match it to the byte.
        return "math" if self.kv_heads < self.heads else "efficient"

    def lora(self, module: str) -> bool:
        return self.adapter in ("lora", "qlora") and module in self.lora_targets


def _bytes_s2(s: StepShape) -> int:
    """Elements of one attention-score matrix set: batch x heads x seq x seq."""
    return s.batch * s.heads * s.seq * s.seq


def norm_saved(s: StepShape) -> int:
    # RMSNorm: the fp32 copy of its input (pow and mul save it; it IS the input when the stream is fp32) + rsqrt [T, 1]
    return s.tokens * s.hidden * 4 + s.tokens * 4


def lora_input_parts(s: StepShape) -> dict[str, int]:
    """The inputs lora_A saves (it needs x for its weight gradient): peft casts x to the adapter dtype per LoRA layer,
    so modules sharing an input (q/k/v; gate/up) each keep their own copy when a cast happens, one shared copy when
    it does not (QLoRA: the fp32 norm output is already fp32)."""
    T, a = s.tokens, s.adapter_bytes
    out: dict[str, int] = {}
    for group, members, width, in_bytes in (("qkv", ("q", "k", "v"), s.hidden, s.norm_out_bytes),
                                           ("gate_up", ("gate", "up"), s.hidden, s.norm_out_bytes),
                                           ("o", ("o",), s.heads * s.head_dim, s.proj_bytes),
                                           ("down", ("down",), s.intermediate, s.proj_bytes)):
        targeted = [m for m in members if s.lora(m)]
        if not targeted:
            continue
        cast = in_bytes != a
        copies = len(targeted) if cast else 1
        if group == "o" and not cast and s.sdpa_backend == "flash":
            copies = 0  # o's input is the flash output's storage (already saved by sdpa): counted once
        out[f"lora_x_{group}"] = copies * T * width * a  # x (cast to the adapter dtype) saved by lora_A's matmul
    return out


def layer_saved_parts(s: StepShape) -> dict[str, int]:
    """Storages one decoder layer saves for backward without checkpointing (memprof's activation_bytes per layer).
    Verified to the byte on the H200 records (sdpa, eager, LoRA, QLoRA) and by tracing on the CPU (trace_cpu.py)."""
    T, h, i, nh, nkv, d = s.tokens, s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim
    p = s.proj_bytes
    parts: dict[str, int] = {"norms": 2 * norm_saved(s)}  # input_layernorm + post_attention_layernorm
    if s.adapter == "none":
        parts["norm_normed"] = 2 * T * h * s.stream_bytes  # trainable norm weight: mul saves x.to(input dtype)
        parts["linear_x_qkv"] = T * h * s.norm_out_bytes  # q/k/v share one input; weights train -> saved once
        parts["linear_x_gate_up"] = T * h * s.norm_out_bytes  # gate/up share the post-attention norm output
        parts["linear_x_o"] = 0 if s.sdpa_backend == "flash" else T * nh * d * p  # flash output's storage
        parts["linear_x_down"] = T * i * p  # act(gate) * up
    else:
        parts.update(lora_input_parts(s))
        parts["lora_A_out"] = sum(s.lora(mod) for mod in ALL_LINEAR) * T * s.rank * s.adapter_bytes  # saved by lora_B
    parts["mlp"] = 3 * T * i * p  # silu saves its input (gate out); the product saves silu(gate) and up out
    backend = s.sdpa_backend
    if s.attn == "eager":
        parts["attn_qkv"] = 3 * T * nh * d * p  # q (after RoPE), repeat_kv'd k and v: matmuls save them
        parts["attn_softmax_fp32"] = _bytes_s2(s) * 4  # softmax(dtype=fp32) saves its fp32 result
        if p != 4:
            parts["attn_probs"] = _bytes_s2(s) * p  # .to(query dtype) copy, saved by the probs @ v matmul
        # dropout p=0 returns its input (no mask); the additive mask and the scaling save nothing
    elif backend == "flash":
        parts["attn_q_out"] = 2 * T * nh * d * p  # flash saves q (after RoPE) and its output
        parts["attn_kv"] = 2 * T * nkv * d * p  # and k, v at kv-head size (enable_gqa: no repeat)
        parts["attn_lse"] = s.batch * nh * s.seq * 4  # softmax logsumexp [b, nh, s] fp32
        parts["attn_rng"] = 16  # philox seed and offset: two 8-byte int64 scalars (dropout 0)
    elif backend == "math":
        parts["attn_qkv"] = 3 * T * nh * d * p  # q*scale, repeat_interleave'd k*scale and v
        parts["attn_softmax"] = _bytes_s2(s) * p  # _safe_softmax result (also the probs @ v input)
    else:  # efficient (fp32 without GQA); unverified here
        parts["attn_q_out"] = 2 * T * nh * d * p
        parts["attn_kv"] = 2 * T * nkv * d * p
        parts["attn_lse"] = s.batch * nh * (-(-s.seq // 32) * 32) * 4
        parts["attn_rng"] = 16
    return parts


def layer_saved_bytes(s: StepShape) -> int:
    return sum(layer_saved_parts(s).values())


def target_bytes(s: StepShape) -> int:
    # nll_loss saves the shifted labels: pad(labels,(0,1))[..., 1:].contiguous() is a copy for b > 1; for b = 1 the
    # slice is already contiguous, so the saved storage is the padded labels themselves (s + 1 int64)
    return (s.seq + 1) * 8 if s.batch == 1 else s.tokens * 8


def outside_saved_parts(s: StepShape) -> dict[str, int]:
    """Saved storages outside the decoder layers (plus, under checkpointing, what the checkpoint keeps per layer)."""
    T, h, V = s.tokens, s.hidden, s.vocab
    parts = {
        "log_softmax_out": T * V * 4,  # cross_entropy = log_softmax (saves its fp32 result) + nll (saves it too)
        "nll_target": target_bytes(s),
        "nll_total_weight": 4,  # fp32 scalar
    }
    if s.adapter == "none":
        parts["embedding_indices"] = T * 8  # the embedding trains: its backward keeps input_ids
        parts["lm_head_x"] = T * h * s.norm_out_bytes  # tied lm_head trains: keeps the final norm output
    if not s.checkpointing:
        parts["rope_cos_sin"] = 2 * s.seq * s.head_dim * s.stream_bytes  # [1, s, d] each, shared by all layers
        # the first layer's input norm saves nothing for LoRA/QLoRA (the embedding output needs no grad) and the final
        # norm saves: the 2-norms-per-layer count covers both; a full fine-tune also saves the first one
        if s.adapter == "none":
            parts["extra_norm"] = norm_saved(s) + T * h * s.stream_bytes
        return parts
    parts["final_norm"] = norm_saved(s) + (T * h * s.stream_bytes if s.adapter == "none" else 0)
    parts["ckpt_layer_inputs"] = s.layers * T * h * s.stream_bytes  # each checkpointed layer keeps its hidden input
    parts["ckpt_position_ids"] = s.seq * 8  # int64 [1, s], one storage shared by all layers
    if s.attn == "eager":
        parts["ckpt_eager_mask"] = s.batch * s.seq * s.seq * s.stream_bytes  # [b, 1, s, s] additive mask
    # rope cos/sin reach the layers inside a tuple kwarg: alive, but memprof's counter does not see them
    return parts


def activation_bytes(s: StepShape) -> int:
    """What memprof's SavedActivations reports for this micro-batch."""
    inside = 0 if s.checkpointing else s.layers * layer_saved_bytes(s)
    return inside + sum(outside_saved_parts(s).values())


def workspace_bytes(s: StepShape) -> int:
    # cuBLAS workspace, allocated through the caching allocator once per (handle, stream): one handle for the
    # forward (main) thread and one for autograd's CUDA device thread that runs backward
    return 2 * (CUBLAS_WORKSPACE_SM90 if s.cuda_major >= 9 else CUBLAS_WORKSPACE_OTHER)


def logits_bytes(s: StepShape) -> int:
    # lm_head output dtype: fp32 under QLoRA (fp32 tied weight, fp32 final-norm output), else the model dtype
    return s.tokens * s.vocab * (4 if s.adapter == "qlora" else s.model_bytes)


def loss_forward_transient(s: StepShape) -> dict[str, int]:
    """Alive (not saved) while log_softmax runs in forward: the logits and, for 16-bit logits, their fp32 copy
    (ForCausalLMLoss does logits.float(): a no-op for fp32 logits)."""
    out = {"logits": logits_bytes(s)}
    if logits_bytes(s) != s.tokens * s.vocab * 4:
        out["logits_fp32_copy"] = s.tokens * s.vocab * 4
    return out


def loss_backward_transient(s: StepShape) -> dict[str, int]:
    """The peak of backward's first nodes: nll_loss's backward makes a dense fp32 [T, V] gradient, then
    log_softmax's backward makes another while both that and the saved log_softmax output are alive
    (the CUDA log_softmax backward allocates nothing else). Same for every model precision: the loss is fp32."""
    T, V = s.tokens, s.vocab
    return {"nll_grad": T * V * 4, "log_softmax_grad": T * V * 4}


def qlora_matmul_transient(s: StepShape, out_features: int, in_features: int, backward: bool = False) -> dict[str, int]:
    """One bitsandbytes 4-bit matmul (nf4, double quant, compute bf16) on CUDA. Forward: x cast to the compute dtype
    ([T, in] 2 B, not saved: MatMul4Bit keeps only the packed weight, in ctx.tensors), then either bnb's fused kernel
    (T <= 1536 rows on sm90 per its heuristic; no weight buffer) or dequantise-then-F.linear (T > 1536: a [out, in]
    compute-dtype weight plus the fp32 absmax), the [T, out] 2-B output and its cast back to the input dtype (fp32).
    Backward: always dequantises the weight ([out, in] 2 B, plus absmax) for grad_input = grad @ W."""
    T = s.tokens
    dequant = {"dequantised_weight": out_features * in_features * 2,
               "absmax_fp32": out_features * in_features // 64 * 4}
    if backward:
        return {**dequant, "grad_input": T * in_features * 2}
    parts = {"x_compute_dtype": T * in_features * 2, "out_compute_dtype": T * out_features * 2}
    if T > s.bnb_fused_max_rows:
        parts.update(dequant)
    return parts


def lora_grad_bytes(s: StepShape, modules: tuple[str, ...]) -> int:
    """Gradient bytes of one layer's LoRA A and B for the given modules (accumulated as backward reaches them)."""
    size = {"q": (s.hidden, s.heads * s.head_dim), "k": (s.hidden, s.kv_heads * s.head_dim),
            "v": (s.hidden, s.kv_heads * s.head_dim), "o": (s.heads * s.head_dim, s.hidden),
            "gate": (s.hidden, s.intermediate), "up": (s.hidden, s.intermediate), "down": (s.intermediate, s.hidden)}
    return sum(s.rank * (size[m][0] + size[m][1]) * s.adapter_bytes for m in modules if s.lora(m))


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
    parts.update({k: v for k, v in full.items() if k == "lora_x_qkv" or k == "linear_x_qkv"})
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
    repeat_kv (locals); the incoming gradients of the down_proj node. An estimate checked on the CPU replay
    (alloc_sim.py --at aten::softmax), never the peak in the H200 cells."""
    T, h, nh, nkv, d, p = s.tokens, s.hidden, s.heads, s.kv_heads, s.head_dim, s.proj_bytes
    parts = {"norm_in": norm_saved(s), "lora_A_out_qkv": sum(s.lora(m) for m in ("q", "k", "v")) * T * s.rank *
             s.adapter_bytes}
    parts.update({k: v for k, v in layer_saved_parts(s).items() if k in ("lora_x_qkv", "linear_x_qkv")})
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
    after = sum(v for k, v in saved.items() if k in ("mlp", "lora_x_o", "lora_x_gate_up", "lora_x_down",
                                                     "linear_x_o", "linear_x_gate_up", "linear_x_down"))
    after += norm_saved(s) + sum(s.lora(m) for m in ("o", "gate", "up", "down")) * T * s.rank * s.adapter_bytes
    after += _bytes_s2(s) * p if "attn_probs" in saved else 0
    return {"minus_not_yet_saved": -after, "softmax_fwd_transient": _bytes_s2(s) * ((p + 4) if p != 4 else 4)}


def mlp_backward_parts(s: StepShape) -> dict[str, int]:
    """An estimate from the CPU replay (alloc_sim.py; never the peak in the H200 cells) of the top of the last
    layer's MLP backward: the whole layer's saved tensors plus about one fp32 [T, i] gradient and a few [T, h] ones;
    under checkpointing two fp32 [T, i] tensors of the recompute are still alive when the first node runs."""
    T, h, i, a = s.tokens, s.hidden, s.intermediate, s.adapter_bytes
    transient = (2 * T * i * a + 3 * T * h * a) if s.checkpointing else (T * i * a + T * h * (a + s.stream_bytes))
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
    """Every moment of the step the peak can fall at, each as the named parts alive then (``phase`` says which
    phase of the loop a moment is in).

    ``weights`` = frozen + trainable + buffers, ``optimizer`` = optimizer state minus paged (both exact from the
    record or memprof's formulas); ``gradients`` defaults to the trainable LoRA bytes of the whole model;
    ``activations`` defaults to this module's formula (pass the measured ``activation_bytes`` to attribute a run).
    The optimizer state exists from the first step on, and the peak of a run is a later step's, so it is alive at
    every candidate; gradients are None (set_to_none) until backward makes them.
    """
    A = activation_bytes(s) if activations is None else activations
    G = gradients if gradients is not None else s.layers * lora_grad_bytes(s, ALL_LINEAR)
    base = {"weights": weights, "optimizer_state": optimizer, "cublas_workspaces": workspace_bytes(s),
            "input_ids": s.tokens * 8}
    outside = outside_saved_parts(s)
    out: dict[str, dict[str, int]] = {}

    out["loss forward"] = {**base, "activations": A, **loss_forward_transient(s)}
    out["loss backward"] = {**base, "activations": A, **loss_backward_transient(s)}

    # first layer processed in backward (index L-1): the loss's tensors and the final norm's are freed by then
    freed = outside["log_softmax_out"] + outside["nll_target"] + outside["nll_total_weight"]
    if s.checkpointing:
        kept = {"ckpt_kept": A - freed - outside["final_norm"],
                "rope_cos_sin": 2 * s.seq * s.head_dim * s.stream_bytes}
        out["recomputed attention backward"] = {**base, **kept,
                                                                       **attention_backward_parts(s)}
        out["recompute forward"] = {**base, **kept, **recompute_forward_parts(s),
                                                                    "residual_grad": s.tokens * s.hidden *
                                                                    s.stream_bytes}
        out["recomputed MLP backward"] = {**base, **kept, **mlp_backward_parts(s)}
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
        if s.checkpointing:
            kept = {"ckpt_kept": A - freed - outside["final_norm"],
                    "rope_cos_sin": 2 * s.seq * s.head_dim * s.stream_bytes}
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
    # optimizer step: gradients complete; foreach AdamW makes about one more list of parameter-sized tensors
    out["optimizer step"] = {**base, "gradients": G, "foreach_temporaries": G}
    # held-out evaluation under no_grad: the logits, their fp32 copy and log_softmax's output (no saved tensors)
    out["eval"] = {**base, **loss_forward_transient(s),
                                          "log_softmax_out": s.tokens * s.vocab * 4}

    return out


def peak_parts(s: StepShape, weights: int, optimizer: int, gradients: int | None = None,
               activations: int | None = None) -> tuple[str, dict[str, int]]:
    """The moment of the step with the most bytes allocated, and its named parts (arguments as ``moments``)."""
    every = moments(s, weights, optimizer, gradients, activations)
    best = max(every, key=lambda name: sum(every[name].values()))
    return best, every[best]


# The phase of the loop each moment is in (as the probe names phases), and the moments whose parts are estimates
# from CPU replays rather than checked against a measured peak.
PHASES = {"loss forward": "forward", "softmax forward": "forward", "LoRA merge forward": "forward",
          "4-bit matmul forward": "forward", "loss backward": "backward", "attention backward": "backward",
          "MLP backward": "backward", "recompute forward": "backward", "recomputed attention backward": "backward",
          "recomputed MLP backward": "backward", "backward end": "backward", "optimizer step": "optimizer",
          "eval": "eval"}
ESTIMATES = ("LoRA merge forward", "4-bit matmul forward", "MLP backward", "recomputed MLP backward",
             "optimizer step", "eval")


def phase(moment: str) -> str:
    """The phase of the loop a moment of ``moments`` is in: forward, backward, optimizer or eval."""
    return PHASES[moment]


MODELLED = ("llama", "qwen2", "mistral")  # decoder layers as Llama's: RMSNorm, RoPE, q/k/v/o, SwiGLU gate/up/down
_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
            "down_proj": "down"}
_FULL_NAMES = {short: f"model.layers.0.{'mlp' if short in ('gate', 'up', 'down') else 'self_attn'}.{name}"
               for name, short in _MODULES.items()}
# LoRA settings the formulas do not follow: a cell with any of them is attributed and planned without them
_NOT_MODELLED = ("rank_pattern", "layers_to_transform", "modules_to_save", "use_dora", "layers_pattern")
MODEL_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def step_shape(cell: CellConfig, device: str, cuda_major: int = 9) -> StepShape | None:
    """The shape of one micro-batch of ``cell`` on ``device`` (``cuda``, whose compute capability's major is
    ``cuda_major``), or None where the formulas do not cover the cell: another architecture, a model known only by
    name, a LoRA setting they do not follow, dropout, or the CPU (its kernels save other tensors)."""
    from memprof.train.models import ModelLoadError, build_config

    adapter = cell.adapter
    lora = adapter.lora
    if device != "cuda" or not cell.model.known or adapter.kind == "dora":
        return None
    if any(lora.get(name) for name in _NOT_MODELLED) or float(lora.get("lora_dropout") or 0) > 0:
        return None
    if adapter.kind == "qlora" and not adapter.quant.prepare_for_kbit_training:
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
                     lora_targets=targets, cuda_major=cuda_major)


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
