"""Regression tracking: two result sets matched cell by cell and judged by one written rule per metric.

The rules live in ``memprof.results.metrics`` and nowhere else. Too few repeats to ever reach a timing rule's
significance level gives "unchanged (not enough repeats)". A cell whose status differs between the sides (OOM,
crash...) is ``failed``, and so is one that crashed or timed out on both (the harness failing is never an answer);
an OOM or a divergence on both sides is ``unchanged``. A cell on one side only is ``new`` or ``missing``. Rules are
overridden by a suite's ``[compare]`` table, then by ``--rule metric:spec``.
"""

from __future__ import annotations

import enum
import math
import statistics
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memprof.analysis.contention import worst
from memprof.analysis import stats
from memprof.config.spec import LIMITS
from memprof.errors import UserError
from memprof.results.env import machine_label, read_env
from memprof.results.metrics import METRICS, Metric, Rule
from memprof.results.record import HARNESS_FAILURES, Record, Status
from memprof.results.store import read_csv_records, read_records, some_records, torn_last_line
from memprof.suite.restore import with_suite_configs


class Verdict(str, enum.Enum):
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    REGRESSED = "regressed"
    NEW = "new"
    MISSING = "missing"
    FAILED = "failed"
    NOT_COMPARABLE = "not comparable"


FAILING = (Verdict.REGRESSED, Verdict.FAILED)
DIFFERENT_MACHINES = "different machines"  # the note of a machine-bound metric that was not compared


# --- result sets -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResultSet:
    """One side of a comparison: the records, and the folder's environment and ``[compare]`` rules."""

    path: Path
    records: tuple[Record, ...]
    env: dict[str, Any] | None
    suite_rules: tuple[tuple[str, str], ...]
    suite_path: Path
    warning: str = ""  # a line to show with the comparison: records.jsonl's torn last line, left out


def load(path: Path) -> ResultSet:
    """A result folder, or its ``records.jsonl`` or ``cells.csv``.

    Raises:
        UserError: a missing path, a file of another kind or schema, or no records.
    """
    if not path.exists():
        raise UserError(str(path), "no such result folder or file")
    if path.is_dir():
        folder = path
        source = path / "records.jsonl" if (path / "records.jsonl").exists() or not (path / "cells.csv").exists() \
            else path / "cells.csv"
    elif path.name == "records.jsonl" or path.suffix == ".csv":
        folder, source = path.parent, path
    else:
        raise UserError(str(path), "expected a result folder, its records.jsonl or a cells.csv")
    from_csv = source.suffix == ".csv"
    records = some_records(read_csv_records(source) if from_csv else read_records(folder), source)
    suite_path = folder / "suite.toml"
    return ResultSet(path, tuple(with_suite_configs(records, folder)), read_env(folder / "env.json"),
                     _suite_rules(suite_path), suite_path, "" if from_csv else torn_last_line(folder))


