"""Build the model and its adapter for a cell: transformers for the model, peft for the adapter,
bitsandbytes for 4-bit (QLoRA) base weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memprof.config.presets import PRESETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
BYTE_VOCAB = 256


class ModelLoadError(Exception):
    """The model named by a cell could not be built (bad path, unknown architecture, too small a vocabulary)."""


class LeverUnavailable(Exception):
    """A lever this machine cannot pull (flash_attention_2 without CUDA or the flash-attn package)."""


def build_config(model_spec: dict[str, Any]):
    """The transformers config for a model spec (preset, inline config or local path), with overrides."""
    from transformers import AutoConfig

    overrides = dict(model_spec.get("overrides") or {})
    try:
        if model_spec.get("path"):
            config = AutoConfig.from_pretrained(model_spec["path"], local_files_only=True,
                                                trust_remote_code=model_spec.get("trust_remote_code", False))
            for key, value in overrides.items():
                setattr(config, key, value)
        else:
            values = dict(PRESETS[model_spec["preset"]] if model_spec.get("preset") else model_spec["config"])
            values.update(overrides)
            config = AutoConfig.for_model(values.pop("model_type"), **values)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot build the model config: {err}") from err
    if getattr(config, "vocab_size", BYTE_VOCAB) < BYTE_VOCAB:
        raise ModelLoadError(f"vocab_size {config.vocab_size} < 256: memprof's corpora are byte-level")
    return config


def build_model(model_spec: dict[str, Any], adapter_spec: dict[str, Any], precision: str, device: torch.device,
                attn_implementation: str = "sdpa", gradient_checkpointing: str = "off") -> nn.Module:
    """The model on ``device``, quantised and wrapped in its peft adapter as the adapter spec says, with its
    attention kernel and gradient checkpointing (``off``, ``on`` = non-reentrant, or ``reentrant``)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation == "flash_attention_2" and device.type != "cuda":
        raise LeverUnavailable("flash_attention_2 needs a CUDA device")
    dtype = DTYPES[precision]
    config = build_config(model_spec)
    qlora = adapter_spec["kind"] == "qlora"
    try:
        if model_spec.get("path"):
            quant = _bnb_config(adapter_spec) if qlora else None
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    model_spec["path"], config=config, dtype=dtype, quantization_config=quant,
                    device_map=str(device), local_files_only=True, attn_implementation=attn_implementation,
                    trust_remote_code=model_spec.get("trust_remote_code", False))
            except OSError as err:
                raise ModelLoadError(f"cannot load {model_spec['path']}: {err}") from err
        elif qlora:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
            quantize_linears_4bit(model, adapter_spec)
            model.to(device)
        else:
            with device:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         attn_implementation=attn_implementation)
    except ImportError as err:  # transformers' answer to a kernel whose package is not installed
        raise LeverUnavailable(f"attn_implementation {attn_implementation}: {err}") from err
    except ValueError as err:
        raise ModelLoadError(f"cannot load {model_spec.get('path') or 'the model'}: {err}") from err
    model.config.use_cache = False
    keep_training_layout(model)
    if gradient_checkpointing != "off":
        enable_checkpointing(model, reentrant=gradient_checkpointing == "reentrant")
    return attach_adapter(model, adapter_spec)


def keep_training_layout(model: nn.Module) -> None:
    """Keep every 4-bit weight in the layout it trains in. On a CPU with AVX512-BF16, bitsandbytes repacks a
    ``Linear4bit``'s weight for its CPU inference kernel the first time the layer runs in eval mode without grad
    (``support_avx512bf16_for_cpu``, set from ``has_avx512bf16()`` when the layer is made): the repack rewrites the
    weight's storage, asserts ``out_features % 32 == 0`` and is never undone, so a cell's held-out evaluation would
    crash it or change the bytes it trains and is measured with."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def enable_checkpointing(model: nn.Module, reentrant: bool) -> None:
    """Recompute each decoder layer in backward. transformers also registers the input-grad hook here (the
    embeddings' output requires grad), without which reentrant checkpointing of a frozen model under a peft
    adapter gives the adapter no gradient."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _bnb_config(adapter_spec: dict[str, Any]):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=adapter_spec["quant_type"],
                              bnb_4bit_use_double_quant=adapter_spec["double_quant"],
                              bnb_4bit_compute_dtype=getattr(torch, adapter_spec["compute_dtype"]))


def quantize_linears_4bit(model: nn.Module, adapter_spec: dict[str, Any]) -> None:
    """Swap every ``nn.Linear`` but the output head for a bitsandbytes ``Linear4bit``, as transformers'
    bitsandbytes loader does; weights are quantised when the module moves to its device."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=getattr(torch, adapter_spec["compute_dtype"]),
                                    quant_type=adapter_spec["quant_type"],
                                    compress_statistics=adapter_spec["double_quant"], device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                           quant_type=adapter_spec["quant_type"],
                                           compress_statistics=adapter_spec["double_quant"])
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new)


def attach_adapter(model: nn.Module, adapter_spec: dict[str, Any]) -> nn.Module:
    """Wrap in a peft LoRA/DoRA adapter; ``none`` trains every parameter (full fine-tune)."""
    kind = adapter_spec["kind"]
    if kind == "none":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if kind == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = adapter_spec["target_modules"]
    config = LoraConfig(r=adapter_spec["r"], lora_alpha=adapter_spec["alpha"], lora_dropout=adapter_spec["dropout"],
                        target_modules=ATTENTION_MODULES if targets == "attention" else targets,
                        use_rslora=adapter_spec["use_rslora"], use_dora=kind == "dora", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelLoadError(f"adapter: {err}") from err
