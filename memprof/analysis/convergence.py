"""Convergence figures of one cell, from its per-step logs: pure functions, no torch.

The training loss of one step is one batch's loss, so figures that look for a moment (the target) use the trailing
mean over ``diagnose.SMOOTH_WINDOW`` steps, the same window as the Record's ``final_loss_smoothed``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from memprof.analysis import diagnose
from memprof.results.record import smoothed_final

if TYPE_CHECKING:
    from memprof.results.record import StepLog

# What went wrong, most severe first: the verdict is the first that applies, named as its finding is (one name in
# every table), a loss gone NaN or exploded as the status a NaN gives ("diverged").
_VERDICTS = (("non_finite", "diverged"), ("exploded", "diverged"), ("never_drops", "never drops"),
             ("plateau", "plateau"), ("oscillation", "oscillation"), ("spikes", "spikes"),
             ("overfitting", "overfitting"))


def steps_to_target(losses: Sequence[float], target: float) -> int | None:
    """Optimizer steps until the smoothed training loss first reaches ``target``; None if it never does."""
    for i, smoothed in enumerate(diagnose.trailing_mean(losses)):
        if not math.isfinite(smoothed):
            return None
        if smoothed <= target:
            return i + 1
    return None


def elapsed_s(step_times_s: Sequence[float], warmup_steps: int) -> list[float]:
    """Training time (evaluation excluded) at the end of each step, each warm-up step counted at the median time of
    the steps after it: a warm-up step's own time holds one-off start-up (kernel selection, lazy initialisation, on
    a GPU the first cell's CUDA context), which the step timings leave out and a long run pays once."""
    timed = step_times_s[warmup_steps:]
    usual = statistics.median(timed) if timed else None
    times = [usual if i < warmup_steps and usual is not None else t for i, t in enumerate(step_times_s)]
    return list(itertools.accumulate(times))


def seconds_to_target(step_times_s: Sequence[float], steps: int | None, warmup_steps: int) -> float | None:
    """Training time of the first ``steps`` steps, as ``elapsed_s`` counts it."""
    return None if steps is None else elapsed_s(step_times_s, warmup_steps)[steps - 1]


def loss_auc(losses: Sequence[float]) -> float | None:
    """Area under the training-loss curve per step: the mean loss over the run, lower when it learned sooner.

    None when a loss is not finite (the area is not defined).
    """
    if not losses or not all(math.isfinite(x) for x in losses):
        return None
    return sum(losses) / len(losses)


def verdict(codes: Sequence[str], target: float | None, reached: int | None) -> str:
    """What went wrong, in a word or two; empty when nothing did."""
    for code, word in _VERDICTS:
        if code in codes:
            return word
    return "missed target" if target is not None and reached is None else ""


def summarise(logs: Sequence[StepLog], floor: float | None, target: float | None,
              warmup_steps: int) -> dict[str, Any]:
    """The Record's convergence fields for one cell's logs."""
    losses = [log.loss for log in logs]
    evals = [(log.step, log.eval_loss) for log in logs if log.eval_loss is not None]
    final_eval = evals[-1][1] if evals else None
    reached = steps_to_target(losses, target) if target is not None else None
    codes = diagnose.diagnose(losses, evals, floor)
    final = final_eval if final_eval is not None else (smoothed_final(losses) if losses else math.nan)
    return {
        "final_eval_loss": final_eval,
        "eval_perplexity": math.exp(final_eval) if final_eval is not None and final_eval < 700 else None,
        "entropy_floor_nats": floor,
        "floor_gap_nats": final - floor if floor is not None and math.isfinite(final) else None,
        "steps_to_target": reached,
        "seconds_to_target": seconds_to_target([log.step_time_s for log in logs], reached, warmup_steps),
        "loss_auc": loss_auc(losses),
        "diagnosis": ",".join(codes),
        "verdict": verdict(codes, target, reached) if logs else "",
    }
