"""Figures of a run as PNG bytes (matplotlib, Agg backend: no display needed). They plot what the records and
per-step rows hold; they compute nothing but the time axis (``convergence.elapsed_s``, as the time to target)."""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.axes import Axes  # noqa: E402

from memprof.analysis import convergence  # noqa: E402
from memprof.analysis.memory import GROUP_AXES, on_card_bytes  # noqa: E402
from memprof.analysis.report import (Run, by_config, group_title, label_of, lowest_loss_lr,  # noqa: E402
                                     lr_rank_grid, one_per_config)
from memprof.config.spec import varying  # noqa: E402
from memprof.measure.attribution import OUTSIDE, PARTS  # noqa: E402
from memprof.results.record import Record, Status, StepLog  # noqa: E402
from memprof.views.tables import human_bytes, peak_text, scale_unit  # noqa: E402

DPI = 100
COLOURS = plt.get_cmap("tab10").colors


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    png: bytes


# One colour per part, the same in every figure: weights greens, gradients and state blues, activations oranges;
# no two alike that can share a bar (buffers and glibc's free heap, on the CPU)
PART_COLOURS = {"frozen_weights": "#2ca02c", "kbit_fp32_weights": "#98df8a", "trainable_weights": "#17becf",
                "buffers": "#c5b0d5", "gradients": "#9edae5", "optimizer_state": "#1f77b4",
                "optimizer_state_paged_bytes": "#aec7e8", "activations": "#ff7f0e", "loss_logits": "#d62728",
                "layer": "#ffbb78", "optimizer_temporaries": "#9467bd", "workspaces": "#8c564b", "input": "#c49c94",
                "gathered_weights": "#006d2c", "heap_free": "#dbdb8d", "other": "#7f7f7f",
                "allocator_cache_bytes": "#c7c7c7", "non_pytorch_bytes": "#e377c2"}


