"""Models built on the meta device and materialised on their device (memprof.train.materialize): the same model, to the
byte, as building it whole on the host; random 4-bit weights laid out as bitsandbytes' quantize_4bit lays them out
and dequantising to transformers' init; frozen weights tiled, trainable ones drawn; real buffers; a seeded,
trainable model; and no unquantised model on the host or the device on the way to a 4-bit one."""

from __future__ import annotations

import gc
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
from memprof.train.fourbit import BlockPool, is_four_bit, random_params4bit
from memprof.train.materialize import TILE

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
    trains, and a 4-bit weight's quant state (``structure``)."""
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        state = getattr(t, "quant_state", None)
        quant = None if state is None else structure(state)
        out.append((name, type(t).__name__, tuple(t.shape), t.dtype, t.device, t.requires_grad, quant))
    return out


def structure(state: Any) -> dict[str, Any] | None:
    """A bitsandbytes QuantState as what it is: each field, a tensor as its class, shape, dtype and device, the
    nested state of double quantisation the same way."""
    if state is None:
        return None
    out: dict[str, Any] = {}
    for key, value in vars(state).items():
        if isinstance(value, torch.Tensor):
            out[key] = (type(value).__name__, tuple(value.shape), value.dtype, value.device)
        elif key == "state2":
            out[key] = structure(value)
        else:
            out[key] = value
    return out


QUANT_VARIANTS = [{}, {"quant_type": "fp4"}, {"double_quant": False}, {"compute_dtype": "bfloat16"},
                  {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"},
                  {"prepare_for_kbit_training": False}]  # the embeddings, norms and head left in the model's dtype
PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "small-llama")
CASES = ([(name, adapter("qlora", **q), precision) for name in PRESETS for q in QUANT_VARIANTS
          for precision in ("bf16", "fp32") if name != "small-llama" or not q]  # quantising small-llama is slow
         + [(name, adapter(kind), precision) for name in PRESETS for kind in ("lora", "dora", "none")
            for precision in ("bf16", "fp32")])


@pytest.mark.parametrize(("name", "adapter_spec", "precision"), CASES,
                         ids=[f"{p}-{a.kind}-{q.quant_type}-dq{int(q.double_quant)}-{q.compute_dtype}"
                              f"{'' if q.prepare_for_kbit_training else '-nocast'}-{pr}"
                              if a.kind == "qlora" else f"{p}-{a.kind}-{pr}" for p, a, pr in CASES
                              for q in [a.quant]])
def test_the_same_model_to_the_byte_as_building_it_on_the_host(name: str, adapter_spec: AdapterSpec,
                                                               precision: str) -> None:
    before = host_build(preset(name), adapter_spec, precision)
    after = models.build_model(preset(name), adapter_spec, precision, CPU)
    assert weight_bytes(after) == weight_bytes(before)
    assert layout(after) == layout(before)
    assert str(after) == str(before)  # the module tree, 4-bit layers and adapters included
    assert is_tied(after) == is_tied(before) == (name in ("tiny-qwen2", "tiny-qwen3"))


