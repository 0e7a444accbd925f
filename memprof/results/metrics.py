"""The metrics a comparison judges, each with its one written rule, and the grammar of rules.

Read by ``memprof.analysis.compare`` (which judges) and ``memprof.suite`` (which checks a suite's ``[compare]``
table before anything runs). The rules:
- exact accounting (state, weight and gradient bytes) must be identical: any change is a regression (update the
  baseline when the change is intended);
- memory peaks may move by a relative threshold, and only between runs on the same machine: 5% for the CUDA
  allocator's, 20% for the CPU's resident memory, where glibc keeps freed pages by tens of MB more or less from one
  run of a cell to the next (a quick-suite cell's ~100 MB peak moves by up to ~15%);
- timings are noisy: a verdict needs a factor (1.1) *and* a significant Mann-Whitney U test over the repeats
  (p < 0.002, as asv);
- the smoothed final loss may move by an absolute tolerance, compared seed by seed (a seed fixes the loss).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Literal

from memprof.errors import UserError
from memprof.results.record import Record

Kind = Literal["exact", "relative", "absolute", "noisy", "off"]
DEFAULT_ALPHA = 0.002  # asv's threshold: 7 repeats per side are needed to reach it (6 against 7 also do)


@dataclass(frozen=True)
class Rule:
    """How one metric is judged; ``limit`` is the fraction (relative), tolerance (absolute) or factor (noisy)."""

    kind: Kind
    limit: float = 0.0
    alpha: float = DEFAULT_ALPHA

    def __str__(self) -> str:
        if self.kind == "relative":
            return f"{self.limit * 100:g}%"
        if self.kind == "absolute":
            return f"abs={self.limit:g}"
        if self.kind == "noisy":
            return f"factor={self.limit:g},p={self.alpha:g}"
        return self.kind


@dataclass(frozen=True)
class Metric:
    rule: Rule
    higher_is_better: bool = False
    machine_bound: bool = False  # depends on the hardware: not compared across different machines


_EXACT = Rule("exact")
_PEAK = Rule("relative", 0.05)
_RSS_PEAK = Rule("relative", 0.2)
_TIMING = Rule("noisy", 1.1)

METRICS: dict[str, Metric] = {
    "optimizer_state_bytes": Metric(_EXACT),
    "trainable_weight_bytes": Metric(_EXACT),
    "frozen_weight_bytes": Metric(_EXACT),
    "gradient_bytes": Metric(_EXACT),
    "predicted_state_bytes": Metric(_EXACT),
    "peak_allocated_bytes": Metric(_PEAK, machine_bound=True),
    "peak_reserved_bytes": Metric(_PEAK, machine_bound=True),
    "peak_rss_delta_bytes": Metric(_RSS_PEAK, machine_bound=True),
    # attention kernels (and so the tensors they save) differ between GPU models
    "activation_bytes": Metric(_PEAK, machine_bound=True),
    "tokens_per_s": Metric(_TIMING, higher_is_better=True, machine_bound=True),
    "step_time_median_s": Metric(_TIMING, machine_bound=True),
    "final_loss_smoothed": Metric(Rule("absolute", 0.05)),
}




def known_metrics() -> list[str]:
    """Metrics a rule may name: the table's, and any other numeric measurement of a Record."""
    ignored = {"schema_version", "fail_step", "exit_code", "concurrent_jobs"}
    numeric = [f.name for f in fields(Record) if str(f.type).split(" ")[0] in ("int", "float")]
    return list(METRICS) + [name for name in numeric if name not in METRICS and name not in ignored]


def parse_spec(spec: str, current: Rule) -> Rule:
    """One rule from its text: ``exact``, ``off``, ``5%``, ``abs=0.1``, ``factor=1.2`` or ``factor=1.2,p=0.01``.

    Raises:
        ValueError: with a message that says what is accepted.
    """
    text = spec.strip()
    if text in ("exact", "off"):
        return Rule(text)
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not fraction >= 0:
                raise ValueError
            return Rule("relative", fraction)
        items = dict(item.split("=", 1) for item in text.split(","))
        values = {key.strip(): float(value) for key, value in items.items()}
    except ValueError:
        raise ValueError(f"cannot read rule '{spec}' (use exact, off, 5%, abs=0.1, factor=1.2 or "
                         "factor=1.2,p=0.01)") from None
    if set(values) == {"abs"}:
        if not values["abs"] >= 0:
            raise ValueError("abs= must be >= 0")
        return Rule("absolute", values["abs"])
    if values and set(values) <= {"factor", "p"}:
        base = current if current.kind == "noisy" else _TIMING
        factor, alpha = values.get("factor", base.limit), values.get("p", base.alpha)
        if not factor >= 1:
            raise ValueError("factor= must be >= 1")
        if not 0 < alpha < 1:
            raise ValueError("p= must be between 0 and 1")
        return Rule("noisy", factor, alpha)
    raise ValueError(f"cannot read rule '{spec}' (keys: abs=, or factor= with an optional p=)")


def resolve_rules(items: Iterable[tuple[str, str]], where: str,
                  rules: dict[str, Rule] | None = None) -> dict[str, Rule]:
    """``rules`` (default: the table's) with ``(metric, spec)`` overrides applied in order.

    Raises:
        UserError: naming ``where`` and the metric.
    """
    out = dict(rules) if rules is not None else {name: m.rule for name, m in METRICS.items()}
    known = known_metrics()
    for metric, spec in items:
        if metric not in known:
            raise UserError(where, f"unknown metric '{metric}' (known: {', '.join(METRICS)}, or another "
                            "numeric measurement of a record)")
        try:
            out[metric] = parse_spec(spec, out.get(metric, Rule("off")))
        except ValueError as err:
            raise UserError(where, f"{metric}: {err}") from None
    return out


def split_rule(text: str) -> tuple[str, str]:
    """``metric:spec`` (the command line form) into its two halves."""
    metric, sep, spec = text.partition(":")
    if not sep or not metric.strip() or not spec.strip():
        raise UserError("--rule", f"'{text}': expected METRIC:RULE, e.g. peak_rss_delta_bytes:10% or "
                        "tokens_per_s:factor=1.2")
    return metric.strip(), spec.strip()
