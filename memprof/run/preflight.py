"""Checks that need the libraries, run once before any cell: every model of a suite builds, peft takes every
adapter's configuration (``peft.LoraConfig``'s own fields), its ``target_modules`` match modules of the model, and
every optimizer builds with its kwargs over that model's trainable parameters.

Models are built on the meta device (shapes, no memory, no compute), in a process the zygote forks for this
purpose only, so the zygote itself never builds anything.
"""

from __future__ import annotations

import torch
from torch import nn

from memprof.config.spec import AdapterSpec, CellConfig, ModelSpec
from memprof.run.messages import Problem
from memprof.suite.load import OPTIMIZER_FIELD, SCHEDULE_FIELD
from memprof.train import models, optim

MAX_MESSAGE = 400


def check_all(cells: list[CellConfig], weights: bool = True) -> list[Problem]:
    """Check each cell's model and adapter once per pair, and each optimizer once, over the first pair that fits
    (``Suite.preflight_pairs`` gives the cells); with ``weights``, that a model's folder holds weights to load (a
    plan needs only its config).

    Returns:
        One ``Problem`` per problem, its ``field`` being ``model`` (``model.`` + the key of the model's table at
        fault, where transformers' refusal names one: ``model.overrides.num_hidden_layers``), ``adapter``, the
        adapter's key at fault, or
        ``OPTIMIZER_FIELD`` + the optimizer's label; a model that does not build is reported once and its adapters
        are not checked.
    """
    problems: list[Problem] = []
    broken: set[str] = set()
    adapted: dict[tuple[str, str], nn.Module | None] = {}  # None: the adapter does not fit
    optimizers: set[str] = set()
    for cell in cells:
        name, adapter, label = cell.model.name, cell.adapter.name, cell.optimizer.label
        if name in broken:
            continue
        if (name, adapter) not in adapted:
            try:
                model = meta_model(cell.model)
                if weights:
                    models.check_weights(cell.model)
            except Exception as err:  # noqa: BLE001 - any failure to build is the suite's problem, said in one line
                broken.add(name)
                key = err.key if isinstance(err, models.ModelConfigError) else ""
                problems.append(Problem(name, adapter, f"model.{key}" if key else "model", _one_line(err)))
                continue
            problem = adapter_problem(model, cell.adapter)
            if problem is not None:
                problems.append(Problem(name, adapter, *problem))
            adapted[(name, adapter)] = model if problem is None else None
        model = adapted[(name, adapter)]
        if model is None or label in optimizers:
            continue
        optimizers.add(label)
        try:
            optim.check_builds(cell.optimizer, model)
        except optim.OptimizerRefused as err:
            problems.append(Problem(name, adapter, OPTIMIZER_FIELD + label, _one_line(err)))
    return problems + schedule_problems(cells)


def schedule_problems(cells: list[CellConfig]) -> list[Problem]:
    """Each schedule with its kwargs built once (``optim.check_schedule``), over the first of ``cells`` that has it;
    a problem's ``field`` is ``SCHEDULE_FIELD`` + the schedule's name (+ ``.`` + the kwarg at fault)."""
    problems: list[Problem] = []
    first: dict[str, CellConfig] = {}
    for cell in cells:
        first.setdefault(cell.training.schedule, cell)
    for name, cell in first.items():
        t = cell.training
        try:
            optim.check_schedule(name, t.schedule_kwargs, t.lr_warmup_steps, t.steps)
        except optim.ScheduleRefused as err:
            field = SCHEDULE_FIELD + name + (f".{err.key}" if err.key else "")
            problems.append(Problem(cell.model.name, cell.adapter.name, field, _one_line(err)))
    return problems


def config_problems(cells: list[CellConfig]) -> list[Problem]:
    """What peft says of each adapter's configuration without a model (``models.lora_config``: its fields and
    their types), each schedule's kwargs, and each inline model config that leaves sizes to transformers'
    defaults (``meta_model``), for the commands that run no cell (``plan``, ``crosscheck``)."""
    problems: list[Problem] = []
    inline = {cell.model.name: cell for cell in cells if cell.model.config}
    for name, cell in inline.items():
        try:
            if models.unset_sizes(cell.model, models.build_config(cell.model)):
                meta_model(cell.model)  # refuses it, with the parameters transformers' defaults would make
        except models.UnsizedModel as err:
            problems.append(Problem(name, cell.adapter.name, f"model.{err.key}", _one_line(err)))
        except models.ModelLoadError:
            pass  # the plan says in its own words why a model does not build
    adapters = {cell.adapter.name: cell for cell in cells if cell.adapter.kind != "none"}
    for name, cell in adapters.items():
        try:
            models.lora_config(cell.adapter)
        except models.AdapterConfigError as err:
            problems.append(Problem(cell.model.name, name, err.field or "adapter", _one_line(err)))
    return problems + schedule_problems(cells)


def meta_model(spec: ModelSpec) -> nn.Module:
    """The model's architecture with meta tensors: what ``models.build_model`` would build, without weights.

    Raises:
        models.UnsizedModel: an inline config that leaves sizes to transformers' defaults (a full-size model,
            which a cell would build for minutes and run out of memory with), naming the parameters it would have.
    """
    from transformers import AutoModelForCausalLM

    config = models.build_config(spec)
    unset = models.unset_sizes(spec, config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    except Exception:
        if unset:
            raise models.unsized(config, unset, None) from None
        raise
    if unset:
        raise models.unsized(config, unset, sum(p.numel() for p in model.parameters()))
    return model


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
