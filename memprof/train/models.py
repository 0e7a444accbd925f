"""Build the model and its adapter for a cell: transformers for the model, peft for the adapter,
bitsandbytes for 4-bit (QLoRA) base weights."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memprof.config.presets import PRESETS
from memprof.config.spec import AdapterSpec, Levers, ModelSpec, QuantSpec
from memprof.train.loop import Loss, full_loss
from memprof.train.materialize import materialize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
BYTE_VOCAB = 256
IGNORE_INDEX = -100  # transformers' label for a position that counts in no loss
# config fields by which transformers' causal LMs transform the head's output (softcapping, scaling): the chunked
# loss computes the head's output alone, so on such a model it would train another objective
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "logits_mup_width_multiplier")


# Sizes a transformers config needs positive: a model with -1 layers builds (with none), and the adapter that then
# finds nothing to wrap was blamed for it.
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads")


class ModelLoadError(Exception):
    """The model named by a cell could not be built (bad path, unknown architecture, too small a vocabulary)."""


class ModelConfigError(ModelLoadError):
    """A key of the model's table transformers cannot build from; ``key`` is its path in the table
    (``overrides.num_hidden_layers``, ``config.model_type``), '' for the preset's or the folder's own."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class UnsizedModel(ModelConfigError):
    """An inline config that leaves sizes to its transformers class's defaults, which are a full-size model's
    (``LlamaConfig()`` is Llama-2-7B's: 6.7B parameters)."""


class LeverUnavailable(Exception):
    """A lever this machine or model cannot pull (flash_attention_2 without CUDA or the flash-attn package; a chunked
    loss on a model that transforms its logits)."""


def build_config(spec: ModelSpec):
    """The transformers config of a model spec (preset, inline config or local path), with its overrides.

    Raises:
        ModelConfigError: an unknown model_type, a key the config class does not have, or a size not positive.
        ModelLoadError: a folder transformers cannot read a config from.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if not spec.known:
        raise ModelLoadError(f"model '{spec.name}' was read back from a schema-1 record, which kept only its name")
    values = dict(PRESETS[spec.preset] if spec.preset else spec.config)
    values.update(spec.overrides)
    try:
        if spec.path:
            config = AutoConfig.from_pretrained(spec.path, local_files_only=True,
                                                trust_remote_code=spec.trust_remote_code)
            defaults = type(config)()
        else:
            model_type = values.pop("model_type")
            if model_type not in CONFIG_MAPPING:
                raise ModelConfigError(_key(spec, "model_type"), _unknown_model_type(model_type, CONFIG_MAPPING))
            defaults = CONFIG_MAPPING[model_type]()
            config = AutoConfig.for_model(model_type, **values)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot build the model config: {err}") from err
    for key, value in values.items() if spec.path else ():
        setattr(config, key, value)
    # transformers keeps a keyword its class does not know as an attribute that nothing reads (one it converts, as
    # Llama's rope_theta into rope_parameters, is not kept)
    unknown = next((key for key in values if key in vars(config) and not hasattr(defaults, key)), None)
    if unknown is not None:
        raise ModelConfigError(_key(spec, unknown), f"{type(defaults).__name__} has no field '{unknown}'")
    text = config.get_text_config()
    for name in SIZES:
        value = getattr(text, name, None)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ModelConfigError(_key(spec, name), f"{name} must be a positive integer, not {value!r}")
    if getattr(config, "vocab_size", BYTE_VOCAB) < BYTE_VOCAB:
        raise ModelConfigError(_key(spec, "vocab_size"),
                               f"vocab_size {config.vocab_size} < 256: memprof's corpora are byte-level")
    return config


def unset_sizes(spec: ModelSpec, config: Any) -> list[str]:
    """The sizes (``SIZES``) an inline config leaves to its transformers class's defaults: those the class's
    ``__init__`` gives a number (not those it derives from others, as Llama's ``num_key_value_heads`` from the
    heads), written neither in ``config`` nor in ``overrides``, under their name or the class's own (GPT-2's
    ``n_embd``). A nested text config's sizes are read in ``config.text_config``. A preset and a folder's
    config.json give all of theirs: none is unset."""
    import inspect

    if not spec.config:
        return []
    given: Any = {**spec.config, **spec.overrides}
    text = config.get_text_config()
    if text is not config:
        given = given.get("text_config") if isinstance(given.get("text_config"), dict) else {}
    params = inspect.signature(type(text).__init__).parameters
    aliases = getattr(type(text), "attribute_map", {})
    unset = []
    for name in SIZES:
        param = params.get(aliases.get(name, name))
        fixed = param is not None and isinstance(param.default, int) and not isinstance(param.default, bool)
        if fixed and name not in given and param.name not in given:
            unset.append(name)
    return unset


def unsized(config: Any, unset: list[str], parameters: int | None) -> UnsizedModel:
    """The refusal of an inline config that sets none of the sizes ``unset``, with the ``parameters`` its class's
    defaults would give the model (None: it does not even build with them)."""
    text = config.get_text_config()
    names = ", ".join(unset[:-1]) + (" and " if len(unset) > 1 else "") + unset[-1]
    made = f"a {parameters:,}-parameter model" if parameters is not None else "a model that does not build"
    where = "config.text_config" if text is not config else "config"
    return UnsizedModel(where, f"missing {names}: {type(text).__name__}'s defaults would make it {made}; set them, "
                               f"or start from a preset and change it with overrides")


def _key(spec: ModelSpec, name: str) -> str:
    """Where the model's table sets config field ``name``: ``overrides.NAME``, ``config.NAME``, or '' (its preset's or
    its folder's own value)."""
    return f"overrides.{name}" if name in spec.overrides else f"config.{name}" if name in spec.config else ""