def memory_figure(run: Run) -> Figure | None:
    """Each configuration's peak as a stacked bar of its parts (``memprof.measure.attribution``), the configurations
    of a model/shape group side by side; memory outside the torch allocator (paged state, the allocator's cache,
    CUDA's context) hatched after it. A configuration without parts (OOM, crash, unavailable) says how it ended and
    what it reached instead. Where a group's configurations differ in optimizer state, beside each group its state
    alone, on the group's own scale, so a saving that is small against the peak (LoRA's state) is seen too. None when
    no cell has a breakdown."""
    records = one_per_config(run.records)
    shown = [r for r in records if r.breakdown and r.peak_bytes is not None]
    if not shown:
        return None
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(group_title(r), []).append(r)
    totals = [sum(max(v, 0) for v in _segments(r).values()) for r in shown]
    unit, scale = scale_unit(max(totals))
    heights = [0.45 * len(rs) + 0.9 for rs in groups.values()]
    attributed = {id(r) for r in shown}
    # else the state panel would say nothing the bars' labels do not
    states = any(len({r.optimizer_state_bytes for r in rs if id(r) in attributed}) > 1 for rs in groups.values())
    fig, axes = plt.subplots(len(groups), 2 if states else 1, figsize=(14 if states else 12, sum(heights) + 1.0),
                             dpi=DPI, squeeze=False, gridspec_kw={"height_ratios": heights,
                                                                  "width_ratios": (4, 2) if states else (1,)})
    present: dict[str, str] = {}
    overshoot = False  # a bar whose named parts exceed its peak (a negative remainder)
    labels: list[Any] = []
    state_labels: list[list[Any]] = []
    for row, (title, rs) in zip(axes, groups.items()):
        ax = row[0]
        names = [a for a in varying([r.config for r in rs], always=("optimizer",)) if a.name not in GROUP_AXES]
        ticks = [" ".join(a.text(r.config) for a in names if not (a.lever and a.is_default(r.config))) for r in rs]
        for y, r in enumerate(rs):
            left = 0.0
            for part, nbytes in (_segments(r).items() if id(r) in attributed else ()):
                if nbytes <= 0:
                    continue
                ax.barh(y, nbytes / scale, left=left, height=0.7, linewidth=0.6, **_style(part))
                present[part] = (PARTS | OUTSIDE)[part].label
                left += nbytes / scale
            if id(r) in attributed and r.breakdown.get("other", 0) < 0:
                overshoot = True
                ax.plot([r.peak_bytes / scale] * 2, [y - 0.45, y + 0.45], color="black", linewidth=1.5)
            labels.append(ax.text(left, y, _bar_label(r, unit, scale, id(r) in attributed), va="center", fontsize=8))
        ax.set_yticks(range(len(rs)), ticks, fontsize=9)
        ax.set_ylim(len(rs) - 0.5, -0.5)  # top to bottom, rows without a bar kept whole
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, max(totals) / scale * 1.05)
        if states:
            state_labels.append(_state_bars(row[1], rs, shown))
    if states:
        axes[0, 1].set_title("optimizer state alone (each group's own scale)", fontsize=10, loc="left")
    measure = "allocator" if shown[0].peak_allocated_bytes is not None else "RSS growth"
    hatched = "; hatched: outside the torch allocator, on the card with them" if set(present) & set(OUTSIDE) else ""
    over = "; black tick: the peak, where the named parts exceed it (a negative remainder)" if overshoot else ""
    axes[-1, 0].set_xlabel(f"{unit} at the peak ({measure}{hatched}{over})")
    handles = [plt.Rectangle((0, 0), 1, 1, **_style(p)) for p in present]
    columns = 4
    rows = math.ceil(len(present) / columns)
    legend_in = 0.22 * rows + 0.15
    fig.set_figheight(fig.get_figheight() + legend_in)
    fig.legend(handles, list(present.values()), loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle("Where each peak's bytes are", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    _room_for(labels, [row[0] for row in axes])
    for row, group_labels in zip(axes, state_labels):
        _room_for(group_labels, [row[1]])
    return Figure("memory", "Where each peak's bytes are", _png(fig))


def _bar_label(r: Record, unit: str, scale: int, attributed: bool) -> str:
    """The figures at a bar's end: the peak, and on CUDA what was on the card (the tables' figure: the bar with
    what lies outside the torch allocator); for a configuration without parts, how it ended and what it reached."""
    if not attributed:
        reached = f": {peak_text(r, r.peak_bytes)} reached" if r.peak_bytes is not None else ""
        return f" {r.outcome}{reached}"
    card = on_card_bytes(r)
    peak = f" {r.peak_bytes / scale:.2f} {unit}"
    text = f"{peak} peak, {card / scale:.2f} {unit} on the card" if card is not None else peak
    return text + ("" if r.status is Status.OK else f" ({r.status.value})")


def _room_for(labels: list[Any], axes: list[Axes]) -> None:
    """Widen the axes' common x range (one scale for every group) until each label, written after its bar's end,
    ends inside its axes: a label ``w`` of an axes' ``W`` pixels wide, starting at ``x``, needs a range to
    ``x / (1 - w / W)``."""
    renderer = axes[0].figure.canvas.get_renderer()
    right = axes[0].get_xlim()[1]
    for text in labels:
        width = text.axes.get_window_extent(renderer).width
        share = text.get_window_extent(renderer).width / width
        if share < 1:
            right = max(right, text.get_position()[0] / (1 - share) * 1.02)
    for ax in axes:
        ax.set_xlim(0, right)


def _state_bars(ax: Axes, rs: list[Record], shown: list[Record]) -> list[Any]:
    """Each record of a group's optimizer state, on the group's own scale: what the allocator holds, then its paged
    part hatched; nothing for a cell whose state was never whole (it stopped before its first step). Returns the
    labels."""
    most_bytes = max((r.optimizer_state_bytes or 0) for r in rs)
    unit, scale = scale_unit(most_bytes or 1)
    labels = []
    for y, r in enumerate(rs):
        if r.optimizer_state_bytes is None:
            continue
        state, paged = r.optimizer_state_bytes, r.optimizer_state_paged_bytes or 0
        ax.barh(y, (state - paged) / scale, height=0.7, linewidth=0.6, **_style("optimizer_state"))
        ax.barh(y, paged / scale, left=(state - paged) / scale, height=0.7, linewidth=0.6,
                **_style("optimizer_state_paged_bytes"))
        label = f" {human_bytes(state)}" + (f", {human_bytes(paged)} paged" if paged else "")
        labels.append(ax.text(state / scale, y, label, va="center", fontsize=8))
    ax.set_yticks(range(len(rs)), [""] * len(rs))
    ax.set_ylim(len(rs) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(0, most_bytes / scale * 1.05 or 1)
    paged = any(r.optimizer_state_paged_bytes for r in shown)
    ax.set_xlabel(unit + (" (hatched: paged)" if paged else ""), fontsize=8, labelpad=1)
    return labels


def _style(part: str) -> dict[str, Any]:
    """A part's bar: its colour; hatched with a dark edge when it lies outside the torch allocator."""
    if part in OUTSIDE:
        return {"facecolor": PART_COLOURS[part], "edgecolor": "#555555", "hatch": "//"}
    return {"facecolor": PART_COLOURS[part], "edgecolor": "white"}


def _segments(r: Record) -> dict[str, int]:
    """A record's breakdown in ``PARTS`` order (the remainder last, negative ones dropped), then what lies outside
    the torch allocator."""
    parts = {name: r.breakdown.get(name, 0) for name in PARTS if name != "other"}
    parts["other"] = r.breakdown.get("other", 0)
    return {**parts, **{name: getattr(r, name) or 0 for name in OUTSIDE}}


def figures(run: Run) -> list[Figure]:
    """One loss figure per model/shape group with per-step logs, then the LR x rank sweep when the run is one."""
    groups: dict[str, list[Record]] = {}
    for r in run.records:
        groups.setdefault(group_title(r), []).append(r)
    groups = {key: rs for key, rs in groups.items() if any(run.steps.get(r.config.index) for r in rs)}
    out = [group_figure(i, key, records, run) for i, (key, records) in enumerate(groups.items())]
    sweep = lr_sweep_figure(run)
    return out + ([sweep] if sweep else [])


def group_figure(index: int, title: str, records: list[Record], run: Run) -> Figure:
    """Training (lines) and eval (markers) loss against step and against training seconds, and the LR per step.
    Repeats of a configuration share its colour."""
    fig, (by_step, by_time, lr_axis) = plt.subplots(1, 3, figsize=(16, 5.4), dpi=DPI)
    finite: list[float] = []
    configs = list(by_config(records).values())
    places = _coinciding([[s.loss for s in run.steps.get(rs[0].config.index, [])] for rs in configs])
    lr_places = _coinciding([[s.lr for s in run.steps.get(rs[0].config.index, [])] for rs in configs])
    styles, lr_styles = [_line_style(p) for p in places], [_line_style(p) for p in lr_places]
    for colour, place, lr_style, rs in zip(itertools.cycle(COLOURS), places, lr_styles, configs):
        for n, r in enumerate(rs):
            rows = run.steps.get(r.config.index, [])
            if not rows:
                continue
            label = label_of(r) if n == 0 else None
            _curves(by_step, by_time, rows, r.config.training.warmup_steps, place,
                    dict(color=colour, label=label, alpha=0.9 if len(rs) == 1 else 0.6))
            if n == 0:
                lr_axis.plot([s.step for s in rows], [s.lr for s in rows], color=colour, label=label,
                             linestyle=lr_style)
            finite += [x for s in rows for x in (s.loss, s.eval_loss) if x is not None and math.isfinite(x)]
    floor = next((r.entropy_floor_nats for r in records if r.entropy_floor_nats is not None), None)
    for ax in (by_step, by_time):
        if floor is not None:
            ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="entropy floor")
        _loss_limits(ax, finite, floor, [r.first_loss for r in records if r.first_loss is not None])
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    by_step.set_xlabel("step")
    striped = ", striped: lines that coincide" if any(style != "-" for style in styles) else ""
    lr_striped = " (striped: lines that coincide)" if any(style != "-" for style in lr_styles) else ""
    by_step.set_title(f"loss vs step (lines: train, dots: eval{striped})")
    by_time.set_xlabel("training time (s; warm-up steps at the median step's time, evaluation excluded)")
    by_time.set_title("loss vs time")
    lr_axis.set_xlabel("step")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_axis.set_title(f"LR applied at each step{lr_striped}")
    lr_axis.grid(alpha=0.3)
    handles, labels = by_time.get_legend_handles_labels()  # solid there: every colour shows
    columns = max(1, min(len(labels), 4))  # a folder without per-step rows has no line to label
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    fig.suptitle(title)
    rows = math.ceil(len(labels) / columns) if labels else 0
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))  # room below the panels for the legend
    return Figure(f"loss-{index:02d}", title, _png(fig))


