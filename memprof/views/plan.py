"""Terminal views of plans and fit searches: they format, they never compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

from memprof.plan.predict import part_label
from memprof.views.tables import human_bytes

if TYPE_CHECKING:
    from memprof.plan.calibration import Calibration
    from memprof.plan.fit import Search
    from memprof.plan.gpus import Gpu
    from memprof.plan.predict import GpuFit, Plan, Refusal


def describe(plan: Plan) -> str:
    r, e = plan.request, plan.exact
    extra = (" grad-accum " + str(r.shape.grad_accum) if r.shape.grad_accum > 1 else "") + \
        (f" {r.levers_label}" if r.levers_label else "") + (", per rank" if r.levers.parallel.world_size > 1 else "")
    return (f"{r.model.name} / {r.adapter.name} / {r.optimizer.label}  b{r.shape.batch_size}×s{r.shape.seq_len} "
            f"{r.shape.precision}{extra}  "
            f"({_count(e.total_params)} params, {_count(e.trainable_params)} trainable)")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


_KIND_STYLE = {"exact": "green", "analytic": "cyan", "measured": "cyan", "derived": "cyan", "fitted": "yellow",
               "assumed": "red"}


def parts_table(plan: Plan) -> Table:
    """The plan part by part: bytes, its share, how far it may be off, and how it was obtained (coloured by kind:
    exact, analytic or measured, fitted, assumed)."""
    title = describe(plan) + (f"\npeak at the {plan.moment}" if plan.moment else "") + \
        (f"; fitted and measured parts from {plan.calibration}" if plan.moment else "")
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in ("part", "GiB", "share", "± GiB", "how"):
        table.add_column(name, justify="left" if name in ("part", "how") else "right", no_wrap=name != "how")
    total = plan.total_bytes
    for part in plan.parts:
        label = part_label(part.name) + ("" if part.allocated else " *")
        if part.bytes is None:
            table.add_row(label, "?", "", "", f"[red]unknown: {part.how}[/]")
            continue
        style = _KIND_STYLE.get(part.kind, "white")
        table.add_row(label, f"{part.bytes / (1 << 30):.3f}", f"{part.bytes / total:.0%}" if total else "",
                      f"{part.bytes * part.error / (1 << 30):.3f}" if part.error else "", f"[{style}]{part.how}[/]")
    bound = " (a lower bound: a part is unknown)" if not plan.complete else ""
    where = "on the card" if plan.device == "cuda" else "RSS growth on the CPU"
    table.add_row("[bold]total[/]", f"[bold]{total / (1 << 30):.3f}[/]", "",
                  f"{plan.uncertainty_bytes / (1 << 30):.3f}", f"{where}{bound}" + (
                      f"; * not the torch allocator's: its peak is {human_bytes(plan.allocated_bytes)}"
                      if any(not p.allocated for p in plan.parts) else ""))
    return table


def verdict_table(plan: Plan, verdicts: Sequence[GpuFit]) -> Table:
    r = plan.request
    paged = plan.pageable_bytes
    table = Table(title="fits?", title_justify="left", header_style="bold",
                  caption=f"needed: the total less the paged optimizer state ({human_bytes(paged)}), which the driver "
                          "moves to host memory when the card is full" if paged else None, caption_justify="left")
    first = "GPU" if plan.device == "cuda" else "memory"
    for name in (first, "capacity", "needed" if paged else "total", "headroom", "headroom %", "fits",
                 f"max batch @ s{r.shape.seq_len}", f"max seq @ b{r.shape.batch_size}"):
        table.add_column(name, justify="left" if name in (first, "fits") else "right")
    for v in verdicts:
        fits = {"yes": "[green]yes[/]", "no": "[bold red]no[/]", "borderline": "[yellow]borderline[/]"}[v.answer]
        if not plan.complete:
            fits = "[yellow]at least this much[/]" if v.answer == "no" else "[yellow]unknown[/]"
        seq = f"{v.max_seq_len:,}" + (" (model max)" if v.seq_len_capped else "")
        table.add_row(v.gpu.name, human_bytes(v.gpu.capacity_bytes), human_bytes(v.needed_bytes),
                      human_bytes(v.headroom_bytes), f"{v.headroom_fraction:.0%}", fits, f"{v.max_batch_size:,}",
                      seq)
    return table


def suite_tables(plans: Sequence[Plan | Refusal], gpus: Sequence[Gpu],
                 verdicts: dict[int, list[GpuFit]]) -> list[Table]:
    """One table per length/precision: a row per model, adapter and optimizer, a column per batch size; each
    entry is what must be on the card and, per GPU in order, ✓ (fits) or ✗, or how a run of it would end
    (unavailable, crashed) where no plan is made. ``verdicts`` is keyed by plan index."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):
        r = p.request
        groups.setdefault((r.shape.seq_len, r.shape.precision, r.shape.grad_accum, r.levers_label), []).append(i)
    tables = []
    for (seq, precision, accum, levers), members in groups.items():
        batches = sorted({plans[i].request.shape.batch_size for i in members})
        rows: dict[tuple[str, str, str], dict[int, int]] = {}
        for i in members:
            r = plans[i].request
            rows.setdefault((r.model.name, r.adapter.name, r.optimizer.label), {})[r.shape.batch_size] = i
        title = (f"s{seq} {precision}" + (f" grad-accum {accum}" if accum > 1 else "")
                 + (f" {levers}" if levers else ""))
        what = ("predicted peak on a GPU (paged optimizer state left out: the driver moves it to host memory when "
                "the card is full); per GPU" if plans[members[0]].device == "cuda" else
                "predicted RSS growth of a CPU run over its worker's start; per memory size")
        table = Table(title=title, title_justify="left", header_style="bold",
                      caption=f"{what} ({' '.join(g.name for g in gpus)}): ✓ fits even at the plan's worst, ✗ does "
                              "not fit even at its best, ? borderline",
                      caption_justify="left")
        for name in ("model", "adapter", "optimizer"):
            table.add_column(name)
        for b in batches:
            table.add_column(f"b{b}", justify="right")
        for (model, adapter, optimizer), by_batch in rows.items():
            cells = []
            for b in batches:
                index = by_batch.get(b)
                if index is None:
                    cells.append("")
                    continue
                if index not in verdicts:  # a Refusal
                    cells.append(f"[dim]{plans[index].status}[/]")
                    continue
                marks = "".join({"yes": "[green]✓[/]", "no": "[red]✗[/]", "borderline": "[yellow]?[/]"}[v.answer]
                                for v in verdicts[index])
                lower = "≥" if not plans[index].complete else ""
                cells.append(f"{lower}{human_bytes(plans[index].needed_bytes)} {marks}")
            table.add_row(model, adapter, optimizer, *cells)
        tables.append(table)
    return tables


