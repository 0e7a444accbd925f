"""QLoRA on CPUs of either kind: bitsandbytes repacks 4-bit weights for its CPU inference kernel on CPUs with
AVX512-BF16 (``has_avx512bf16()``), and memprof must train, evaluate and train on whichever branch the CPU takes."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch

from memprof import suite
from memprof.train.models import build_model
from memprof.measure.accounting import weight_bytes
from memprof.train.loop import evaluate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_qlora_trains_evaluates_and_trains_on_with_the_weights_it_started_with(
        monkeypatch: pytest.MonkeyPatch, avx512bf16: bool) -> None:
    # bitsandbytes reads the CPU flag when a Linear4bit is made: force the branch this CPU would not take
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512bf16)
    cell = next(c for c in suite.load("quick").cells if c.adapter.kind == "qlora")
    torch.manual_seed(0)
    model = build_model(cell.model, cell.adapter, cell.shape.precision, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # tiny-llama's MLP has 688 outputs: the CPU kernel's repack would assert out_features % 32 == 0
    assert any(m.out_features % 32 for m in layers)
    assert all(not m.support_avx512bf16_for_cpu for m in layers)
    before = weight_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, 256, (2, 32))
    losses = []
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        held_out = evaluate(model, [x], torch.device("cpu"))  # eval mode, no grad: where the repack would run
        assert torch.isfinite(torch.tensor(held_out))
    assert losses[1] < losses[0]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert weight_bytes(model).frozen == before.frozen