def _coinciding(curves: list[list[float]]) -> list[tuple[int, int]]:
    """Each curve's place among those it coincides with on the plot (within 0.5% of the losses' range: the AdamW
    variants that take the same steps), and how many they are: (0, 1) for a curve that coincides with none."""
    finite = [x for curve in curves for x in curve if math.isfinite(x)]
    tolerance = 0.005 * (max(finite) - min(finite)) if finite else 0.0
    heads: dict[int, list[int]] = {}
    for i, curve in enumerate(curves):
        head = next((h for h in heads if _within(curves[h], curve, tolerance)), None) if curve else None
        heads.setdefault(i if head is None else head, []).append(i)
    places = [(0, 1)] * len(curves)
    for members in heads.values():
        for j, i in enumerate(members):
            places[i] = (j, len(members))
    return places


def _line_style(place: tuple[int, int]) -> Any:
    """Solid for the first of coinciding curves, the later ones dashed, each at its own offset over the first, so the
    line shows every colour in turn."""
    j, n = place
    period = 5 * n
    return "-" if j == 0 else (period - 5 * j, (5, period - 5))


def _marker_size(place: tuple[int, int]) -> float:
    """The first of coinciding curves' eval dots the largest, each later one smaller and drawn on top: the dots of
    curves that coincide nest as rings of every colour."""
    j, n = place
    return (9 if n == 1 else 12) * (1 - j / (n + 0.5))


