"""Terminal views built from records: they format, they never compute measurements."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from memprof.analysis.memory import GROUP_AXES, group_key, state_vs_baseline
from memprof.analysis.slopes import Slope, activation_slopes
from memprof.config.spec import CellConfig, varying
from memprof.measure.attribution import PARTS
from memprof.analysis.contention import contention_notes, marked
from memprof.analysis.report import TableData
from memprof.results.record import Record, Status

if TYPE_CHECKING:
    from memprof.measure.crosscheck import CategoryCheck

STATUS_STYLE = {Status.OK: "green", Status.OOM: "bold red", Status.DIVERGED: "magenta", Status.CRASHED: "red",
                 Status.TIMEOUT: "yellow", Status.INTERRUPTED: "yellow", Status.UNAVAILABLE: "dim"}


def scale_unit(most: float) -> tuple[str, int]:
    """The unit of a set of sizes whose largest is ``most`` bytes: GiB from 1 GiB up, else MiB (the CPU's peaks)."""
    return ("GiB", 1 << 30) if most >= 1 << 30 else ("MiB", 1 << 20)


def human_bytes(n: int | float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"


def peak_text(r: Record, nbytes: int | None) -> str:
    """One of ``r``'s peaks (its own, NVML's): marked ``≥`` where the cell stopped early and reached only that."""
    text = human_bytes(nbytes)
    return f"≥ {text}" if nbytes is not None and r.peak_is_lower_bound else text


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def sharded_note(records: Iterable[Record]) -> list[str]:
    """How a sharded cell's figures are taken, where the records hold one."""
    if any(r.config.levers.parallel.world_size > 1 for r in records):
        return ["sharded cells (ddp/zero1/fsdp2×n): each figure is the max over ranks, never a sum"]
    return []


def lower_bound_note(records: Iterable[Record]) -> list[str]:
    """What '≥' means, where a record's peak is a lower bound (``peak_text`` marks it so)."""
    if any(r.peak_is_lower_bound and r.peak_bytes is not None for r in records):
        return ["≥: the cell stopped early (OOM, crash, timeout, interrupt): the most it reached until then"]
    return []


def peak_note(cuda: bool) -> str:
    """What a record's ``peak`` is, for a footnote: the allocator's on CUDA, RSS growth on the CPU."""
    return "peak: the torch allocator's peak" if cuda else "peak: growth of the worker's resident memory (RSS) " \
        "over its baseline on this CPU; it includes freed pages the C allocator keeps, so it differs by tens of MB " \
        "between repeats"


def results_table(records: Iterable[Record], width: int, title: str = "memprof results") -> Group:
    """One table per model/adapter/shape group, comparing its cells (against AdamW's state in the same group), for
    a terminal ``width`` columns wide. A row is named by every axis that varies inside its group (always the
    optimizer), and names are never cut: the figures give way first, the rightmost first (``rich_tables``)."""
    records = list(records)
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(group_key(r.config), []).append(r)
    ratios = state_vs_baseline(records)
    show_paged = any(r.optimizer_state_paged_bytes for r in records)
    tables = []
    for rows in groups.values():
        head = rows[0].config
        trainable = next((r.trainable_params for r in rows if r.trainable_params), None)
        axes = [a for a in varying([r.config for r in rows], always=("optimizer",)) if a.name not in GROUP_AXES]
        compared = any(r.config.index in ratios for r in rows)
        columns = [a.title for a in axes] + ["status", "state"] + (["vs AdamW"] if compared else []) + \
            (["paged"] if show_paged else []) + ["peak", "tokens/s", "loss", "step p50"]
        tables.append(TableData(
            f"{head.model.name} / {head.adapter.name}  b{head.shape.batch_size}×s{head.shape.seq_len} "
            f"{head.shape.precision}, {_num(trainable, ',')} trainable params", columns,
            [[a.text(r.config) for a in axes] + _row(r, ratios.get(r.config.index), compared, show_paged)
             for r in rows],
            styles={(i, len(axes)): STATUS_STYLE[r.status] for i, r in enumerate(rows)}))
    parts: list = [Text(title, style="bold"), rich_tables(tables, width, elsewhere="memprof report"),
                   Text(peak_note(any(r.peak_allocated_bytes is not None for r in records)), style="dim"),
                   Text("loss: the first step's → the mean of the last 5 steps", style="dim")]
    parts.extend(Text(note, style="dim") for note in sharded_note(records))
    slopes = activation_slopes(records)
    if slopes:
        parts.append(slopes_table(slopes))
    jobs = max((r.concurrent_jobs for r in records), default=1)
    if jobs > 1:
        parts.append(Text(f"timings were taken with {jobs} cells running at once on the machines they shared",
                          style="yellow"))
    parts.extend(Text(note, style="yellow") for note in contention_notes(records))
    failed = [r for r in records if r.status is not Status.OK and r.error]
    parts.extend(Text(f"{r.key}: {r.error[:200]}", style="dim") for r in failed[:8])
    return Group(*parts)


def slopes_table(slopes: Iterable[Slope]) -> Table:
    """Activation memory against context length, one fitted line per group."""
    table = Table(title="[bold]activations vs context length[/]: saved bytes ≈ slope × tokens + intercept",
                  title_justify="left", header_style="bold")
    for name in ("group", "seq lens", "per token", "intercept", "worst residual"):
        table.add_column(name, justify="left" if name in ("group", "seq lens") else "right")
    for s in slopes:
        style = "green" if s.linear else "yellow"
        table.add_row(s.group, ", ".join(map(str, s.seq_lens)), human_bytes(s.bytes_per_token),
                      human_bytes(s.intercept), f"[{style}]{s.max_residual:.1%}[/]")
    return table


def _row(r: Record, ratio_to_adamw: float | None, compared: bool, show_paged: bool) -> list[str]:
    """The figures of one results row (its names come from the varying axes); the ratio to AdamW's state where its
    group is ``compared``."""
    loss = _num(r.final_loss_smoothed, ".3f")
    if r.first_loss is not None and r.status is Status.OK:
        loss = f"{_num(r.first_loss, '.3f')}→{loss}"
    step_ms = r.step_time_median_s * 1e3 if r.step_time_median_s is not None else None
    cells = [r.outcome, human_bytes(r.optimizer_state_bytes)]
    if compared:
        cells.append(f"{ratio_to_adamw:.2f}×" if ratio_to_adamw is not None else "–")
    if show_paged:
        cells.append(human_bytes(r.optimizer_state_paged_bytes))
    return cells + [peak_text(r, r.peak_bytes), marked(_num(r.tokens_per_s, ",.0f"), [r]), loss,
                    marked(_num(step_ms, ".1f") + (" ms" if step_ms is not None else ""), [r])]


def cells_table(cells: Iterable[CellConfig], title: str) -> Table:
    """A suite's cells before they run (``--dry-run``): the index and every axis that varies."""
    cells = list(cells)
    axes = varying(cells, always=("model", "adapter", "optimizer"))
    table = Table(title=title, header_style="bold")
    table.add_column("#")
    for axis in axes:
        table.add_column(axis.title, no_wrap=True)
    table.add_column("seed")
    for c in cells:
        table.add_row(str(c.index), *(a.text(c) for a in axes), str(c.training.seed))
    return table


def crosscheck_table(rows: Iterable[CategoryCheck], title: str) -> Group:
    """PyTorch's profiler beside memprof, one category a row, with each row's notes below the table."""
    rows = list(rows)
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("category", "profiler bytes", "memprof bytes", "diff", "verdict"):
        table.add_column(name, justify="right" if "bytes" in name or name == "diff" else "left")
    for row in rows:
        style = "green" if row.agrees else "bold red" if row.required else "yellow"
        table.add_row(row.category, f"{row.profiler_bytes:,}", f"{row.memprof_bytes:,}", f"{row.diff_bytes:+,}",
                      f"[{style}]{row.verdict}[/]")
    notes = [Text(f"{row.category}: {row.note}", style="dim") for row in rows if row.note]
    return Group(table, *notes)


def levers_markdown(records: Iterable[Record]) -> str:
    """A Markdown table of one run's lever cells, per rank: what each lever does to each part of the memory
    (``memprof levers RUN_DIR``, pasted into the README), timings taken under contention marked as elsewhere, and
    notes that say what each figure is and why a cell has none."""
    records = list(records)
    header = ["model / adapter", "optimizer", "levers", "seq", "weights", "gradients", "optimizer state",
              "activations", "peak", "tokens/s"]
    align = ["---"] * 4 + ["---:"] * (len(header) - 4)  # the four labels left, the figures right
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    causes = []
    for r in records:
        c = r.config
        names = f"| {c.model.name} / {c.adapter.name} | {c.optimizer.label} | {c.levers_label or 'none'} | " \
                f"{c.shape.seq_len} |"
        if r.status is not Status.OK:
            causes.append(f"({len(causes) + 1}) {r.status.value}" + (f": {r.error}" if r.error and r.error !=
                                                                        r.status.value else ""))
            lines.append(f"{names} – | – | – | – | {peak_text(r, r.peak_bytes)} | {r.status.value} "
                         f"({len(causes)}) |")
            continue
        weights = (r.frozen_weight_bytes or 0) + (r.trainable_weight_bytes or 0)
        figures = [human_bytes(weights), human_bytes(r.gradient_bytes), human_bytes(r.optimizer_state_bytes),
                   human_bytes(r.activation_bytes), human_bytes(r.peak_bytes),
                   marked(_num(r.tokens_per_s, ",.0f"), [r])]
        lines.append(f"{names} {' | '.join(figures)} |")
    cuda = any(r.peak_allocated_bytes is not None for r in records)
    notes = ["weights, gradients, optimizer state: exact bytes of the tensors; activations: what autograd saves in "
             "one micro-batch's forward (the peak holds more: the loss's logits, the layer at work in backward; "
             "`memprof attribute` splits it); " + peak_note(cuda)]
    notes += sharded_note(records) + lower_bound_note(records) + contention_notes(records)
    notes += [markdown_cell(cause) for cause in causes]
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes)  # each note a paragraph of its own


def markdown_cell(text: str) -> str:
    """Text as one cell of a Markdown table: its pipes escaped, its lines joined."""
    return " ".join(text.split()).replace("|", "\\|")


def _breakdown_rows(records: Iterable[Record], fold: float = 0.0) -> tuple[list[str], list[list[str]], list[str]]:
    """(column titles, rows, notes) of the peaks' parts: a row per cell, named by the axes that vary; figures in
    GiB, or MiB when every peak is under 1 GiB (the CPU's). Parts below ``fold`` of every row's peak share one
    "small" column; the moment of the peak comes last, or the status of a cell that has no parts (it failed before
    its peak was measured). The notes: the unit and what the peak is, each part's name, and where paged state is."""
    records = list(records)
    attributed = [r for r in records if r.breakdown]
    axes = varying([r.config for r in records], always=("optimizer",))
    unit, scale = scale_unit(max((r.peak_bytes or 0 for r in records), default=0))
    digits = 3 if unit == "GiB" else 1
    present = [name for name in PARTS if any(r.breakdown.get(name) for r in attributed)]
    small = [name for name in present if name != "other"
             and all(abs(r.breakdown.get(name, 0)) < fold * (r.peak_bytes or 1) for r in attributed)]
    # the largest parts first: a narrow terminal leaves out the least of the peak (on the CPU the remainder and the
    # free heap are often most of it)
    parts = sorted((name for name in present if name not in small),
                   key=lambda name: -max(abs(r.breakdown.get(name, 0)) for r in attributed))

    def amount(n: int | None) -> str:
        return f"{n / scale:.{digits}f}" if n else "–"

    def moment(r: Record) -> str:
        return r.peak_moment or ("–" if r.status is Status.OK else r.outcome)

    titles = [a.title for a in axes] + [f"peak {unit}"] + [PARTS[name].short for name in parts]
    titles += ["small"] if small else []
    rows = [[a.text(r.config) for a in axes] + [("≥ " if r.peak_is_lower_bound and r.peak_bytes else "")
                                                 + amount(r.peak_bytes)]
            + [amount(r.breakdown.get(name)) for name in parts]
            + ([amount(sum(r.breakdown.get(name, 0) for name in small))] if small else [])
            + [moment(r)] for r in records]
    cuda = any(r.peak_allocated_bytes is not None for r in records)
    notes = [f"{unit}, parts of the {'torch allocator' if cuda else 'resident memory growth'}'s peak: "
             + "; ".join(f"{PARTS[name].short}: {PARTS[name].label}" for name in parts)
             + (f"; small: {', '.join(PARTS[name].label for name in small)}" if small else "")] if present else []
    if any(r.optimizer_state_paged_bytes for r in records):
        notes.append("paged optimizer state (CUDA managed memory) is outside the allocator's peak, so not in state")
    if any(r.breakdown.get("other", 0) < 0 and r.breakdown.get("heap_free") for r in attributed):
        notes.append("a negative other: the free heap holds bytes a part counts as alive at the moment, so they are "
                     "counted twice (records of an older memprof read it at the RSS high, which late in a backward "
                     "holds the activations freed earlier in it)")
    return titles + ["at"], rows, notes


def breakdown_table(records: Iterable[Record], title: str, width: int) -> Group:
    """Each cell's peak split into the parts alive at its moment (``memprof attribute``): a row per cell, named by
    the axes that vary, a column per part (the largest first), the moment last, a legend below; parts under 0.1% of
    every peak share the column "small". Columns that do not fit ``width`` are left out from the right, named in a
    note, never cut."""
    titles, rows, notes = _breakdown_rows(records, fold=0.001)
    return rich_tables([TableData(title, titles, rows, notes)], width, elsewhere="--markdown")


def breakdown_markdown(records: Iterable[Record]) -> str:
    """The same as a Markdown table with its legend, for a committed record of a run."""
    titles, rows, notes = _breakdown_rows(records)
    first_figure = next(i for i, t in enumerate(titles) if t.startswith("peak "))
    align = ["---" if i < first_figure or t == "at" else "---:" for i, t in enumerate(titles)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + ([""] + notes if notes else []))


_NAME_WIDTH = 32  # a text column this narrow holds names (axes, statuses), a wider one prose
# a figure, with its unit, spread, count or mark (right-aligned in every renderer): 1.13 MiB, 0.30×, 39.5 ms *,
# ≥ 1.94 GiB
NUMBER = re.compile(r"^(≥ )?[-+]?[\d,.]+(e[-+]?\d+)?(→[\d,.]+)?( ± [\d,.]+)?( ?(×|%|B|KiB|MiB|GiB|TiB|ms|s))?"
                    r"( \(\d+/\d+\))?( \*)?$")
# where a figure column has none: "–", "– (oom)", "never (0/2)"
NO_FIGURE = re.compile(r"^(–|never)( \(.+\))?$")


def rich_tables(tables: list[TableData], width: int, elsewhere: str = "report.html") -> Group:
    """The tables for a terminal ``width`` columns wide. No cell is cut or folded: where the columns do not fit, one
    that holds the same value in every row is said in a line instead, then a column that still does not fit is
    left out, the rightmost first (columns come in order of importance), and a note names it and ``elsewhere``,
    what shows them all. Prose columns (the diagnoses' meanings and remedies) wrap."""
    parts: list = []
    for t in tables:
        keep, constant = _columns_that_fit(t, width)
        table = Table(title=f"[bold]{t.title}[/]", title_justify="left", header_style="bold")
        for j in keep:
            numeric = numeric_column(t, j)
            if _widest(t, j) > _NAME_WIDTH:
                table.add_column(t.columns[j], overflow="fold")
            else:
                table.add_column(t.columns[j], justify="right" if numeric else "left", no_wrap=True,
                                 min_width=max(_widest(t, j), len(t.columns[j])))
        for i, row in enumerate(t.rows):
            table.add_row(*(Text(row[j], style="bold green" if (i, j) in t.best else t.styles.get((i, j), ""))
                            for j in keep))
        parts.append(table)
        parts.extend(Text(note, style="dim") for note in t.notes)
        if constant:
            parts.append(Text(every_row_line(t, constant), style="dim"))
        left_out = [t.columns[j] for j in range(len(t.columns)) if j not in keep and j not in constant]
        if left_out:
            parts.append(Text(f"not shown at {width} columns: {', '.join(left_out)} (a wider terminal, or "
                              f"{elsewhere}, has {'them' if len(left_out) > 1 else 'it'})", style="yellow"))
    return Group(*parts)


def numeric_column(t: TableData, j: int) -> bool:
    """Whether column ``j`` holds figures (or none: '–', 'never'), to be right-aligned."""
    return all(NUMBER.match(row[j]) or NO_FIGURE.match(row[j]) or not row[j] for row in t.rows)


def constant_columns(t: TableData) -> list[int]:
    """The columns that hold one value in every row of a table of several rows (all but the first where every
    column does: a row still says what it is)."""
    if len(t.rows) < 2:
        return []
    constant = [j for j in range(len(t.columns)) if len({row[j] for row in t.rows}) == 1]
    return constant[1:] if len(constant) == len(t.columns) else constant


def every_row_line(t: TableData, constant: list[int]) -> str:
    """The line that says the ``constant`` columns' one value each."""
    return "in every row: " + ", ".join(f"{t.columns[j]} {t.rows[0][j]}" for j in constant)


def _widest(t: TableData, j: int) -> int:
    return max((len(row[j]) for row in t.rows), default=0)


def _columns_that_fit(t: TableData, width: int) -> tuple[list[int], list[int]]:
    """(The columns to show, the ones said in a line instead): all that fit in ``width``; where they do not, those
    that hold one value in every row go to the line (``constant_columns``), then columns drop from the right. Prose
    columns count at their narrowest useful width."""
    def need(j: int) -> int:  # the widest cell or the header, plus rich's padding and border
        return max(min(_widest(t, j), _NAME_WIDTH), len(t.columns[j])) + 3

    def fits(columns: list[int]) -> bool:
        return sum(need(j) for j in columns) + 1 <= width

    keep, constant = list(range(len(t.columns))), []
    if not fits(keep):
        constant = constant_columns(t)
        keep = [j for j in keep if j not in constant]
    while len(keep) > 1 and not fits(keep):
        keep.pop()
    return keep, constant
