"""What a training curve says went wrong, each finding with its usual remedy: pure functions over per-step numbers.

Every threshold is named here with the reason for its value. They were set on real runs (tests/test_diagnose.py
holds one run that shows each finding, and runs that must not) and are meant to flag what a person looking at the
curve would call wrong, not batch-to-batch noise: at the batch sizes memprof runs, one step's loss moves by about
5% of its level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The start of the run, against which "drops" and "explodes" are judged: a mean, so one noisy batch does not decide.
START_STEPS = 3
# exploded: the trailing-mean loss went above this multiple of the start (a random model starts near ln(vocab),
# so twice that means the updates are destroying the model, not learning slowly).
EXPLODE_FACTOR = 2.0
# never_drops: the final (smoothed) loss is less than 2% below the start: nothing was learned. Judged only when the
# start and the final smoothed loss are means over different steps (a run of 8 steps or more): in a shorter one they
# share steps, so the final loss could not be told from the start however much the run learned.
MIN_DROP = 0.02
# oscillation: in some window of 10 steps the loss swings from step to step (the median change, less the window's
# net drift per step) by more than 10% of its level and by more than half of what it had dropped since the start:
# it thrashes instead of learning. A median, so that one spike is not an oscillation; less the drift, so that a fast
# steady drop is not one; against the drop so far, so that the batch noise of a low loss on small batches of text
# (often 20% of the level) is not one either.
OSC_WINDOW = 10
OSC_SWING = 0.10
OSC_SWING_OF_DROP = 0.5
# spikes: a step's loss more than 30% above the median of the 5 steps before it and undoing more than half of the
# drop since the start (batch noise at a low loss does neither), back within 10% of that level within 5 steps (a
# spike that does not come back is a divergence, not a spike).
SPIKE_REFERENCE = 5
SPIKE_RISE = 0.30
SPIKE_OF_DROP = 0.5
SPIKE_RECOVERY = 5
SPIKE_BACK = 0.10
# plateau: the second half of the run improved the loss by less than 3% (medians of its first and last 10 steps)
# while the loss is still far from where it could be: 25% above the entropy floor when that is known, else less
# than 25% below the start. Needs 40 steps to judge.
PLATEAU_WINDOW = 10
PLATEAU_PROGRESS = 0.03
PLATEAU_FAR = 0.25
# overfitting: the final eval loss is above 1.3x the final (smoothed) training loss: the model does much better on
# the batches it trained on than on held-out text.
OVERFIT_RATIO = 1.3
SMOOTH_WINDOW = 5  # steps in a smoothed loss, as the Record's final_loss_smoothed


@dataclass(frozen=True)
class Finding:
    code: str
    meaning: str
    remedy: str


FINDINGS: dict[str, Finding] = {f.code: f for f in (
    Finding("non_finite", "the loss became NaN or infinite", "the LR is too high: reduce it about 10x"),
    Finding("exploded", "the loss rose to more than twice its start", "the LR is too high: reduce it about 10x"),
    Finding("never_drops", "the loss never dropped", "check the data and task set-up (labels, what is trainable) "
            "and the LR: many orders of magnitude too small, or so large that each update wrecks the model"),
    Finding("oscillation", "the loss swings up and down from step to step",
            "add LR warm-up (lr_warmup_ratio = 0.1) or lower the LR"),
    Finding("spikes", "the loss spiked and recovered", "clip gradients (max_grad_norm = 1.0) or lower the LR"),
    Finding("plateau", "the loss stopped improving early, far from its best",
            "the LR is too low (the usual cause): raise it 3-10x; if the loss fell fast and then stuck, the LR may be "
            "too high instead: sweep it"),
    Finding("overfitting", "the eval loss is far above the training loss",
            "more data, fewer steps (stop at the lowest eval loss), or more regularisation (dropout, weight decay)"),
)}


def diagnose(losses: Sequence[float], evals: Sequence[tuple[int, float]], floor: float | None = None) -> list[str]:
    """The codes of ``FINDINGS`` that the curve shows, most severe first.

    Args:
        losses: training loss per step (the last may be NaN: the step the run stopped at).
        evals: (step, eval loss) of each evaluation.
        floor: the best achievable loss, when known.
    """
    if not losses:
        return []
    if not all(math.isfinite(x) for x in losses):
        return ["non_finite"]
    codes = []
    start = statistics.fmean(losses[:START_STEPS])
    smoothed = trailing_mean(losses)
    if max(smoothed) > EXPLODE_FACTOR * start:
        codes.append("exploded")  # one cause, one finding: a curve that blew up swings and spikes on its way
    elif oscillates(losses, start):
        codes.append("oscillation")
    elif spike_steps(losses, start):
        codes.append("spikes")
    if not codes and len(losses) >= START_STEPS + SMOOTH_WINDOW and smoothed[-1] > start * (1 - MIN_DROP):
        codes.append("never_drops")  # only on a quiet curve: an unstable one has its own cause
    if not {"exploded", "never_drops"} & set(codes) and plateaued(losses, start, floor):
        codes.append("plateau")
    if "exploded" not in codes and evals and evals[-1][1] > OVERFIT_RATIO * smoothed[-1]:
        codes.append("overfitting")
    return codes


def oscillates(losses: Sequence[float], start: float) -> bool:
    changes = [abs(b - a) for a, b in zip(losses, losses[1:])]
    for i in range(len(changes) - OSC_WINDOW + 1):
        window = losses[i:i + OSC_WINDOW + 1]
        swing = statistics.median(changes[i:i + OSC_WINDOW]) - abs(window[-1] - window[0]) / OSC_WINDOW
        level = statistics.median(window)
        if swing > OSC_SWING * level and swing > OSC_SWING_OF_DROP * (start - level):
            return True
    return False


def spike_steps(losses: Sequence[float], start: float) -> list[int]:
    """Steps whose loss jumped and came back."""
    out = []
    for t in range(SPIKE_REFERENCE, len(losses)):
        reference = statistics.median(losses[t - SPIKE_REFERENCE:t])
        rise = losses[t] - reference
        if rise <= SPIKE_RISE * reference or rise <= SPIKE_OF_DROP * (start - reference):
            continue
        after = losses[t + 1:t + 1 + SPIKE_RECOVERY]
        if any(x <= reference * (1 + SPIKE_BACK) for x in after):
            out.append(t)
    return out


def plateaued(losses: Sequence[float], start: float, floor: float | None) -> bool:
    half = len(losses) // 2
    if len(losses) - half < 2 * PLATEAU_WINDOW:
        return False
    early = statistics.median(losses[half:half + PLATEAU_WINDOW])
    late = statistics.median(losses[-PLATEAU_WINDOW:])
    if late < early * (1 - PLATEAU_PROGRESS):
        return False
    return late > floor * (1 + PLATEAU_FAR) if floor is not None else late > start * (1 - PLATEAU_FAR)


def trailing_mean(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start): a loss with less batch noise."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]