def search_table(search: Search) -> Table:
    """The trials, titled with the configuration they ran and captioned with what ``peak`` and ``limit`` are."""
    table = Table(title=f"trials of {search.axis} for {search.config} on {search.device}: {len(search.trials)} in "
                        f"{search.wall_s:.1f} s", title_justify="left", header_style="bold",
                  caption=search_caption(search), caption_justify="left")
    for name in ("#", search.axis, "status", "peak", "limit", "fits", "wall"):
        table.add_column(name, justify="left" if name in ("status", "fits") else "right")
    for n, t in enumerate(search.trials, 1):
        table.add_row(str(n), f"{t.value:,}", t.status, human_bytes(t.peak_bytes), human_bytes(search.limit_bytes),
                      "–" if t.fits is None else "[green]yes[/]" if t.fits else "[red]no[/]", f"{t.wall_s:.1f} s")
    return table


def search_caption(search: Search) -> str:
    fits = f"fits: ok with a peak under {1 - search.margin:.0%} of the limit"
    if search.capped_address_space:
        return (f"limit: each trial's address space (RLIMIT_AS), the CPU's hard cap; peak: its resident memory "
                f"growth (RSS). Libraries reserve address space they never touch, so a trial can be oom with its "
                f"peak well under the limit. {fits}")
    return f"limit: the card's memory; peak: the process's memory on the card (NVML, or reserved). {fits}"


def calibration_table(calibration: Calibration, path: str) -> Table:
    source = calibration.source
    table = Table(title=f"calibration written to {path}: {source.get('cells')} cells on {source.get('device')} "
                        f"({source.get('machine', '?')})", title_justify="left", header_style="bold")
    for name in ("group", "cells", "activations: bytes/token per (L·h, L·i, L·kv, h, V); per adapted weight",
                 "temporaries per (act byte, token·V) + const", "act error", "peak error"):
        table.add_column(name, justify="left" if name == "group" else "right")
    for name, g in sorted(calibration.groups.items()):
        act = ", ".join(f"{c:.3g}" for c in g.activation)
        temp = ", ".join(f"{c:.3g}" for c in g.temporaries[:-1]) + f" + {human_bytes(g.temporaries[-1])}"
        table.add_row(name, str(g.records), act, temp, f"{g.activation_max_error:.1%}", f"{g.peak_max_error:.1%}")
    return table