def _suite_rules(path: Path) -> tuple[tuple[str, str], ...]:
    if not path.exists():
        return ()
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("compare", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(str(path), f"cannot read: {err}") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UserError(str(path), "compare: must be a table of metric = \"rule\" strings")
    return tuple(table.items())


# --- comparison --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricDelta:
    """One metric of one cell: the two sides' representative values (medians, or means over common seeds)."""

    metric: str
    rule: Rule
    baseline: float | None
    current: float | None
    verdict: Verdict
    note: str = ""

    @property
    def change(self) -> float | None:
        """current - baseline for an absolute rule, else the relative change (0.05 = 5% more)."""
        if self.baseline is None or self.current is None:
            return None
        if self.rule.kind == "absolute":
            return self.current - self.baseline
        if self.baseline == 0:
            return 0.0 if self.current == 0 else math.inf
        return self.current / self.baseline - 1


@dataclass(frozen=True)
class CellComparison:
    key: str
    verdict: Verdict
    baseline_status: Status | None
    current_status: Status | None
    repeats: tuple[int, int]
    metrics: tuple[MetricDelta, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    baseline: ResultSet
    current: ResultSet
    rules: dict[str, Rule]
    machines: tuple[str, str]
    peaks_compared: bool  # False when the machines differ (and --allow-different-machines was not given)
    environment: tuple[str, ...]  # differences between the two environments, as sentences
    cells: tuple[CellComparison, ...]

    @property
    def exit_code(self) -> int:
        return 1 if any(c.verdict in FAILING for c in self.cells) else 0

    def counts(self) -> dict[str, int]:
        out = {v.value: 0 for v in Verdict}
        for c in self.cells:
            out[c.verdict.value] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "baseline": str(self.baseline.path), "current": str(self.current.path),
            "machines": list(self.machines), "peaks_compared": self.peaks_compared,
            "environment": list(self.environment), "rules": {k: str(v) for k, v in self.rules.items()},
            "warnings": [side.warning for side in (self.baseline, self.current) if side.warning],
            "counts": self.counts(), "exit_code": self.exit_code,
            "cells": [{
                "key": c.key, "verdict": c.verdict.value, "note": c.note,
                "baseline_status": c.baseline_status.value if c.baseline_status else None,
                "current_status": c.current_status.value if c.current_status else None,
                "repeats": list(c.repeats),
                "metrics": [{"metric": m.metric, "rule": str(m.rule), "baseline": m.baseline, "current": m.current,
                             "change": None if m.change is None or math.isinf(m.change) else m.change,
                             "verdict": m.verdict.value, "note": m.note} for m in c.metrics],
            } for c in self.cells],
        }


def compare(baseline: ResultSet, current: ResultSet, rules: dict[str, Rule],
            allow_different_machines: bool = False) -> Comparison:
    """Match the two sides' cells by configuration and judge every metric by its rule.

    Raises:
        UserError: nothing can be compared: the two sides share no cell (two different suites), or every cell they
            share ran another configuration on each side.
    """
    machines = (_label(baseline.env), _label(current.env))
    same_machine = baseline.env is not None and current.env is not None and machines[0] == machines[1]
    peaks_compared = same_machine or allow_different_machines
    base, cur = _by_config(baseline.records), _by_config(current.records)
    share_some(baseline, set(cur), {r.config.suite for r in current.records}, current.path)
    cells = []
    for key in list(base) + [k for k in cur if k not in base]:
        if key not in cur:
            cells.append(CellComparison(key, Verdict.MISSING, _status(base[key]), None, (len(base[key]), 0),
                                        note="not in the current run"))
        elif key not in base:
            cells.append(CellComparison(key, Verdict.NEW, None, _status(cur[key]), (0, len(cur[key])),
                                        note="not in the baseline"))
        else:
            cells.append(_compare_cell(key, base[key], cur[key], rules, peaks_compared))
    shared = [c for c in cells if c.verdict not in (Verdict.NEW, Verdict.MISSING)]
    if all(c.verdict is Verdict.NOT_COMPARABLE for c in shared):
        raise UserError(f"{baseline.path} vs {current.path}", f"no cell ran the same configuration on both sides "
                        f"({len(shared)} shared keys; {shared[0].key}: {shared[0].note}): nothing to compare")
    return Comparison(baseline, current, rules, machines, peaks_compared,
                      tuple(environment_differences(baseline.env, current.env)), tuple(cells))


def share_some(baseline: ResultSet, keys: set[str], suites: set[str], current: Path) -> None:
    """Refuse a comparison of ``baseline`` to ``current`` (a result set, or a suite about to run) when the two share
    no configuration (``repeat_key``, ``keys`` on the current side, of ``suites``): nothing would be compared.

    Raises:
        UserError: naming both sides and their suites.
    """
    if not {r.config.repeat_key for r in baseline.records} & keys:
        names = sorted({r.config.suite for r in baseline.records} | suites)
        raise UserError(f"{baseline.path} vs {current}", "the two result sets share no configuration (suites "
                        f"{', '.join(names)}): nothing to compare")


def environment_differences(base: dict[str, Any] | None, cur: dict[str, Any] | None) -> list[str]:
    """What differs between two env.json files, one short sentence each."""
    out = [f"{side} has no env.json: its machine is unknown" for side, env in (("baseline", base), ("current", cur))
           if env is None]
    if base is None or cur is None:
        return out
    if _label(base) != _label(cur):
        out.append(f"machine: {_label(base)} → {_label(cur)}")
    drivers = [{g.get("driver") for g in env.get("gpus") or []} for env in (base, cur)]
    if drivers[0] and drivers[1] and drivers[0] != drivers[1]:
        out.append(f"GPU driver: {', '.join(sorted(map(str, drivers[0])))} → {', '.join(sorted(map(str, drivers[1])))}")
    if base.get("python") != cur.get("python"):
        out.append(f"python: {base.get('python')} → {cur.get('python')}")
    settings = base.get("memory_env") or {}, cur.get("memory_env") or {}
    for name in sorted(set(settings[0]) | set(settings[1])):
        if settings[0].get(name) != settings[1].get(name):
            out.append(f"{name}: {settings[0].get(name) or 'unset'} → {settings[1].get(name) or 'unset'}")
    versions = base.get("versions") or {}, cur.get("versions") or {}
    for name in sorted(set(versions[0]) | set(versions[1])):
        if name != "memprof" and versions[0].get(name) != versions[1].get(name):
            out.append(f"{name}: {versions[0].get(name) or 'not installed'} → "
                       f"{versions[1].get(name) or 'not installed'}")
    return out


def _label(env: dict[str, Any] | None) -> str:
    return machine_label(env) if env is not None else "unknown"


def _by_config(records: Iterable[Record]) -> dict[str, list[Record]]:
    """Records grouped by configuration, one per repeat (the last one wins)."""
    groups: dict[str, dict[int, Record]] = {}
    for r in records:
        groups.setdefault(r.config.repeat_key, {})[r.config.training.repeat] = r
    return {key: [by_repeat[i] for i in sorted(by_repeat)] for key, by_repeat in groups.items()}


def _status(records: Sequence[Record]) -> Status:
    """A cell's status over its repeats: the first that did not end ``ok``, else ``ok``."""
    return next((r.status for r in records if r.status is not Status.OK), Status.OK)


def _compare_cell(key: str, base: list[Record], cur: list[Record], rules: dict[str, Rule],
                  peaks_compared: bool) -> CellComparison:
    b_status, c_status = _status(base), _status(cur)
    repeats = (len(base), len(cur))
    if b_status is not Status.OK or c_status is not Status.OK:
        error = next((r.error for r in cur if r.status is c_status and r.error not in ("", c_status.value)), "")
        if b_status is c_status:  # an answer given again (an OOM, a divergence), or the harness failing again
            verdict = Verdict.FAILED if c_status in HARNESS_FAILURES else Verdict.UNCHANGED
            note = f"{c_status.value} on both sides" + (f": {error}" if error and verdict is Verdict.FAILED else "")
            return CellComparison(key, verdict, b_status, c_status, repeats, note=note)
        verdict = Verdict.IMPROVED if c_status is Status.OK else Verdict.FAILED
        note = f"{b_status.value} → {c_status.value}" + (f": {error}" if error else "")
        return CellComparison(key, verdict, b_status, c_status, repeats, note=note)
    changed = configuration_change(base, cur)
    if changed:
        return CellComparison(key, Verdict.NOT_COMPARABLE, b_status, c_status, repeats,
                              note=f"configuration differs: {changed}")
    deltas = []
    for metric, rule in rules.items():
        delta = _compare_metric(metric, rule, base, cur, peaks_compared)
        if delta is not None:
            deltas.append(delta)
    verdicts = {d.verdict for d in deltas}
    verdict = Verdict.REGRESSED if Verdict.REGRESSED in verdicts else \
        Verdict.IMPROVED if Verdict.IMPROVED in verdicts else Verdict.UNCHANGED
    return CellComparison(key, verdict, b_status, c_status, repeats, tuple(deltas))


def configuration_change(base: Sequence[Record], cur: Sequence[Record]) -> str:
    """What differs between the configurations of a cell's two sides ('' when nothing does), as
    ``path: baseline → current`` for the first fields that differ. Schema-1 records hashed their configuration
    another way and kept only part of it, so they are not judged."""
    b = next((r.config for r in base if r.schema_version >= 2), None)
    c = next((r.config for r in cur if r.schema_version >= 2), None)
    if b is None or c is None or b.config_hash == c.config_hash:
        return ""
    flat_b, flat_c = _flatten(b.model_dump(mode="json")), _flatten(c.model_dump(mode="json"))
    ignored = ("suite", "index", "training.seed", "training.repeat", *(f"budget.{name}" for name in LIMITS))
    paths = [p for p in sorted(set(flat_b) | set(flat_c)) if p not in ignored and flat_b.get(p) != flat_c.get(p)]
    shown = "; ".join(f"{p}: {flat_b.get(p, '–')} → {flat_c.get(p, '–')}" for p in paths[:2])
    return shown + (f" (+{len(paths) - 2} more)" if len(paths) > 2 else "")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _values(records: Sequence[Record], metric: str) -> dict[int, float]:
    """The metric's finite values by seed."""
    out = {}
    for r in records:
        value = getattr(r, metric, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[r.config.training.seed] = float(value)
    return out


def _compare_metric(metric: str, rule: Rule, base: list[Record], cur: list[Record],
                    peaks_compared: bool) -> MetricDelta | None:
    """One metric's verdict, or None when the rule is ``off`` or neither side measured it (CUDA peaks on a CPU)."""
    b, c = _values(base, metric), _values(cur, metric)
    if rule.kind == "off" or (not b and not c):
        return None
    info = METRICS.get(metric) or Metric(rule, metric.endswith("_per_s"), rule.kind in ("relative", "noisy"))
    b_mid = statistics.median(b.values()) if b else None
    c_mid = statistics.median(c.values()) if c else None

    def result(verdict: Verdict, note: str = "", b_value: float | None = b_mid,
               c_value: float | None = c_mid) -> MetricDelta:
        return MetricDelta(metric, rule, b_value, c_value, verdict, note)

    if not b or not c:
        return result(Verdict.NOT_COMPARABLE, f"not measured in the {'baseline' if not b else 'current'} run")
    if info.machine_bound and not peaks_compared:
        return result(Verdict.NOT_COMPARABLE, DIFFERENT_MACHINES)
    sign = -1.0 if info.higher_is_better else 1.0  # > 0: worse

    if rule.kind == "exact":
        if sorted(set(b.values())) == sorted(set(c.values())):
            return result(Verdict.UNCHANGED)
        return result(Verdict.REGRESSED)
    if rule.kind == "relative":
        change = result(Verdict.UNCHANGED).change or 0.0
        if sign * change > rule.limit:
            return result(Verdict.REGRESSED)
        if sign * change < -rule.limit:
            return result(Verdict.IMPROVED)
        return result(Verdict.UNCHANGED)
    if rule.kind == "absolute":
        seeds = sorted(set(b) & set(c))
        if not seeds:
            return result(Verdict.NOT_COMPARABLE, "no seed on both sides")
        b_mean, c_mean = (statistics.fmean(side[s] for s in seeds) for side in (b, c))
        diff = sign * (c_mean - b_mean)
        verdict = Verdict.REGRESSED if diff > rule.limit else Verdict.IMPROVED if diff < -rule.limit \
            else Verdict.UNCHANGED
        return result(verdict, "" if len(seeds) == len(b) == len(c) else f"over {len(seeds)} common seeds",
                      b_mean, c_mean)
    # noisy: a factor and a significant difference, never a ratio of single samples
    if stats.smallest_p(len(b), len(c)) >= rule.alpha:
        return result(Verdict.UNCHANGED, f"not enough repeats ({len(b)} vs {len(c)}; "
                      f"{_repeats_needed(rule.alpha)} per side can reach p<{rule.alpha:g})")
    if b_mid <= 0 or c_mid <= 0:
        return result(Verdict.NOT_COMPARABLE, "a median is not positive")
    busy = worst((*base, *cur))
    if busy is not None:
        return result(Verdict.NOT_COMPARABLE, f"timed under CPU contention (a task waited for a CPU during up to "
                                              f"{busy:.0%} of a run's training time)")
    p = stats.mann_whitney_p(list(b.values()), list(c.values()))
    ratio = c_mid / b_mid
    worse = ratio ** sign > rule.limit
    better = ratio ** -sign > rule.limit
    if p < rule.alpha and (worse or better):
        return result(Verdict.REGRESSED if worse else Verdict.IMPROVED, f"p={p:.2g}")
    return result(Verdict.UNCHANGED, f"p={p:.2g}")


def _repeats_needed(alpha: float) -> int:
    """The fewest repeats per side with which a difference can be significant at ``alpha``."""
    n = 1
    while stats.smallest_p(n, n) >= alpha:
        n += 1
    return n
