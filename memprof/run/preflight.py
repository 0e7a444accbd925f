"""Checks that need the libraries, run once before any cell: every model of a suite builds, and every LoRA
adapter's ``target_modules`` match modules of it.

Models are built on the meta device (shapes, no memory, no compute), in a process the zygote forks for this
purpose only, so the zygote itself never builds anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memprof.train import models

MAX_MESSAGE = 400


def check_all(pairs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Check each ``{"model", "model_spec", "adapter", "adapter_spec"}`` pair.

    Returns:
        One ``{"model", "adapter", "field", "error"}`` per problem, ``field`` being ``"model"`` or
        ``"adapter"``; a model that does not build is reported once and its adapters are not checked.
    """
    problems: list[dict[str, str]] = []
    broken: set[str] = set()
    for pair in pairs:
        if pair["model"] in broken:
            continue
        try:
            model = meta_model(pair["model_spec"])
        except Exception as err:  # noqa: BLE001 - any failure to build is the suite's problem, said in one line
            broken.add(pair["model"])
            problems.append({"model": pair["model"], "adapter": pair["adapter"], "field": "model",
                             "error": _one_line(err)})
            continue
        error = adapter_error(model, pair["adapter_spec"])
        if error:
            problems.append({"model": pair["model"], "adapter": pair["adapter"], "field": "adapter", "error": error})
    return problems


def meta_model(model_spec: dict[str, Any]) -> nn.Module:
    """The model's architecture with meta tensors: what ``models.build_model`` would build, without weights."""
    from transformers import AutoModelForCausalLM

    config = models.build_config(model_spec)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_spec.get("trust_remote_code", False))


def adapter_error(model: nn.Module, adapter_spec: dict[str, Any]) -> str:
    """Why peft cannot wrap ``model`` in this adapter ('' when it can), by peft's own target matching."""
    if adapter_spec["kind"] == "none":
        return ""
    # Matching is by module name, which 4-bit quantisation does not change: check QLoRA as LoRA.
    spec = {**adapter_spec, "kind": "lora"} if adapter_spec["kind"] == "qlora" else adapter_spec
    try:
        with torch.device("meta"):  # peft's new LoRA matrices are meta tensors too
            models.attach_adapter(model, spec)
    except models.ModelLoadError as err:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        return _one_line(err) + f" (linear layers of this model: {', '.join(linear)})"
    return ""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:MAX_MESSAGE]
