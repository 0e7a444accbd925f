"""Views of a Comparison: the terminal table and the PR-comment markdown. They format, they never judge."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from memprof.analysis.compare import DIFFERENT_MACHINES, METRICS, Comparison, MetricDelta, ResultSet, Verdict
from memprof.results.env import machine_label
from memprof.views.tables import human_bytes, markdown_cell

_STYLE = {Verdict.REGRESSED: "bold red", Verdict.FAILED: "bold red", Verdict.IMPROVED: "green",
          Verdict.UNCHANGED: "dim", Verdict.NEW: "cyan", Verdict.MISSING: "yellow",
          Verdict.NOT_COMPARABLE: "yellow"}
_COLUMNS = ("cell", "verdict", "metric", "baseline", "current", "change", "note")
_NOTE_WIDTH = 30  # a note narrower than this reads as a column of single words: the rows go as lines instead


def header_lines(c: Comparison) -> list[str]:
    """What was compared with what, and every way the two environments differ (rich markup)."""
    lines = [f"[bold]baseline[/] {escape(_describe(c.baseline))}", f"[bold]current[/]  {escape(_describe(c.current))}"]
    if c.environment:
        lines.append("[yellow]environment differs:[/] " + escape("; ".join(c.environment)))
    if not c.peaks_compared:
        lines.append(f"[yellow]memory peaks and timings not compared:[/] different machines "
                     f"({escape(c.machines[0])} vs {escape(c.machines[1])}); --allow-different-machines compares "
                     "them anyway")
    elif c.machines[0] != c.machines[1]:
        lines.append("[yellow]memory peaks and timings compared across different machines[/]")
    changed = [f"{name}:{rule}" for name, rule in c.rules.items()
               if name not in METRICS or METRICS[name].rule != rule]
    if changed:
        lines.append("rules changed from the defaults: " + escape(", ".join(changed)))
    return lines


def summary_line(c: Comparison) -> str:
    counts = ", ".join(f"{n} {verdict}" for verdict, n in c.counts().items() if n)
    result = "[bold red]regression[/]" if c.exit_code else "[green]no regression[/]"
    return f"{len(c.cells)} cells: {counts} → {result}"


def comparison_table(c: Comparison, width: int, show_all: bool = False) -> Table | Group:
    """One row per metric that moved (every metric with ``show_all``), one row for a cell where none did; where the
    table's figures do not fit in ``width`` columns, the same rows as lines (a cell, then its metrics), so no name
    or figure is ever broken."""
    pattern, short = _short_keys([cell.key for cell in c.cells])
    title = "memprof compare" + (f": cells {pattern}" if pattern else "")
    rows = _rows(c, show_all)
    caption = _repeated_notes(c)
    figures = [[short[r[0]], *r[1:6]] for cell_rows in rows for r in cell_rows]
    need = sum(max(len(name), *(len(f[j]) for f in figures)) + 3 for j, name in enumerate(_COLUMNS[:6]))
    note_room = _note_room([r[6] for cell_rows in rows for r in cell_rows])
    if need + note_room + 4 > width:
        return _lines(title, rows, short, caption)
    table = Table(title=escape(title), title_justify="left", caption_justify="left", header_style="bold")
    for name in _COLUMNS:
        table.add_column(name, justify="right" if name in ("baseline", "current", "change") else "left",
                         no_wrap=name != "note", min_width=note_room if name == "note" else None)
    for cell_rows in rows:
        for i, (key, verdict, metric, base, cur, change, note, style) in enumerate(cell_rows):
            table.add_row(escape(short[key]) if i == 0 else "", f"[{style}]{verdict}[/]" if i == 0 else "", metric,
                          base, cur, change, f"[dim]{escape(note)}[/]")
        if len(cell_rows) > 1:
            table.add_section()
    if caption:
        table.caption = escape(caption)
    return table


def _note_room(notes: list[str]) -> int:
    """Columns the note needs to read as prose: its longest line, or at most ``_NOTE_WIDTH`` if that breaks no
    word; never fewer than the longest word, so wrapping happens only between words."""
    longest_word = max((len(word) for note in notes for word in note.split()), default=0)
    return max(min(max(map(len, notes), default=0), _NOTE_WIDTH), longest_word, len("note"))


def _lines(title: str, rows: list[list[tuple[str, ...]]], short: dict[str, str], caption: str) -> Group:
    """The table's rows for a narrow terminal: each cell's verdict on a line, each metric that moved under it."""
    parts = [Text(title, style="bold")]
    for cell_rows in rows:
        key, verdict, metric, *_, note, style = cell_rows[0]
        if not metric:  # nothing moved: the cell's note says why
            said = f": {note}" if note else ""
            parts.append(Text.assemble((short[key], "bold"), " ", (verdict, style), (said, "dim")))
            continue
        parts.append(Text.assemble((short[key], "bold"), " ", (verdict, style)))
        parts.extend(Text.assemble(f"  {metric}: {base} → {cur}, {change}: ", (note, "dim"))
                     for _, _, metric, base, cur, change, note, _ in cell_rows)
    if caption:
        parts.append(Text(caption, style="dim"))
    return Group(*parts)


def markdown(c: Comparison) -> str:
    """A summary for a pull-request comment: the verdicts, the environment, and every metric that moved."""
    counts = ", ".join(f"{n} {verdict}" for verdict, n in c.counts().items() if n)
    lines = [f"### memprof compare: {'regression' if c.exit_code else 'no regression'} ({counts})", "",
             f"- baseline: `{c.baseline.path}` ({_describe(c.baseline, path=False)})",
             f"- current: `{c.current.path}` ({_describe(c.current, path=False)})"]
    lines += [f"- environment differs: {d}" for d in c.environment]
    if not c.peaks_compared:
        lines.append(f"- memory peaks and timings not compared: different machines ({c.machines[0]} vs "
                     f"{c.machines[1]})")
    lines.append("")
    moved = [rows for rows in _rows(c, show_all=False) if rows[0][1] != Verdict.UNCHANGED.value]
    pattern, short = _short_keys([cell.key for cell in c.cells])
    if moved:
        if pattern:
            lines += [f"cells `{pattern}`:", ""]
        lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        for cell_rows in moved:
            for i, row in enumerate(cell_rows):
                key, verdict = (f"`{short[row[0]]}`", f"**{row[1]}**") if i == 0 else ("", "")
                lines.append("| " + " | ".join([key, verdict, *(markdown_cell(x) for x in row[2:7])]) + " |")
    else:
        lines.append("Every cell is unchanged.")
    note = _repeated_notes(c)
    if note:
        lines += ["", note]
    lines += ["", "<details><summary>rules</summary>", "",
              ", ".join(f"`{name}:{rule}`" for name, rule in c.rules.items()), "", "</details>", ""]
    return "\n".join(lines)


def _short_keys(keys: list[str]) -> tuple[str, dict[str, str]]:
    """Keys cut to the parts not every cell shares, and the pattern of those they all do (``*`` for the rest). A
    part is one token of a key (``s1024``, ``gc``, ``eager``); a lever left at its default adds none, so the keys
    of a levers suite differ in length. Whole keys where one would be cut to nothing."""
    parts = [key.split("/") for key in keys]
    common = set.intersection(*map(set, parts)) if parts else set()
    short = {key: "/".join(part for part in p if part not in common) for key, p in zip(keys, parts)}
    if len(keys) < 2 or not all(short.values()) or len(set(short.values())) < len(keys):
        return "", {key: key for key in keys}
    pattern = "/".join(part if part in common else "*" for part in max(parts, key=len))
    return re.sub(r"\*(/\*)+", "*", pattern), short


def _describe(side: ResultSet, path: bool = True) -> str:
    env: dict[str, Any] = side.env or {}
    rev = env.get("git_revision")
    parts = [machine_label(env) if side.env is not None else "no env.json"]
    if rev:
        parts.append(f"git {rev[:8]}" + ("+dirty" if env.get("git_dirty") else ""))
    parts.append(f"{len(side.records)} records")
    text = ", ".join(parts)
    return f"{side.path} ({text})" if path else text


def _rows(c: Comparison, show_all: bool) -> list[list[tuple[str, ...]]]:
    """Plain-text rows per cell: (key, verdict, metric, baseline, current, change, note, style).

    Metrics left out across machines are said once in the header, not in every cell.
    """
    out = []
    for cell in c.cells:
        verdict = cell.verdict.value
        shown = [m for m in cell.metrics if show_all or (m.verdict is not Verdict.UNCHANGED
                                                           and m.note != DIFFERENT_MACHINES)]
        rows = [(cell.key, verdict, m.metric, *_values(m), _change(m), _metric_note(m), _STYLE[cell.verdict])
                for m in shown]
        if not rows:
            within = sum(m.verdict is Verdict.UNCHANGED for m in cell.metrics)
            note = cell.note or (f"{within} metrics within their rules" if cell.metrics else "")
            if cell.repeats[0] != cell.repeats[1] and cell.verdict not in (Verdict.NEW, Verdict.MISSING):
                note += f" ({cell.repeats[0]} vs {cell.repeats[1]} repeats)"
            rows = [(cell.key, verdict, "", "", "", "", note.strip(), _STYLE[cell.verdict])]
        elif cell.note:
            rows[0] = rows[0][:6] + (f"{cell.note}; {rows[0][6]}".strip("; "),) + rows[0][7:]
        out.append(rows)
    return out


def _repeated_notes(c: Comparison) -> str:
    """Notes that hold for many cells (``not enough repeats``), said once instead of in every row."""
    metrics: dict[str, set[str]] = {}
    cells: Counter[str] = Counter()
    for cell in c.cells:
        for note in {m.note for m in cell.metrics if m.note.startswith("not enough repeats")}:
            cells[note] += 1
            metrics.setdefault(note, set()).update(m.metric for m in cell.metrics if m.note == note)
    return "\n".join(f"not judged in {n} cells: {', '.join(sorted(metrics[note]))}: {note}"
                     for note, n in cells.items())


def _metric_note(m: MetricDelta) -> str:
    return f"{m.verdict.value} ({m.rule})" + (f": {m.note}" if m.note else "")


def _value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    if metric.endswith("_bytes"):
        return human_bytes(value)
    if metric.endswith("_per_s"):
        return f"{value:,.0f}"
    if metric.endswith("_s"):
        return f"{value * 1e3:.1f} ms"
    return f"{value:.4g}"


def _values(m: MetricDelta) -> tuple[str, str]:
    """Baseline and current as they read best; bytes to the byte where rounding would show them equal."""
    base, cur = _value(m.metric, m.baseline), _value(m.metric, m.current)
    if base == cur and m.baseline != m.current and m.metric.endswith("_bytes"):
        return f"{m.baseline:,.0f} B", f"{m.current:,.0f} B"
    return base, cur


def _change(m: MetricDelta) -> str:
    change = m.change
    if change is None:
        return "–"
    if m.rule.kind == "absolute":
        return f"{change:+.4f}"
    if math.isinf(change):
        return "new non-zero"
    if m.metric.endswith("_bytes") and m.baseline is not None and m.current is not None:
        diff = m.current - m.baseline
        return f"{'+' if diff >= 0 else '-'}{human_bytes(abs(diff))} ({change:+.1%})"
    return f"{change:+.1%}"
