"""Checks that need the libraries, run once before any cell: every model of a suite builds, peft takes every
adapter's configuration (``peft.LoraConfig``'s own fields), and its ``target_modules`` match modules of the model.

Models are built on the meta device (shapes, no memory, no compute), in a process the zygote forks for this
purpose only, so the zygote itself never builds anything.
"""

from __future__ import annotations

import torch
from torch import nn

from memprof.config.spec import AdapterSpec, CellConfig, ModelSpec
from memprof.run.messages import Problem
from memprof.train import models

MAX_MESSAGE = 400


def check_all(cells: list[CellConfig]) -> list[Problem]:
    """Check each cell's model and adapter (one cell per pair is enough).

    Returns:
        One ``Problem`` per problem, its ``field`` being ``model``, ``adapter`` or the adapter's key at fault;
        a model that does not build is reported once and its adapters are not checked.
    """
    problems: list[Problem] = []
    broken: set[str] = set()
    for cell in cells:
        name, adapter = cell.model.name, cell.adapter.name
        if name in broken:
            continue
        try:
            model = meta_model(cell.model)
        except Exception as err:  # noqa: BLE001 - any failure to build is the suite's problem, said in one line
            broken.add(name)
            problems.append(Problem(name, adapter, "model", _one_line(err)))
            continue
        problem = adapter_problem(model, cell.adapter)
        if problem is not None:
            field, error = problem
            problems.append(Problem(name, adapter, field, error))
    return problems


def meta_model(spec: ModelSpec) -> nn.Module:
    """The model's architecture with meta tensors: what ``models.build_model`` would build, without weights."""
    from transformers import AutoModelForCausalLM

    config = models.build_config(spec)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)


def adapter_problem(model: nn.Module, adapter: AdapterSpec) -> tuple[str, str] | None:
    """Why peft cannot wrap ``model`` in this adapter, as (the key at fault, the reason); None when it can. peft
    checks the configuration and matches the targets itself."""
    if adapter.kind == "none":
        return None
    # Matching is by module name, which 4-bit quantisation does not change: check QLoRA as LoRA.
    spec = adapter.model_copy(update={"kind": "lora"}) if adapter.kind == "qlora" else adapter
    try:
        with torch.device("meta"):  # peft's new LoRA matrices are meta tensors too
            models.attach_adapter(model, spec)
    except models.AdapterConfigError as err:
        return err.field or "adapter", _one_line(err)
    except models.ModelLoadError as err:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        return "target_modules", _one_line(err) + f" (linear layers of this model: {', '.join(linear)})"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:MAX_MESSAGE]
