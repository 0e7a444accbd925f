"""How far `memprof plan` is off on architectures outside its analytic model: for decoder architectures outside
``memprof.measure.step_memory.MODELLED`` (Gemma2, Gemma3, Phi-3, OLMo2, Granite, and the mixtures of experts
Mixtral and Qwen3-MoE), what forward saves in the step the plan runs on the meta device
(``memprof.measure.meta_step``) and what the coefficients fitted to Llama-family CPU runs predict, against what
autograd saves in one real step on the CPU (``SavedActivations``, exact), for LoRA, QLoRA and a full fine-tune, with
and without checkpointing. A byte-level vocabulary keeps the loss's share small, so the error is the layers' (at a
real model's depth the layers hold most of the activations). The fitted coefficients' largest miss, as a share of
their prediction, is the plan's stated uncertainty where it has to use them (a model the meta device cannot run;
``memprof.plan.predict``'s
``ARCHITECTURE_ERROR``, and ``MOE_ERROR`` for mixtures of experts). Writes fallback_accuracy.{json,md} to ``--out``.

    python benchmarks/fallback_accuracy.py --out results/benchmarks
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from memprof.config.spec import AdapterSpec, CellConfig, Levers, ModelSpec, OptimizerSpec, ShapeSpec
from memprof.measure import meta_step, step_memory
from memprof.measure.replay import saved_bytes
from memprof.plan import calibration, predict
from memprof.results import env

# small-llama's widths (hidden 512, 4 layers, 8 heads, 4 KV heads, byte vocabulary) in each architecture
WIDTHS = {"vocab_size": 256, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4, "pad_token_id": 0}
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gemma2": {"model_type": "gemma2", "head_dim": 64},
    "gemma3": {"model_type": "gemma3_text", "head_dim": 64},
    "phi3": {"model_type": "phi3"},
    "olmo2": {"model_type": "olmo2"},
    "granite": {"model_type": "granite"},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 344},
    "qwen3-moe": {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 344,
                  "head_dim": 64},
}
ATTENTION = {"gemma2": "eager"}  # transformers has no sdpa path for Gemma2
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def measure(name: str, adapter: str, checkpointing: bool, batch: int, seq: int) -> dict[str, Any]:
    cell = CellConfig(model=ModelSpec(name=name, config={**WIDTHS, **ARCHITECTURES[name]}),
                      adapter=AdapterSpec(name=adapter, kind=adapter, lora=LORA if adapter != "none" else {}),
                      optimizer=OptimizerSpec(label="adamw_torch", name="adamw_torch"),
                      shape=ShapeSpec(batch_size=batch, seq_len=seq, precision="bf16"),
                      levers=Levers(gradient_checkpointing=checkpointing,
                                    attn_implementation=ATTENTION.get(name, "sdpa")))
    assert step_memory.step_shape(cell, "cpu") is None, f"{name} is in the analytic model"
    measured = saved_bytes(cell)
    step = meta_step.step_peak(cell, "cpu")  # the step the plan runs for such a model
    fitted, _, _ = predict.fitted_activations(cell, predict.exact_parts(cell), calibration.load())
    return {"architecture": name, "adapter": adapter, "checkpointing": checkpointing, "measured_bytes": measured,
            "meta_bytes": step.saved if step else None, "fitted_bytes": fitted, "miss": measured / fitted - 1}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    moe = {name for name, config in ARCHITECTURES.items() if "num_experts_per_tok" in config}
    worst = {kind: max((r for r in rows if (r["architecture"] in moe) == (kind == "moe")), key=lambda r: abs(r["miss"]))
             for kind in ("dense", "moe")}
    lines = [f"# The plan on architectures outside its analytic model ({result['machine']['cpu']}, "
             f"torch {result['machine']['versions']['torch']})", "",
             f"Saved activations of one bf16 step, b{result['batch']} × s{result['seq']}, each architecture at "
             "small-llama's widths (hidden 512, 4 layers, a byte vocabulary, so the layers' bytes dominate); LoRA r16 "
             "on every linear layer. Measured: `SavedActivations` (exact). Meta device: what forward saves in the "
             "step `memprof plan` runs on the meta device for such a model. Fitted: the coefficients fitted to "
             "Llama-family CPU runs, which the plan uses where the meta device cannot run the model. Miss: "
             "measured / fitted - 1.", "",
             f"The meta device ran {sum(r['meta_bytes'] is not None for r in rows)} of the {len(rows)} rows and "
             f"equals the measurement in {sum(r['meta_bytes'] == r['measured_bytes'] for r in rows)}.", "",
             "The fitted coefficients:", "",
             *(f"- largest miss, {label}: {w['miss']:+.1%} of the prediction ({w['architecture']}, {w['adapter']}"
               f"{', checkpointing' if w['checkpointing'] else ''})." for label, w in
               (("dense architectures", worst["dense"]), ("mixtures of experts", worst["moe"]))), "",
             "The plan states these as their uncertainty where it has to use them (a model the meta device cannot "
             "run).", "",
             "| architecture | adapter | checkpointing | measured | meta device | fitted | miss |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        meta = r["meta_bytes"]
        planned = "= measured" if meta == r["measured_bytes"] else "—" if meta is None else f"{meta / 2**20:.2f} MiB"
        lines.append(f"| {r['architecture']} | {r['adapter']} | {'on' if r['checkpointing'] else 'off'} "
                     f"| {r['measured_bytes'] / 2**20:.2f} MiB | {planned} | {r['fitted_bytes'] / 2**20:.2f} MiB "
                     f"| {r['miss']:+.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True, help="folder for fallback_accuracy.{json,md}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(name, adapter, checkpointing, args.batch, args.seq) for name, adapter, checkpointing
            in itertools.product(ARCHITECTURES, ("lora", "qlora", "none"), (False, True))]
    result = {"machine": env.capture(), "batch": args.batch, "seq": args.seq, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fallback_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fallback_accuracy.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
