"""Models built on the meta device and materialised on their device (memprof.train.materialize): the same model, to the
byte, as building it whole on the host; real buffers; a seeded, trainable model; and no unquantised model on the
host on the way to a 4-bit one."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from memprof.config.spec import AdapterSpec, ModelSpec
from memprof.measure.accounting import weight_bytes
from memprof.suite.schema import AdapterTable
from memprof.train import models

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def adapter(kind: str, **settings: Any) -> AdapterSpec:
    return AdapterTable(kind=kind, r=16, alpha=32, target_modules="all-linear", **settings).to_spec(kind)


def preset(name: str, **overrides: Any) -> ModelSpec:
    return ModelSpec(name=name, preset=name, overrides=overrides)


def host_build(model_spec: ModelSpec, adapter_spec: AdapterSpec, precision: str,
               device: torch.device = CPU) -> nn.Module:
    """The model as memprof built it before memprof.train.materialize: whole on the host with transformers' init,
    then quantised on its move to the device."""
    from transformers import AutoModelForCausalLM

    config = models.build_config(model_spec)
    model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[precision], attn_implementation="sdpa")
    if adapter_spec.kind == "qlora":
        models.quantize_linears_4bit(model, adapter_spec.quant)
    model.to(device)
    model.config.use_cache = False
    models.keep_training_layout(model)
    return models.attach_adapter(model, adapter_spec)


def layout(model: nn.Module) -> list[tuple]:
    """Every parameter and buffer as what it is, not what it holds: name, class, shape, dtype, device, whether it
    trains, and a 4-bit weight's quant state (nested or not, block size, code book type, unquantised dtype)."""
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        state = getattr(t, "quant_state", None)
        quant = None if state is None else (state.quant_type, state.blocksize, state.dtype, tuple(state.shape),
                                            state.nested, state.absmax.dtype, state.code.shape)
        out.append((name, type(t).__name__, tuple(t.shape), t.dtype, t.device, t.requires_grad, quant))
    return out


QUANT_VARIANTS = [{}, {"quant_type": "fp4"}, {"double_quant": False}, {"compute_dtype": "bfloat16"},
                  {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"}]
PRESETS = ("tiny-llama", "tiny-qwen2", "small-llama")
CASES = ([(name, adapter("qlora", **q), precision) for name in PRESETS for q in QUANT_VARIANTS
          for precision in ("bf16", "fp32") if name != "small-llama" or not q]  # quantising small-llama is slow
         + [(name, adapter(kind), precision) for name in PRESETS for kind in ("lora", "dora", "none")
            for precision in ("bf16", "fp32")])


@pytest.mark.parametrize(("name", "adapter_spec", "precision"), CASES,
                         ids=[f"{p}-{a.kind}-{q.quant_type}-dq{int(q.double_quant)}-{q.compute_dtype}-{pr}"
                              if a.kind == "qlora" else f"{p}-{a.kind}-{pr}" for p, a, pr in CASES
                              for q in [a.quant]])
def test_the_same_model_to_the_byte_as_building_it_on_the_host(name: str, adapter_spec: AdapterSpec,
                                                               precision: str) -> None:
    before = host_build(preset(name), adapter_spec, precision)
    after = models.build_model(preset(name), adapter_spec, precision, CPU)
    assert weight_bytes(after) == weight_bytes(before)
    assert layout(after) == layout(before)
    assert str(after) == str(before)  # the module tree, 4-bit layers and adapters included
    assert is_tied(after) == is_tied(before) == (name == "tiny-qwen2")


def is_tied(model: nn.Module) -> bool:
    """Whether the output head holds the input embeddings' very weight (a full fine-tune has no peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight is base.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_non_persistent_buffers_are_computed_not_left_uninitialised(name: str, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(models.build_config(preset(name)), dtype=torch.bfloat16)
    model = models.build_model(preset(name), adapter(kind), "bf16", CPU).get_base_model()
    expected = dict(fresh.named_buffers())
    assert {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} <= expected.keys()
    for key, buffer in model.named_buffers():
        assert torch.equal(buffer, expected[key]), key


def first_losses(kind: str, seed: int, steps: int) -> list[float]:
    """Losses of a seeded tiny-llama cell's first steps, on one fixed batch."""
    torch.manual_seed(seed)  # as memprof.train.training.Training.build seeds a cell
    model = models.build_model(preset("tiny-llama"), adapter(kind, compute_dtype="bfloat16"), "bf16", CPU)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_the_same_seed_gives_the_same_run_and_another_seed_another(kind: str) -> None:
    first = first_losses(kind, seed=0, steps=2)
    assert first_losses(kind, seed=0, steps=2) == first  # bitwise
    assert first_losses(kind, seed=1, steps=2)[0] != first[0]


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_the_materialised_model_trains(kind: str) -> None:
    losses = first_losses(kind, seed=0, steps=5)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3
    assert all(later < earlier for earlier, later in pairwise(losses))


# small-llama's widths, 24 layers deep: enough weight (140 MB in bf16) that the build's own bytes stand out of a
# Python process's noise, small enough to quantise on a CPU in seconds
DEEP = preset("small-llama", num_hidden_layers=24)
RSS_PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from memprof.config.spec import ModelSpec
from memprof.measure.host import rss_bytes
from memprof.suite.schema import AdapterTable
from memprof.train import models
spec = ModelSpec.model_validate_json(sys.argv[1])
qlora = AdapterTable(kind="qlora", target_modules="all-linear").to_spec("qlora")
models.build_model(ModelSpec(preset="tiny-llama"), qlora, "bf16", torch.device("cpu"))  # the imports, out of the figure
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(models.build_config(spec), dtype=torch.bfloat16)
bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM, the kernel's high-water mark of this process's RSS, restarts from here
before = rss_bytes()
models.build_model(spec, qlora, "bf16", torch.device("cpu"))
high = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"growth": high - before, "bf16_bytes": bf16_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the RSS high-water mark from /proc")
def test_a_4bit_build_never_holds_the_unquantised_model_on_the_host() -> None:
    # A process of its own, its high-water mark read from /proc: ru_maxrss would not do, as a process started by
    # subprocess inherits its parent's (the kernel carries the larger across exec), here pytest's after earlier tests.
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, DEEP.model_dump_json()], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=True)
    figures = json.loads(out.stdout.splitlines()[-1])
    # the 4-bit model with its 16-bit embeddings and fp32 LoRA weights is about a third of the bf16 model
    assert figures["growth"] < 0.5 * figures["bf16_bytes"], figures


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_device_holds_one_unquantised_linear_at_a_time() -> None:
    cuda = torch.device("cuda", torch.cuda.current_device())
    qlora = adapter("qlora", compute_dtype="bfloat16")
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = models.build_model(DEEP, qlora, "bf16", cuda)
    peak, kept = torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start
    largest = max(p.quant_state.shape.numel() * 2 for p in model.parameters()
                  if getattr(p, "quant_state", None) is not None)
    # the model kept, plus one linear's bf16 weight and bitsandbytes' packed output and absmax beside it
    assert peak - kept < 2 * largest, (peak, kept, largest)
    assert weight_bytes(model) == weight_bytes(host_build(DEEP, qlora, "bf16", cuda))