def _unknown_model_type(model_type: str, known: Any) -> str:
    """An unknown model_type, with the closest of transformers' few hundred (all of them make no readable line)."""
    import difflib

    names = list(known.keys())
    close = difflib.get_close_matches(model_type, names, n=3)
    return f"unknown model_type '{model_type}' " + (f"(did you mean {', '.join(map(repr, close))}?)" if close else
                                                   f"(no close match among transformers' {len(names)} model types)")


def experts(config: Any) -> int:
    """A mixture of experts' experts per layer (transformers names them two ways); 0 for a dense model."""
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


def loss_chunk_unavailable(config: Any, levers: Levers) -> LeverUnavailable | None:
    """The chunked loss asked of a model that transforms its logits (Gemma2's soft-capping), which it does not."""
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config.get_text_config(), name, None) is not None]
    if levers.loss_chunk and transforms:
        return LeverUnavailable(f"loss_chunk: the model transforms its logits ({', '.join(transforms)}), which the "
                                "chunked loss does not")
    return None


def kernel_unavailable(err: ValueError, attn: str) -> LeverUnavailable | None:
    """transformers' refusal to build an architecture with an attention kernel it has no path for, as the lever
    being unavailable; None for any other error."""
    if attn == "eager" or "does not support" not in str(err):
        return None
    first = str(err).split(". ")[0]  # the sentence that says so, without transformers' advice
    return LeverUnavailable(f"attn_implementation {attn}: {first} (eager does)")


def check_weights(spec: ModelSpec) -> None:
    """Raises ``ModelConfigError`` (key ``path``) where ``spec`` is a folder that holds no weights for
    ``from_pretrained`` to load (a config.json alone plans, but does not train)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if spec.path and not any((Path(spec.path) / name).is_file() for name in names):
        raise ModelConfigError("path", f"{spec.path} holds no weights to load (none of {', '.join(names)})")


def build_model(spec: ModelSpec, adapter: AdapterSpec, precision: str, device: torch.device,
                levers: Levers = Levers()) -> nn.Module:
    """The model on ``device``, quantised and wrapped in its peft adapter as ``adapter`` says, with the attention
    kernel and gradient checkpointing (``off``, ``on`` = non-reentrant, or ``reentrant``) ``levers`` name."""
    from transformers import AutoModelForCausalLM

    attn = levers.attn_implementation
    if attn == "flash_attention_2" and device.type != "cuda":
        raise LeverUnavailable("flash_attention_2 needs a CUDA device")
    dtype = DTYPES[precision]
    config = build_config(spec)
    if refusal := loss_chunk_unavailable(config, levers):
        raise refusal
    qlora = adapter.kind == "qlora"
    try:
        if spec.path:
            quant = _bnb_config(adapter.quant) if qlora else None
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    spec.path, config=config, dtype=dtype, quantization_config=quant, device_map=str(device),
                    local_files_only=True, attn_implementation=attn, trust_remote_code=spec.trust_remote_code)
            except OSError as err:
                raise ModelLoadError(f"cannot load {spec.path}: {err}") from err
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
            if qlora:
                quantize_linears_4bit(model, adapter.quant)
            kbit_cast = qlora and adapter.quant.prepare_for_kbit_training
            materialize(model, device, frozen=adapter.kind != "none", param_dtype=torch.float32 if kbit_cast else None)
    except ImportError as err:  # transformers' answer to a kernel whose package is not installed
        raise LeverUnavailable(f"attn_implementation {attn}: {err}") from err
    except ValueError as err:
        raise kernel_unavailable(err, attn) or ModelLoadError(f"cannot load {spec.path or 'the model'}: {err}") from err
    model.config.use_cache = False
    keep_training_layout(model)
    if levers.gradient_checkpointing != "off":
        enable_checkpointing(model, reentrant=levers.gradient_checkpointing == "reentrant")
    return attach_adapter(model, adapter)


def loss_function(levers: Levers) -> Loss:
    """The causal-LM loss the cell's levers ask for: transformers' own over the whole logits, or with
    ``loss_chunk`` the chunked loss."""
    return functools.partial(chunked_loss, levers.loss_chunk) if levers.loss_chunk else full_loss


def chunked_loss(chunk: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``: the labels are the inputs shifted left, the last position
    ignored; the mean over labelled tokens) without the whole [tokens, vocab] logits, as Liger's and Apple's cut
    cross-entropy avoid them: the decoder's final hidden states go through the output head ``chunk`` tokens at a
    time, each chunk's logits, their fp32 upcast and its cross-entropy under non-reentrant checkpointing, so one
    chunk's exist at a time, in forward and again (recomputed) in backward. Forward keeps the hidden states and the
    labels (the checkpoints' inputs); backward builds up the hidden states' gradient chunk by chunk, and a trainable
    head's weight gradient too, which autograd sums out of place at the second chunk: three [vocab, hidden] tensors
    at once, more than chunking saves a full fine-tune with few tokens (``step_memory`` models both).

    ``model``: a causal LM, bare or under a peft adapter (whose own forward adds nothing for LoRA and DoRA), whose
    logits are its head's output (``build_model`` refuses the others); the config refuses the sharding wrappers,
    whose forward is not the one called here."""
    hidden = model.get_decoder()(input_ids=x).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = F.pad(x, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous().view(-1)
    head_loss = functools.partial(_summed_loss, model.get_output_embeddings())
    # no RNG state kept per chunk: the head and the loss draw no random numbers
    sums = [checkpoint(head_loss, h, y, use_reentrant=False, preserve_rng_state=False)
            for h, y in zip(hidden.split(chunk), labels.split(chunk))]
    return torch.stack(sums).sum() / (labels != IGNORE_INDEX).sum()


def _summed_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # the head's output is dropped as soon as it is upcast: a 16-bit chunk's logits are not alive at the softmax
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


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


def _bnb_config(quant: QuantSpec):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype))


