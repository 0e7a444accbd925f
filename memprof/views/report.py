"""The report rendered: rich tables for the terminal, and one self-contained HTML page (figures embedded as base64
PNG, so the file can be mailed or attached to a CI run as it is)."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from memprof.errors import UserError
from memprof.analysis.report import Run, TableData

_NUMBER = re.compile(r"^[-+]?[\d,.]+(e[-+]?\d+)?( ± [\d,.]+)?×?( \(\d+/\d+\))?$")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #dff5df; }
p.note { color: #666; font-size: 12px; margin: 0.1em 0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
"""


def rich_tables(tables: list[TableData]) -> Group:
    parts: list = []
    for t in tables:
        table = Table(title=f"[bold]{t.title}[/]", title_justify="left", header_style="bold")
        for j, name in enumerate(t.columns):
            numeric = all(_NUMBER.match(row[j]) or row[j] in ("–", "") for row in t.rows)
            table.add_column(name, justify="right" if numeric else "left")
        for i, row in enumerate(t.rows):
            table.add_row(*(f"[bold green]{cell}[/]" if (i, j) in t.best else cell for j, cell in enumerate(row)))
        parts.append(table)
        parts.extend(Text(note, style="dim") for note in t.notes)
    return Group(*parts)


def html_page(run: Run, tables: list[TableData], figures: list) -> str:
    """The whole report as one HTML document."""
    suite = run.records[0].config.suite if run.records else run.run_dir.name
    body = [f"<h1>memprof report: {html.escape(suite)}</h1>",
            f"<p class='note'>{html.escape(str(run.run_dir))} — {len(run.records)} cells{_env_line(run)}</p>"]
    for t in tables:
        body.append(_html_table(t))
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        body.append(f"<h2>{html.escape(fig.title)}</h2><img alt='{html.escape(fig.title)}' "
                    f"src='data:image/png;base64,{data}'>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>memprof report: {html.escape(suite)}"
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_table(t: TableData) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    rows = []
    for i, row in enumerate(t.rows):
        cells = "".join(f"<td{_classes(c, (i, j) in t.best)}>{html.escape(c)}</td>" for j, c in enumerate(row))
        rows.append(f"<tr>{cells}</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in t.notes)
    return f"<h2>{html.escape(t.title)}</h2><table><tr>{head}</tr>{''.join(rows)}</table>{notes}"


def _classes(text: str, best: bool) -> str:
    names = (["num"] if _NUMBER.match(text) else []) + (["best"] if best else [])
    return f" class='{' '.join(names)}'" if names else ""


def _env_line(run: Run) -> str:
    try:
        env = json.loads((run.run_dir / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    torch_version = env.get("versions", {}).get("torch", "?")
    return html.escape(f"; torch {torch_version}, {env.get('cpu') or 'cpu'}")


def write(run: Run, tables: list[TableData], figures: list, out_dir: Path) -> Path:
    """Write each figure as a PNG and the HTML page into ``out_dir``; return the page's path.

    Raises:
        UserError: when the folder cannot be written.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for fig in figures:
            (out_dir / f"{fig.name}.png").write_bytes(fig.png)
        page = out_dir / "report.html"
        page.write_text(html_page(run, tables, figures), encoding="utf-8")
    except OSError as err:
        raise UserError(str(out_dir), f"cannot write the report: {err}") from None
    return page