def is_tied(model: nn.Module) -> bool:
    """Whether the output head holds the input embeddings' very weight (a full fine-tune has no peft wrapper)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight is base.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
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


FOUR_BIT_SHAPES = [(256, 688), (688, 256), (130, 64), (3, 7)]  # (3, 7): one partial block, an odd count


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_a_random_4bit_weight_is_laid_out_as_quantize_4bit_lays_one_out(quant_type: str, double_quant: bool,
                                                                        dtype: torch.dtype) -> None:
    import bitsandbytes.functional as bnb_f
    from bitsandbytes.nn import Params4bit

    generator = torch.Generator().manual_seed(0)
    pool = BlockPool.draw(quant_type, 64, dtype, 0.0, 0.02, generator)
    for shape in FOUR_BIT_SHAPES:
        settings = Params4bit(torch.empty(shape, dtype=dtype, device="meta"), quant_type=quant_type,
                              compress_statistics=double_quant)
        ours = random_params4bit(settings, pool, generator)
        real = Params4bit(torch.randn(shape, dtype=dtype) * 0.02, quant_type=quant_type,
                          compress_statistics=double_quant).to(CPU)  # bitsandbytes' quantize_4bit
        assert (type(ours), ours.shape, ours.dtype, ours.requires_grad) == (type(real), real.shape, real.dtype,
                                                                            real.requires_grad)
        assert structure(ours.quant_state) == structure(real.quant_state)
        assert ours.quant_state.nested == double_quant and ours.bnb_quantized
        assert {k: getattr(ours, k) for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")} \
            == {k: getattr(real, k) for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")}
        assert weight_bytes(holding(ours)) == weight_bytes(holding(real))
        weight = bnb_f.dequantize_4bit(ours.data, ours.quant_state)
        assert weight.shape == shape and weight.dtype == dtype and torch.isfinite(weight).all()
        if weight.numel() > 10_000:
            assert abs(weight.float().std().item() - 0.02) < 0.002 and abs(weight.float().mean().item()) < 0.001


def holding(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = weight
    return module


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_a_4bit_build_dequantises_to_what_transformers_init_asks_for(name: str) -> None:
    import bitsandbytes.functional as bnb_f

    torch.manual_seed(0)
    model = models.build_model(preset(name), adapter("qlora"), "bf16", CPU)
    std = model.config.initializer_range
    four_bit = [p for p in model.parameters() if is_four_bit(p)]
    assert len(four_bit) == 7 * 2
    for weight in four_bit:
        values = bnb_f.dequantize_4bit(weight.data, weight.quant_state).float()
        assert torch.isfinite(values).all()
        assert abs(values.std().item() - std) < 0.1 * std and abs(values.mean().item()) < 0.05 * std
        assert len({tuple(row.tolist()) for row in values}) == values.shape[0]  # no two rows alike


def weights(kind: str, seed: int, **overrides: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = models.build_model(preset("tiny-llama", **overrides), adapter(kind), "bf16", CPU)
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.data.clone()
        if is_four_bit(p):
            out[name + ".absmax"] = p.quant_state.absmax.clone()
    return out


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_the_same_seed_gives_the_same_weights_and_another_seed_others(kind: str) -> None:
    first, again, other = weights(kind, 0), weights(kind, 0), weights(kind, 1)
    frozen = [name for name in first if "lora_" not in name]
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in frozen if first[name].numel() > 256)


# an MLP weight of 256 x 8192 values: longer than the tiled block
LONG = {"intermediate_size": 8192}


def test_frozen_weights_are_a_tiled_block_and_trainable_ones_drawn_per_element() -> None:
    frozen = weights("lora", 0, **LONG)["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"].view(-1)
    trained = weights("none", 0, **LONG)["model.layers.0.mlp.up_proj.weight"].view(-1)
    assert frozen.numel() == trained.numel() > TILE + 1000
    assert torch.equal(frozen[:1000], frozen[TILE:TILE + 1000])
    assert not torch.equal(trained[:1000], trained[TILE:TILE + 1000])
    for values in (frozen, trained):
        assert abs(values.float().std().item() - 0.02) < 0.001
        # rows of 256 never repeat one another (the block's length is a prime)
        assert len({tuple(row.tolist()) for row in values.view(-1, 256)}) == values.numel() // 256


# small-llama's widths, 24 layers deep: enough weight (140 MB in bf16) that the build's own bytes stand out of a
# Python process's noise, small enough to quantise on a CPU in seconds
DEEP = preset("small-llama", num_hidden_layers=24)
RSS_PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from memprof.config.spec import ModelSpec
from memprof.measure.accounting import weight_bytes
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
built = weight_bytes(models.build_model(spec, qlora, "bf16", torch.device("cpu")))
high = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"growth": high - before, "bf16_bytes": bf16_bytes,
                  "weight_bytes": built.frozen.total + built.trainable.total + built.buffers.total}))
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


# Llama-3.2-1B's vocabulary (128,256 x 2,048) over small-llama's layers: the embedding, 1.05 GB once peft's k-bit
# preparation made it fp32, is nearly all of the model
WIDE_VOCAB = preset("small-llama", vocab_size=128_256, hidden_size=2048, intermediate_size=2048, num_hidden_layers=2)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the RSS high-water mark from /proc")
def test_a_qlora_build_never_holds_a_16_bit_copy_beside_an_fp32_parameter() -> None:
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, WIDE_VOCAB.model_dump_json()], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(out.stdout.splitlines()[-1])
    embedding_bf16 = 128_256 * 2048 * 2
    # cast by peft, the fp32 embedding was made beside its bf16 original: the build's peak was the built weights
    # plus that 0.53 GB; made in fp32, it is the built weights and what a process allocates on the way (~0.1 GB)
    assert figures["growth"] < figures["weight_bytes"] + embedding_bf16 / 2, figures


# the Llama-3.2-1B architecture two layers deep: a largest linear of 16.8 M values (33.6 MB in bf16) beside the
# build's fixed draws (a 4 MiB tile block, a pool of 2**20 quantised values)
WIDE = preset("llama-3.2-1b", num_hidden_layers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_device_never_holds_an_unquantised_linear() -> None:
    import bitsandbytes.functional as bnb_f

    cuda = torch.device("cuda", torch.cuda.current_device())
    # peft's k-bit preparation left out: its fp32 cast of the embeddings is peft's transient, not the build's
    qlora = adapter("qlora", compute_dtype="bfloat16", prepare_for_kbit_training=False)
    gc.collect()  # earlier tests' models in reference cycles would be freed mid-build and lower `kept` alone
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = models.build_model(WIDE, qlora, "bf16", cuda)
    peak, kept = torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start
    four_bit = [p for p in model.parameters() if is_four_bit(p)]
    largest = max(p.quant_state.shape.numel() * 2 for p in four_bit)
    assert peak - kept < largest, (peak, kept, largest)
    assert all(p.device == cuda and p.quant_state.absmax.device == cuda for p in four_bit)
    values = bnb_f.dequantize_4bit(four_bit[0].data, four_bit[0].quant_state).float()
    assert torch.isfinite(values).all() and abs(values.std().item() - 0.02) < 0.002
    before = host_build(WIDE, qlora, "bf16", cuda)  # built once: 13 s of CPU init on a 2-core machine
    assert weight_bytes(model) == weight_bytes(before) and layout(model) == layout(before)
