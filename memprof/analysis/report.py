"""`memprof report`: the tables and curves of a finished run, rebuilt from its records and per-step CSVs.

Every per-cell figure comes from the Records (the worker measured it). What is computed here is across cells:
means and 95% confidence intervals over repeats (``memprof.analysis.stats``), the target relative to the best cell of
the run (as AlgoPerf sets its targets from the best baseline), and the best LR per LoRA rank. Rendering lives in
``memprof.views.report`` (tables) and ``memprof.views.plots`` (figures).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprof.analysis import convergence, diagnose, stats
from memprof.config import catalogue
from memprof.config.spec import AXES, AXIS_BY_NAME, Axis, varying
from memprof.errors import UserError
from memprof.analysis.contention import contention_notes, marked
from memprof.results.record import Record, Status, StepLog
from memprof.results.env import read_env
from memprof.results.store import read_records, some_records
from memprof.suite.restore import with_suite_configs

# The relative target: within 5% of the lowest final (smoothed) training loss reached by any cell of the run.
RELATIVE_TARGET_MARGIN = 0.05


@dataclass(frozen=True)
class Run:
    """A result folder as the report reads it: records, each cell's per-step rows by cell index, and the
    environment it ran in (None without env.json)."""

    run_dir: Path
    records: list[Record]
    steps: dict[int, list[StepLog]]
    env: dict[str, Any] | None = None


@dataclass(frozen=True)
class TableData:
    """A table as strings, ready for any renderer; ``best`` marks (row, column) cells to emphasise, ``styles`` gives
    cells a terminal style (a status's colour)."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    best: set[tuple[int, int]] = field(default_factory=set)
    styles: dict[tuple[int, int], str] = field(default_factory=dict)


def load_run(run_dir: Path) -> Run:
    """Read a result folder.

    Raises:
        UserError: not a result folder, no records, records of another schema version, or an env.json that is not
            a JSON object.
    """
    records = with_suite_configs(some_records(read_records(run_dir), run_dir / "records.jsonl"), run_dir)
    steps = {r.config.index: read_steps(run_dir / "cells" / f"{r.config.index:04d}" / "steps.csv") for r in records}
    return Run(run_dir, records, steps, read_env(run_dir / "env.json"))


STEP_COLUMNS = ("step", "loss", "lr", "grad_norm", "step_time_s")  # and eval_loss, empty on most steps


def read_steps(path: Path) -> list[StepLog]:
    """A cell's steps.csv (none for a cell that never reached its first step).

    Raises:
        UserError: naming the file, where its header lacks a column of ``STEP_COLUMNS``, and the line and
            column of a value that is not a number.
    """
    if not path.exists():
        return []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [name for name in STEP_COLUMNS if name not in (reader.fieldnames or [])]
            if missing and reader.fieldnames:
                raise UserError(str(path), f"its header has no {', '.join(missing)} column (read: "
                                           f"{','.join(reader.fieldnames)[:60]})")
            return [_step_log(row, path, reader.line_num) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(str(path), f"cannot read: {err}") from None


def _step_log(row: dict[str, str], path: Path, line: int) -> StepLog:
    """A row of steps.csv, each figure checked."""

    def number(name: str, kind: type = float) -> Any:
        try:
            return kind(row.get(name))
        except (TypeError, ValueError):
            raise UserError(str(path), f"line {line}: {name}: {row.get(name)!r} is not a number") from None

    eval_loss = number("eval_loss") if row.get("eval_loss") else None
    return StepLog(number("step", int), number("loss"), number("lr"), number("grad_norm"), number("step_time_s"),
                   eval_loss)


def group_title(r: Record) -> str:
    """A plot's group: the model and shape; its lines are the optimizers, LRs, schedules and levers."""
    c = r.config
    return f"{c.model.name} / {c.adapter.name}  b{c.shape.batch_size}×s{c.shape.seq_len} {c.shape.precision}"


def label_of(r: Record) -> str:
    """The configuration as a legend names it: optimizer, LR and schedule (a schedule-free optimizer's own), levers."""
    c = r.config
    entry = catalogue.CATALOGUE.get(c.optimizer.name)  # None: a user's class, or a name a newer memprof dropped
    own = entry is not None and entry.schedule_free
    return f"{c.optimizer.label} lr={c.training.lr:g} {'schedule-free' if own else c.training.schedule}" + \
        (f" {c.levers_label}" if c.levers_label else "")


def by_config(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by what their repeats share (``CellConfig.repeat_key``)."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.config.repeat_key, []).append(r)
    return out


def one_per_config(records: Iterable[Record]) -> list[Record]:
    """A record per configuration for what does not vary between repeats (memory): its first ok repeat, else its
    first."""
    return [next((r for r in rs if r.status is Status.OK), rs[0]) for rs in by_config(records).values()]


def final_loss(r: Record) -> float | None:
    """The loss a cell ended at: its final eval loss, else its smoothed training loss; None when it failed."""
    if r.status is not Status.OK:
        return None
    return r.final_eval_loss if r.final_eval_loss is not None else r.final_loss_smoothed


def mean_ci(values: Sequence[float | None], fmt: str) -> str:
    """``mean ± half-width`` of the 95% t interval over the values there are (just the value when there is one)."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return "–"
    mean, half = stats.t_interval(present)
    return format(mean, fmt) if math.isnan(half) else f"{format(mean, fmt)} ± {format(half, fmt)}"


def varying_axes(records: Sequence[Record]) -> list[Axis]:
    """The axes with more than one value in the run (always the optimizer, so a row says what it is)."""
    return varying([r.config for r in records], always=("optimizer",))


def fixed_axes(records: Sequence[Record]) -> str:
    """What every cell shares, for a table's title: ``tiny-llama, lora, b16, s32, fp32, lr0.001, cosine``."""
    if not records:
        return ""
    shown = {axis.name for axis in varying_axes(records)}
    config = records[0].config
    return ", ".join(axis.token(axis.get(config)) for axis in AXES
                     if axis.name not in shown and not (axis.lever and axis.is_default(config)))


def _axis_cells(r: Record, axes: Sequence[Axis]) -> list[str]:
    return [axis.text(r.config) for axis in axes]


def repeats_table(run: Run) -> TableData:
    """One row per configuration: mean ± 95% CI over its repeats."""
    axes = varying_axes(run.records)
    rows = []
    for rs in by_config(run.records).values():
        ok = [r for r in rs if r.status is Status.OK]
        statuses = sorted({r.status.value for r in rs if r.status is not Status.OK})
        step_ms = [r.step_time_median_s * 1e3 if r.step_time_median_s is not None else None for r in ok]
        gaps = [r.floor_gap_nats for r in ok]
        rows.append(_axis_cells(rs[0], axes) + [
                     f"{len(ok)}/{len(rs)}" + (f" ({', '.join(statuses)})" if statuses else ""),
                     mean_ci([r.final_loss_smoothed for r in ok], ".3f"),
                     mean_ci([r.final_eval_loss for r in ok], ".3f"),
                     mean_ci(gaps, ".3f") if any(g is not None for g in gaps) else "–",
                     marked(mean_ci([r.tokens_per_s for r in ok], ",.0f"), ok), marked(mean_ci(step_ms, ".1f"), ok),
                     mean_ci([r.loss_auc for r in ok], ".3f"),
                     _verdicts(rs)])
    notes = ["mean ± half-width of the 95% Student t interval over the repeats (seeds); one repeat: the value alone",
             "loss, last 5: the training loss's mean over the last 5 steps; gap: final eval loss − entropy floor "
             "(nats)",
             "AUC: area under the training-loss curve per step (lower: learned sooner)"]
    notes += contention_notes(run.records)
    return TableData(f"Convergence and speed over repeats ({fixed_axes(run.records)})",
                     [axis.title for axis in axes] + ["ok", "loss, last 5", "eval loss", "gap", "tokens/s", "step ms",
                                                       "AUC", "verdict"], rows, notes)


def _verdicts(rs: Sequence[Record]) -> str:
    """The verdicts of a configuration's repeats; "none" when those that trained showed nothing wrong, "–" when none
    trained."""
    if not any(r.status in (Status.OK, Status.DIVERGED) for r in rs):
        return "–"
    return ", ".join(sorted({verdict_of(r) for r in rs if r.verdict})) or "none"


def _steps_to(target: float, steps: list[StepLog]) -> int | None:
    """Steps until an ok cell's smoothed loss reaches ``target``, over the steps whose loss is known (a Trainer's
    callback knows one every ``logging_steps``; a cell of memprof run knows every one)."""
    known = [s for s in steps if math.isfinite(s.loss)]
    n = convergence.steps_to_target([s.loss for s in known], target)
    return None if n is None else known[n - 1].step + 1


def target_table(run: Run) -> TableData | None:
    """Steps and seconds to a target loss: the suite's own (from the records) and one relative to the best cell
    (from the cells' per-step logs, left out where a folder kept none). None when there is neither."""
    ok = [r for r in run.records if r.status is Status.OK and r.final_loss_smoothed is not None]
    best = min((r.final_loss_smoothed for r in ok), default=None)
    relative = best * (1 + RELATIVE_TARGET_MARGIN) if best is not None else None
    suite_target = next((r.config.training.target_loss for r in run.records
                         if r.config.training.target_loss is not None), None)
    logged = has_step_logs(run)
    if suite_target is None and not logged:
        return None
    axes = varying_axes(run.records)
    rows = []
    for rs in by_config(run.records).values():
        row = _axis_cells(rs[0], axes)
        if suite_target is not None:
            row += [_reached([r.steps_to_target for r in rs], rs),
                    marked(mean_ci([r.seconds_to_target for r in rs], ".2f"), rs)]
        if logged:
            reached = [_steps_to(relative, run.steps.get(r.config.index, []))
                       if relative is not None and r.status is Status.OK else None for r in rs]
            seconds = [convergence.seconds_to_target([s.step_time_s for s in run.steps.get(r.config.index, [])], n,
                                                     r.config.training.warmup_steps) for r, n in zip(rs, reached)]
            row += [_reached(reached, rs), marked(mean_ci(seconds, ".2f"), rs)]
        rows.append(row)
    columns = [axis.title for axis in axes]
    notes = ["steps: until the smoothed training loss first reaches the target, mean over the repeats that did "
             "(k/n reached, of the n that trained); seconds: training time of those steps, warm-up steps at the "
             "median step's time, evaluation excluded"]
    if logged:
        notes.insert(0, f"relative target: {relative:.3f} = the best final smoothed training loss of the run "
                        f"({best:.3f}) + {RELATIVE_TARGET_MARGIN:.0%}" if relative is not None else "no cell finished")
    else:
        notes.append(NO_STEP_LOGS.format(run.run_dir))
    if suite_target is not None:
        columns += [f"steps to {suite_target:g}", f"s to {suite_target:g}"]
        notes.insert(0, f"suite target_loss: {suite_target:g}")
    columns += ["steps to relative", "s to relative"] if logged else []
    notes += contention_notes(run.records)
    return TableData(f"Time to target ({fixed_axes(run.records)})", columns, rows, notes)


NO_STEP_LOGS = "{}/cells holds no steps.csv: no loss curves, and no time to a target relative to the best cell"


def has_step_logs(run: Run) -> bool:
    """Whether any cell's per-step log is in the folder (a folder copied without cells/ has records alone)."""
    return any(run.steps.values())


def _reached(steps: Sequence[int | None], rs: Sequence[Record]) -> str:
    """The mean steps to a target over the repeats that reached it, of those that trained; how they ended where
    none trained (an unavailable or crashed cell never had the chance to reach it)."""
    trained = [s for s, r in zip(steps, rs) if r.status in (Status.OK, Status.DIVERGED)]
    if not trained:
        return "– (" + ", ".join(sorted({r.status.value for r in rs})) + ")"
    hit = [s for s in trained if s is not None]
    if not hit:
        return f"never (0/{len(trained)})"
    mean = sum(hit) / len(hit)
    return f"{mean:.0f}" + (f" ({len(hit)}/{len(trained)})" if len(hit) < len(trained) else "")


def verdict_of(r: Record) -> str:
    """The record's verdict in today's words (records written before the verdicts were named as the findings
    are say "stalled" or "unstable")."""
    codes = list(filter(None, r.diagnosis.split(",")))
    return convergence.verdict(codes, r.config.training.target_loss, r.steps_to_target)


def diagnosis_table(run: Run) -> TableData | None:
    """Each finding the curves showed: the cells that showed it, what it means and its remedy, the remedy taken
    from the run's own evidence where it has some (``remedy``)."""
    axes = [a for a in varying_axes(run.records) if a.name != "optimizer"] + [AXIS_BY_NAME["optimizer"]]
    best = best_lrs(run.records)
    cells: dict[tuple[str, str], list[str]] = {}
    for r in run.records:
        for code in filter(None, r.diagnosis.split(",")):
            cells.setdefault((code, remedy(code, r, best)), []).append(
                " ".join(axis.token(axis.get(r.config)) for axis in axes) + f" seed{r.config.training.seed}")
    if not cells:
        return None
    order = list(diagnose.FINDINGS)
    rows = [[code, diagnose.FINDINGS[code].meaning, text, "; ".join(names)]
            for (code, text), names in sorted(cells.items(), key=lambda item: order.index(item[0][0]))]
    return TableData("Diagnoses and remedies", ["finding", "meaning", "remedy", "cells"], rows,
                     ["cells: named by what varies in the run (" + ", ".join(axis.title for axis in axes) + ", seed)",
                      "remedy: from the run's other LRs where it has them (the same configuration at other LRs), "
                      "else the usual one"])


def best_lrs(records: Sequence[Record]) -> dict[str, float]:
    """For each configuration the run trained at several LRs (keyed by ``lr_group``): the LR whose repeats ended at
    the lowest mean loss (``final_loss``); an LR with a failed repeat is never the best."""
    losses: dict[str, dict[float, list[float | None]]] = {}
    for r in records:
        losses.setdefault(lr_group(r), {}).setdefault(r.config.training.lr, []).append(final_loss(r))
    out = {}
    for group, by_lr in losses.items():
        means = {lr: m for lr, values in by_lr.items() if (m := _mean(values)) is not None}
        if len(by_lr) > 1 and means:
            out[group] = lowest_loss_lr(means)
    return out


def lowest_loss_lr(losses: dict[float, float]) -> float:
    """The LR with the lowest loss; of equal losses, the lowest LR."""
    return min(losses, key=lambda lr: (losses[lr], lr))


def lr_group(r: Record) -> str:
    """The configuration apart from its LR and seed."""
    return r.config.repeat_key_without("lr")


def remedy(code: str, r: Record, best: dict[str, float]) -> str:
    """The finding's usual remedy, except for a curve that stalled (plateau, never dropping) where the run trained the
    same configuration at other LRs: the remedy follows them. An LR above the best one stalled for being too high
    (after falling fast, or with each update wrecking the model): lower it; one below it was too low: raise it; the
    best one is not held back by its LR alone."""
    usual = diagnose.FINDINGS[code].remedy
    lr_star = best.get(lr_group(r))
    if code not in ("plateau", "never_drops") or lr_star is None:
        return usual
    lr = r.config.training.lr
    if lr > lr_star:
        return f"the LR is above this configuration's best in the run ({lr_star:g}): lower it toward that"
    if lr < lr_star:
        return f"the LR is too low: this configuration did best in the run at {lr_star:g}: raise it toward that"
    if code == "never_drops":
        return "this is the configuration's best LR in the run: check the data and task set-up, or try LRs beyond " \
               "the run's grid"
    return "this is the configuration's best LR in the run: train longer, or try LRs beyond the run's grid"


@dataclass(frozen=True)
class LrPoint:
    """One LR on a line of an LR sweep: the mean final loss over its repeats (None where one failed or none ran)
    and the statuses of those that failed."""

    lr: float
    loss: float | None
    failed: tuple[str, ...] = ()


def lr_rank_grid(run: Run) -> dict[tuple[str, int], list[LrPoint]] | None:
    """One line per configuration apart from its LR (an ``lr_group``, so a line's best LR is ``best_lrs``'), keyed
    by (what else varies in the run: the optimizer, any axis but the LR and the adapter, the adapter's kind where
    kinds vary; LoRA rank), with a point at each LR of the run. None unless the run varies both rank and LR."""
    ranked = [r for r in run.records if r.config.adapter.rank is not None]
    lrs = sorted({r.config.training.lr for r in ranked})
    if len({r.config.adapter.rank for r in ranked}) < 2 or len(lrs) < 2:
        return None
    axes = [a for a in varying_axes(ranked) if a.name not in ("lr", "adapter")]
    lines: dict[str, list[Record]] = {}
    for r in ranked:
        lines.setdefault(lr_group(r), []).append(r)

    def keys(adapter: Callable[[Record], list[str]]) -> dict[str, tuple[str, int]]:
        return {group: (" ".join(_axis_cells(rs[0], axes) + adapter(rs[0])), rs[0].config.adapter.rank)
                for group, rs in lines.items()}

    kinds = len({r.config.adapter.kind for r in ranked}) > 1
    key = keys(lambda r: [r.config.adapter.kind] if kinds else [])
    if len(set(key.values())) < len(key):  # adapters alike in kind and rank (alpha, targets...): named in full
        key = keys(lambda r: [r.config.adapter.name])
    return {key[group]: [_point(lr, [r for r in lines[group] if r.config.training.lr == lr]) for lr in lrs]
            for group in sorted(lines, key=key.__getitem__)}


def _point(lr: float, repeats: Sequence[Record]) -> LrPoint:
    return LrPoint(lr, _mean([final_loss(r) for r in repeats]),
                   tuple(sorted({r.status.value for r in repeats if r.status is not Status.OK})))


def lr_rank_table(run: Run) -> TableData | None:
    """Loss for each LoRA rank × LR, the best LR per rank, and how the best LR scales with the rank."""
    grid = lr_rank_grid(run)
    if grid is None:
        return None
    lrs = [point.lr for point in next(iter(grid.values()))]
    rows, best_cells, best_lr = [], set(), {}
    for (line, rank), points in grid.items():
        row = [line, str(rank)]
        row += [f"{p.loss:.3f}" if p.loss is not None else ", ".join(p.failed) or "–" for p in points]
        present = {p.lr: p.loss for p in points if p.loss is not None}
        if present:
            lr_star = lowest_loss_lr(present)
            best_lr[(line, rank)] = lr_star
            best_cells.add((len(rows), 2 + lrs.index(lr_star)))
            base = next(best_lr[k] for k in best_lr if k[0] == line)
            row += [f"{lr_star:g}", f"{lr_star / base:.2g}×"]
        else:
            row += ["–", "–"]
        rows.append(row)
    notes = ["cells: final eval loss (else smoothed training loss), mean over repeats; the lowest per rank (marked) "
             "is its best LR, found on this grid only", "best LR vs r_min: over the best LR of the smallest rank"]
    for line in sorted({name for name, _ in best_lr}):
        points = [(rank, lr) for (name, rank), lr in best_lr.items() if name == line]
        slope = _log_slope(points)
        if slope is not None:
            notes.append(f"{line}: best LR ∝ r^{slope:.2f} (least squares on log-log over {len(points)} ranks; "
                         "0: the LR transfers across ranks, 1: it must scale with r)")
    bare = {name for name, _ in grid} <= {r.config.optimizer.label for r in run.records}
    columns = ["optimizer" if bare else "configuration", "rank", *(f"lr {lr:g}" for lr in lrs), "best LR",
               "best LR vs r_min"]
    return TableData("Best LR per LoRA rank", columns, rows, notes, best_cells)


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean over repeats, None if any repeat failed (a config that diverged once is not a best LR)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def _log_slope(points: Sequence[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def tables(run: Run) -> list[TableData]:
    builders: list[Callable[[Run], TableData | None]] = [repeats_table, target_table, lr_rank_table,
                                                         diagnosis_table]
    return [t for t in (build(run) for build in builders) if t is not None]
