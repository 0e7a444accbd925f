"""The optimizer catalogue: every name memprof can build, as plain data (no torch import).

Names follow ``transformers.TrainingArguments.optim`` so users type what they already know; these are built
through transformers' own factory (``Trainer.get_optimizer_cls_and_kwargs``). A few entries beyond transformers
name their class directly. ``tests/test_catalogue.py`` checks this table against transformers' enum.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer as users name it.

    Attributes:
        name: the name in suites and ``TrainingArguments.optim``.
        library: the package that implements it.
        states: what it keeps per parameter, in words.
        bytes_per_param: state bytes per trainable fp32 parameter of a large tensor (8-bit: + one fp32 absmax
            or scale per 256-element block); None when it depends on shape or rank (factored or projected
            states). ``memprof.measure.formulas`` has the exact bytes; a test checks the two agree.
        needs_cuda: True when it cannot run on the CPU.
        requires: the importable module it needs ("" when it ships with the core dependencies).
        install: the pip requirement that provides ``requires``.
        factory: "transformers" (built by transformers' mapping) or "module:Class" for entries beyond it.
    """

    name: str
    library: str
    states: str
    bytes_per_param: float | None
    needs_cuda: bool = False
    requires: str = ""
    install: str = ""
    factory: str = "transformers"

    @property
    def installed(self) -> bool:
        return not self.requires or importlib.util.find_spec(self.requires) is not None

    @property
    def schedule_free(self) -> bool:
        """It takes no LR schedule: its own averaging replaces one (transformers gives it the warm-up steps)."""
        return self.library == "schedulefree"


def _e(*args, **kwargs) -> OptimizerEntry:
    return OptimizerEntry(*args, **kwargs)


_ADAM = "exp_avg, exp_avg_sq"
_BNB8 = "uint8 + fp32 absmax per 256 (fp32 below 4096 elements)"
# 8-bit: a byte per element and state, plus a 4-byte absmax per 256 elements and state
_Q8 = 1 + 4 / 256
_Q4 = 0.5 + 4 / 256

