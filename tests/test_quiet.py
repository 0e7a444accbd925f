"""What memprof prints is about the run: the library messages memprof silences (``memprof.quiet``) stay silent, on a
CPU with AVX512-BF16 (where bitsandbytes prints its ``kernels`` hint as it loads) and without one, and without
memprof they are there (so the test can fail)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = """
import importlib.abc, importlib.machinery, sys
if {with_memprof}:
    import memprof

class ForceAvx512Bf16(importlib.abc.MetaPathFinder):  # bitsandbytes asks has_avx512bf16() as its CPU ops load
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.backends.cpu.ops":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            import bitsandbytes.functional as functional
            functional.has_avx512bf16 = lambda: {avx512bf16}
            run(module)
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, ForceAvx512Bf16())
import bitsandbytes, peft, torch, transformers
from torch.profiler import profile
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
with profile(profile_memory=True):
    model(torch.zeros(1, 4, dtype=torch.long))
moe = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                  num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2)
experts = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(moe),
                              peft.LoraConfig(r=2, target_modules="all-linear"))
assert experts.base_model.model.model.layers[0].mlp.experts.base_layer.r["default"] == 4  # the fused pattern applies
peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(moe),
                    peft.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={{"no_such_module": 4}}))
print("ran")
"""
NOISE = ("gemm_4bit_forward", "is_gradient_checkpointing", "USDT:", "gate_up_proj']")
USERS = "['no_such_module']"  # a pattern of the user's that matches nothing: peft's warning stays


def _stderr(with_memprof: bool, avx512bf16: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}  # this process imported memprof
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(with_memprof=with_memprof, avx512bf16=avx512bf16)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr[-2000:]
    return proc.stderr


@pytest.mark.parametrize("avx512bf16", [True, False])
def test_memprof_silences_exactly_the_library_noise(avx512bf16: bool) -> None:
    bare = _stderr(with_memprof=False, avx512bf16=avx512bf16)
    present = [n for n in NOISE if n in bare]
    assert present == (list(NOISE) if avx512bf16 else list(NOISE[1:])), bare[-2000:]
    quiet = _stderr(with_memprof=True, avx512bf16=avx512bf16)
    assert not [n for n in NOISE if n in quiet], quiet[-2000:]
    assert USERS in bare and USERS in quiet, quiet[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed (memprof[torchao])")
@pytest.mark.skipif(torch.version.cuda is not None, reason="the CUDA kernels' load failure is a CPU-only torch's")
def test_torchao_on_a_cpu_only_torch_loads_quietly_under_memprof() -> None:
    # peft imports torchao where it is installed; on a CPU build of torch torchao cannot load its CUDA kernels and
    # says so, and torch says torchao registers enums it no longer needs to: neither is about the run
    noise = ("Failed to load", "is an Enum subclass")
    script = "if {with_memprof}:\n    import memprof\nimport peft"
    runs = {with_memprof: subprocess.run([sys.executable, "-c", script.format(with_memprof=with_memprof)],
                                         capture_output=True, text=True, timeout=120)
            for with_memprof in (False, True)}
    assert all(proc.returncode == 0 for proc in runs.values()), runs[True].stderr[-2000:]
    assert all(n in runs[False].stderr for n in noise), runs[False].stderr[-2000:]
    assert not [n for n in noise if n in runs[True].stderr], runs[True].stderr[-2000:]