def _within(a: list[float], b: list[float], tolerance: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))


def _curves(by_step: Axes, by_time: Axes, rows: list[StepLog], warmup_steps: int, place: tuple[int, int],
            line: dict[str, Any]) -> None:
    """One cell's training loss (and eval markers) against step, in its ``place``'s style among the curves it
    coincides with, and against time."""
    seconds = convergence.elapsed_s([s.step_time_s for s in rows], warmup_steps)
    losses = [s.loss for s in rows]
    by_step.plot([s.step for s in rows], losses, linewidth=1.2, linestyle=_line_style(place), **{**line, "label": None})
    by_time.plot(seconds, losses, linewidth=1.2, **line)
    evals = [(s.step, t, s.eval_loss) for s, t in zip(rows, seconds) if s.eval_loss is not None]
    if evals:
        steps, times, values = zip(*evals)
        marker = dict(color=line["color"], markeredgecolor="white", markeredgewidth=0.5)
        by_step.plot(steps, values, "o", markersize=_marker_size(place), zorder=3 + place[0], **marker)
        by_time.plot(times, values, "o", markersize=_marker_size((0, 1)), zorder=3, **marker)  # apart in time


def _loss_limits(ax: Axes, finite: list[float], floor: float | None, first: list[float]) -> None:
    """Keep the interesting range in view when a diverging cell shoots off to 1e4."""
    if not finite:
        return
    low = min(finite + ([floor] if floor is not None else []))
    high = max(finite)
    if first:
        high = min(high, 1.5 * max(first))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))


def lr_sweep_figure(run: Run) -> Figure | None:
    """Final loss against LR (log scale), one line per LoRA rank: where the minimum moves is the LR transfer."""
    grid = lr_rank_grid(run)
    if grid is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=DPI)
    for index, (colour, ((line, rank), points)) in enumerate(zip(itertools.cycle(COLOURS), grid.items())):
        present = {p.lr: p.loss for p in points if p.loss is not None}
        if not present:
            continue
        ax.plot(list(present), list(present.values()), "o-", color=colour, label=f"{line} r={rank}")
        best = lowest_loss_lr(present)
        # each later star smaller and on top: lines whose best LRs and losses coincide show every star, nested
        ax.plot(best, present[best], "*", color=colour, markersize=max(7, 18 - 3 * index), markeredgecolor="black",
                zorder=3 + index)
    ax.set_xscale("log")
    lrs = sorted({p.lr for points in grid.values() for p in points})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss (eval, mean over repeats)")
    ax.set_title("LR sweep per LoRA rank (star: best LR)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure("lr-rank", "LR sweep per LoRA rank", _png(fig))


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