ENTRIES: tuple[OptimizerEntry, ...] = (
    _e("adamw_torch", "torch", _ADAM, 8.0),
    _e("adamw_torch_fused", "torch", _ADAM, 8.0),
    _e("adafactor", "transformers", "factored row/col second moment", None),
    _e("adamw_anyprecision", "torchdistx", _ADAM, 8.0, requires="torchdistx",
       install="git+https://github.com/pytorch/torchdistx"),  # no PyPI release: pip builds it from source
    _e("adamw_torch_4bit", "torchao", _ADAM + " in 4-bit blocks", 2 * _Q4, requires="torchao", install="torchao"),
    _e("adamw_torch_8bit", "torchao", _ADAM + " in 8-bit blocks", 2 * _Q8, requires="torchao", install="torchao"),
    _e("ademamix", "bitsandbytes", "m1, m2 (slow EMA), nu", 12.0),
    _e("ademamix_8bit", "bitsandbytes", "m1, m2, nu: " + _BNB8, 3 * _Q8),
    _e("sgd", "torch", "none (momentum 0)", 0.0),
    _e("adagrad", "torch", "sum of squared gradients", 4.0),
    _e("adamw_bnb_8bit", "bitsandbytes", _BNB8, 2 * _Q8),
    _e("adamw_8bit", "bitsandbytes", _BNB8, 2 * _Q8),
    _e("lion_8bit", "bitsandbytes", "momentum: " + _BNB8, _Q8),
    _e("lion_32bit", "bitsandbytes", "momentum", 4.0),
    _e("paged_adamw_32bit", "bitsandbytes", _ADAM + " (paged on CUDA)", 8.0),
    _e("paged_adamw_8bit", "bitsandbytes", _BNB8 + " (paged on CUDA)", 2 * _Q8),
    _e("paged_ademamix_32bit", "bitsandbytes", "m1, m2, nu (paged on CUDA)", 12.0),
    _e("paged_ademamix_8bit", "bitsandbytes", "m1, m2, nu: " + _BNB8 + " (paged on CUDA)", 3 * _Q8),
    _e("paged_lion_32bit", "bitsandbytes", "momentum (paged on CUDA)", 4.0),
    _e("paged_lion_8bit", "bitsandbytes", "momentum: " + _BNB8 + " (paged on CUDA)", _Q8),
    _e("rmsprop", "torch", "square average", 4.0),
    _e("rmsprop_bnb", "bitsandbytes", "square average", 4.0),
    _e("rmsprop_bnb_8bit", "bitsandbytes", "square average: " + _BNB8, _Q8),
    _e("rmsprop_bnb_32bit", "bitsandbytes", "square average", 4.0),
    _e("galore_adamw", "galore-torch", "Adam moments of rank-r projections + projector", None,
       requires="galore_torch", install="galore-torch"),
    _e("galore_adamw_8bit", "galore-torch", "8-bit Adam moments of rank-r projections + projector", None,
       needs_cuda=True, requires="galore_torch", install="galore-torch"),
    _e("galore_adafactor", "galore-torch", "factored moments of rank-r projections + projector", None,
       requires="galore_torch", install="galore-torch"),
    _e("apollo_adamw", "apollo-torch", "Adam moments of rank-r random projections", None,
       requires="apollo_torch", install="apollo-torch"),
    _e("grokadamw", "grokadamw", _ADAM + ", grok EMA (kept on the CPU)", 12.0, requires="grokadamw",
       install="grokadamw"),
    _e("schedule_free_adamw", "schedulefree", "z, exp_avg_sq", 8.0, requires="schedulefree"),
    _e("schedule_free_radam", "schedulefree", "z, exp_avg_sq", 8.0, requires="schedulefree"),
    _e("schedule_free_sgd", "schedulefree", "z", 4.0, requires="schedulefree"),
    _e("stable_adamw", "torch-optimi", _ADAM + " (+ Kahan buffer for 16-bit params)", 8.0, requires="optimi",
       install="torch-optimi"),
    _e("torch_adafactor", "torch", "factored row/col second moment", None,
       factory="torch.optim:Adafactor"),
    _e("came", "came-pytorch", "exp_avg, factored second moment and residual", None,
       requires="came_pytorch", install="came-pytorch", factory="came_pytorch:CAME"),
    _e("adam_mini", "adam-mini", "exp_avg, one second moment per block", None,
       requires="adam_mini", install="adam-mini", factory="adam_mini:Adam_mini"),
)

CATALOGUE: dict[str, OptimizerEntry] = {entry.name: entry for entry in ENTRIES}

# transformers names memprof does not run, and why (they need a special training loop or a device we do not
# target); kept so the catalogue test can tell "left out on purpose" from "forgotten".
NOT_SUPPORTED: dict[str, str] = {
    "adamw_torch_xla": "needs a TPU (torch_xla)",
    "adamw_torch_npu_fused": "needs an Ascend NPU",
    "lomo": "fuses the update into backward; needs LOMO's own training loop",
    "adalomo": "fuses the update into backward; needs LOMO's own training loop",
    "galore_adamw_layerwise": "layer-wise variant updates inside backward hooks",
    "galore_adamw_8bit_layerwise": "layer-wise variant updates inside backward hooks",
    "galore_adafactor_layerwise": "layer-wise variant updates inside backward hooks",
    "apollo_adamw_layerwise": "layer-wise variant updates inside backward hooks",
}


def is_custom(name: str) -> bool:
    """True for a user-brought ``module:Class`` optimizer."""
    return ":" in name


def lookup(name: str) -> OptimizerEntry:
    """Return the catalogue entry for ``name``.

    Raises:
        KeyError: with a did-you-mean suggestion as its message.
    """
    if name in CATALOGUE:
        return CATALOGUE[name]
    if name in NOT_SUPPORTED:
        raise KeyError(f"optimizer '{name}' is not supported: {NOT_SUPPORTED[name]}")
    close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise KeyError(f"unknown optimizer '{name}'{hint}; `memprof optimizers` lists them")


def unknown(name: str) -> str:
    """Why ``name`` names no optimizer memprof can build ('' when it names one: an entry or a ``module:Class``)."""
    if is_custom(name):
        return ""
    try:
        lookup(name)
    except KeyError as err:
        return str(err.args[0])
    return ""