def quantize_linears_4bit(model: nn.Module, quant: QuantSpec) -> None:
    """Swap every ``nn.Linear`` but the output head for a bitsandbytes ``Linear4bit``, as transformers'
    bitsandbytes loader does; on a meta model, ``memprof.train.materialize`` makes each a random 4-bit weight."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head:
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=getattr(torch, quant.compute_dtype), quant_type=quant.quant_type,
                                    compress_statistics=quant.double_quant, device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=quant.quant_type,
                                           compress_statistics=quant.double_quant)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new)


class AdapterConfigError(ModelLoadError):
    """peft does not take the adapter's configuration; ``field`` names the key at fault ('' when peft says
    nothing more precise)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def lora_config(adapter: AdapterSpec):
    """The ``peft.LoraConfig`` of an adapter spec: its ``lora`` table as keyword arguments, checked against the
    dataclass peft ships (its fields and their annotated types, strictly: ``false`` is no rank), so a field of a
    newer peft works as it is and a misspelt or mistyped one is named.

    Raises:
        AdapterConfigError: a key LoraConfig does not have, or a value it refuses.
    """
    import dataclasses
    import difflib
    import typing

    from peft import LoraConfig
    from pydantic import TypeAdapter, ValidationError

    kwargs = dict(adapter.lora)
    if kwargs.get("target_modules") == "attention":
        kwargs["target_modules"] = ATTENTION_MODULES
    kwargs.setdefault("task_type", "CAUSAL_LM")
    if adapter.kind == "dora":
        kwargs["use_dora"] = True
    known = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise AdapterConfigError(key, "not a field of peft's LoraConfig" + (f" (did you mean '{close[0]}'?)"
                                                                               if close else ""))
    hints = typing.get_type_hints(LoraConfig)
    for key, value in kwargs.items():
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError:
            raise AdapterConfigError(key, f"peft's LoraConfig takes {_type_name(hints[key])} here, not "
                                          f"{value!r}") from None
        except Exception:  # noqa: BLE001 - an annotation pydantic cannot check: peft itself will judge the value
            pass
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise AdapterConfigError("", f"peft's LoraConfig refuses it: {' '.join(str(err).split())}") from err


_TYPE_WORDS = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "table"}


def _type_name(hint: Any, plural: bool = False) -> str:
    """An annotation in a suite author's words: ``Optional[Union[list[str], str]]`` is 'a string or a list of
    strings' (None, which TOML cannot write, left out)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):  # scalars first: typing hands back a cached Union in any order
        return " or ".join(sorted((_type_name(arg, plural) for arg in args), key=lambda w: ("list" in w, w)))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, set):
        return ("lists" if plural else "a list") + (f" of {_type_name(args[0], True)}" if args else "")
    word = _TYPE_WORDS.get(origin or hint, getattr(hint, "__name__", str(hint)))
    return f"{word}s" if plural else f"an {word}" if word[0].lower() in "aeiou" else f"a {word}"


def attach_adapter(model: nn.Module, adapter: AdapterSpec) -> nn.Module:
    """Wrap in a peft LoRA/DoRA adapter; ``none`` trains every parameter (full fine-tune). QLoRA first goes
    through peft's ``prepare_model_for_kbit_training`` (non-4-bit parameters cast to fp32, unless a preset's build
    made them fp32 already), unless the spec says to skip it."""
    if adapter.kind == "none":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = lora_config(adapter)
    if adapter.kind == "qlora" and adapter.quant.prepare_for_kbit_training:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelLoadError(f"adapter: {err}") from err
