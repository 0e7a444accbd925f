"""The report rendered: rich tables for the terminal, and one self-contained HTML page (figures embedded as base64
PNG, so the file can be mailed or attached to a CI run as it is). Memory comes first: a table of each configuration's
optimizer state and peak, and the stacked breakdown of every peak."""

from __future__ import annotations

import base64
import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from memprof.analysis.memory import on_card_bytes, state_vs_baseline
from memprof.analysis.report import Run, TableData, fixed_axes, one_per_config, varying_axes
from memprof.errors import UserError
from memprof.views.tables import (constant_columns, every_row_line, human_bytes, lower_bound_note, numeric_column,
                                  peak_note, peak_text)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #dff5df; }
p.note { color: #666; font-size: 12px; margin: 0.1em 0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
h1.section { font-size: 24px; border-bottom: 2px solid #333; margin-top: 1.5em; }
h2 { font-size: 16px; margin: 1.2em 0 0.3em; }
"""


@dataclass(frozen=True)
class Section:
    """A heading of the HTML page with its tables and figures."""

    title: str
    tables: list[TableData]
    figures: list


def memory_table(run: Run) -> TableData:
    """One row per configuration: optimizer state, the peak, the state's ratio to AdamW's in the same group, what
    was on the card, the paged part and the moment the peak fell at (the figure shows its parts), columns in that
    order of importance (a narrow terminal leaves out the last). Memory does not vary between repeats: the first ok
    repeat speaks for them."""
    axes = varying_axes(run.records)
    ratios = state_vs_baseline(run.records)
    cuda = any(r.peak_allocated_bytes is not None for r in run.records)
    paged = any(r.optimizer_state_paged_bytes for r in run.records)
    rows = []
    for r in one_per_config(run.records):
        ratio = ratios.get(r.config.index)
        row = [axis.text(r.config) for axis in axes] + [
            r.status.value, human_bytes(r.optimizer_state_bytes), peak_text(r, r.peak_bytes)]
        row += [f"{ratio:.2f}×" if ratio is not None else "–"] if ratios else []
        row += [peak_text(r, on_card_bytes(r) if r.peak_bytes is not None else None)] if cuda else []
        row += [human_bytes(r.optimizer_state_paged_bytes)] if paged else []
        row += [r.peak_moment or "–"]
        rows.append(row)
    columns = [axis.title for axis in axes] + ["status", "optimizer state", "peak"] + \
        (["vs AdamW"] if ratios else []) + (["on the card"] if cuda else []) + (["paged"] if paged else []) + \
        ["peak at"]
    notes = (["vs AdamW: optimizer-state bytes over adamw_torch's with the same model, adapter, shape and levers"]
             if ratios else []) + [peak_note(cuda)]
    if cuda:
        notes.append("on the card: NVML's peak for the process (allocator, its cache, CUDA's context)"
                     + (" plus paged state" if paged else ""))
    if paged:
        notes.append("paged: bitsandbytes' state in CUDA managed memory, outside the allocator's peak")
    notes += lower_bound_note(run.records)
    return TableData(f"Optimizer state and peak of each configuration ({fixed_axes(run.records)})", columns, rows,
                     notes)


def html_page(run: Run, sections: list[Section]) -> str:
    """The whole report as one HTML document."""
    suite = run.records[0].config.suite if run.records else run.run_dir.name
    body = [f"<h1>memprof report: {html.escape(suite)}</h1>",
            f"<p class='note'>{html.escape(str(run.run_dir))} — {len(run.records)} cells{_env_line(run)}</p>"]
    for section in sections:
        body.append(f"<h1 class='section'>{html.escape(section.title)}</h1>")
        body.extend(_html_table(t) for t in section.tables)
        for fig in section.figures:
            data = base64.b64encode(fig.png).decode("ascii")
            body.append(f"<h2>{html.escape(fig.title)}</h2><img alt='{html.escape(fig.title)}' "
                        f"src='data:image/png;base64,{data}'>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>memprof report: {html.escape(suite)}"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(t: TableData) -> str:
    """A table, its columns that hold one value in every row said in a line under it instead."""
    constant = constant_columns(t)
    keep = [j for j in range(len(t.columns)) if j not in constant]
    numeric = {j for j in keep if numeric_column(t, j)}
    head = "".join(f"<th>{html.escape(t.columns[j])}</th>" for j in keep)
    rows = []
    for i, row in enumerate(t.rows):
        cells = "".join(f"<td{_classes(j in numeric, (i, j) in t.best)}>{html.escape(row[j])}</td>" for j in keep)
        rows.append(f"<tr>{cells}</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>"
                    for n in t.notes + ([every_row_line(t, constant)] if constant else []))
    return f"<h2>{html.escape(t.title)}</h2><table><tr>{head}</tr>{''.join(rows)}</table>{notes}"


def _classes(numeric: bool, best: bool) -> str:
    names = (["num"] if numeric else []) + (["best"] if best else [])
    return f" class='{' '.join(names)}'" if names else ""


def _env_line(run: Run) -> str:
    if run.env is None:
        return ""
    torch_version = (run.env.get("versions") or {}).get("torch", "?")
    gpus = Counter(gpu.get("name", "?") for gpu in run.env.get("gpus") or [] if isinstance(gpu, dict))
    cards = "".join(f"{n}× {name}, " for name, n in gpus.items())
    return html.escape(f"; torch {torch_version}, {cards}{run.env.get('cpu') or 'cpu'}")


def write(run: Run, sections: list[Section], out_dir: Path) -> Path:
    """Write each figure as a PNG and the HTML page into ``out_dir``; return the page's path.

    Raises:
        UserError: when the folder cannot be written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for fig in (fig for section in sections for fig in section.figures):
            (out_dir / f"{fig.name}.png").write_bytes(fig.png)
        page = out_dir / "report.html"
        page.write_text(html_page(run, sections), encoding="utf-8")
    except OSError as err:
        raise UserError(str(out_dir), f"cannot write the report: {err}") from None
    return page
