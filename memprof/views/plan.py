"""Terminal views of plans and fit searches: they format, they never compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich import box
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
    """The plan against each GPU (or memory size): whether it fits, the headroom or the shortfall, and the largest
    batch and length that would. With paged optimizer state, what is needed on the card (the total less that
    state) is a column of its own."""
    r = plan.request
    paged = plan.pageable_bytes
    caption = f"needed: the total less the paged optimizer state ({human_bytes(paged)}), which the driver " \
        "moves to host memory when the card is full"
    table = Table(title="fits?", title_justify="left", header_style="bold", caption=caption if paged else None,
                  caption_justify="left")
    first = "GPU" if plan.device == "cuda" else "memory"
    names = (first, "capacity", "total", *(["needed"] if paged else []), "headroom", "fits",
             f"max batch\n@ s{r.shape.seq_len}", f"max seq\n@ b{r.shape.batch_size}")
    for name in names:
        table.add_column(name, justify="left" if name in (first, "fits") else "right")
    for v in verdicts:
        fits = {"yes": "[green]yes[/]", "no": "[bold red]no[/]", "borderline": "[yellow]borderline[/]"}[v.answer]
        if not plan.complete:
            fits = "[yellow]at least this much[/]" if v.answer == "no" else "[yellow]unknown[/]"
        batch = f"{v.max_batch_size:,}" if v.max_batch_size else "none fits"
        seq = f"{v.max_seq_len:,}" + (" (model max)" if v.seq_len_capped else "") if v.max_seq_len else "none fits"
        needed = [human_bytes(v.needed_bytes)] if paged else []
        table.add_row(v.gpu.name, human_bytes(v.gpu.capacity_bytes), human_bytes(v.total_bytes), *needed,
                      _headroom(v), fits, batch, seq)
    return table


def _headroom(v: GpuFit) -> str:
    """What is left and its share of the capacity; or, when the plan does not fit, what is missing and how many
    times the capacity it needs (where a headroom of -1395% said nothing)."""
    if v.headroom_bytes >= 0:
        return f"{human_bytes(v.headroom_bytes)} ({v.headroom_fraction:.0%})"
    return f"[red]{human_bytes(-v.headroom_bytes)} short[/] (needs {v.needed_bytes / v.gpu.capacity_bytes:.1f}×)"


_MARK = {"yes": "[green]✓[/]", "no": "[red]✗[/]", "borderline": "[yellow]?[/]"}


def suite_tables(plans: Sequence[Plan | Refusal], gpus: Sequence[Gpu],
                 verdicts: dict[int, list[GpuFit]]) -> list[Table]:
    """One table per length/precision: a row per model, adapter, optimizer and batch size with what must be on
    the card (or in RAM) and a column per GPU (or memory size) marked ✓ (fits), ✗ or ?, or how a run of it would
    end (unavailable, crashed) where no plan is made. A model or batch size the whole table shares is said in its
    title instead of a column. ``verdicts`` is keyed by plan index."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(plans):
        r = p.request
        groups.setdefault((r.shape.seq_len, r.shape.precision, r.shape.grad_accum, r.levers_label), []).append(i)
    tables = []
    for (seq, precision, accum, levers), members in groups.items():
        cuda = plans[members[0]].device == "cuda"
        models = {plans[i].request.model.name for i in members}
        batches = {plans[i].request.shape.batch_size for i in members}
        shape = ", ".join([*(models if len(models) == 1 else []), *(f"batch {b}" for b in batches if len(batches) == 1),
                           f"seq_len {seq}", precision, *([f"grad-accum {accum}"] if accum > 1 else []),
                           *([levers] if levers else [])])
        what = "predicted peak on the card, fits per GPU" if cuda else "predicted RSS growth of a CPU run, fits " \
            "per memory size"
        paged = ("; paged optimizer state is left out: the driver moves it to host memory when the card is full"
                 if cuda else "")
        # a light box, so a name column and a column per GPU stand whole at 80 columns
        title = f"{what}: {shape}"
        table = Table(title=title, title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False, collapse_padding=True, min_width=len(title),
                      caption="✓ fits even at the plan's worst, ✗ does not fit even at its best, ? borderline"
                              + paged, caption_justify="left")
        columns = ["model"] * (len(models) > 1) + ["adapter", "optimizer"] + ["batch"] * (len(batches) > 1)
        for name in columns:
            table.add_column(name, no_wrap=True, justify="right" if name == "batch" else "left")
        table.add_column("peak" if cuda else "RSS growth", no_wrap=True, justify="right")
        for gpu in gpus:  # a card's name over two lines at its hyphen: the marks are one character wide
            table.add_column(gpu.name.replace("-", "-\n", 1), no_wrap=True, justify="center")
        order: dict[tuple[str, str, str], int] = {}  # configurations in the suite's order, batch sizes ascending
        for i in members:
            order.setdefault(_configuration(plans[i]), len(order))
        for i in sorted(members, key=lambda i: (order[_configuration(plans[i])], plans[i].request.shape.batch_size)):
            r = plans[i].request
            if i not in verdicts:  # a Refusal
                needed, marks = f"[dim]{plans[i].status}[/]", [""] * len(gpus)
            else:
                needed = ("≥" if not plans[i].complete else "") + human_bytes(plans[i].needed_bytes)
                marks = [_MARK[v.answer] for v in verdicts[i]]
            values = {"model": r.model.name, "adapter": r.adapter.name, "optimizer": r.optimizer.label,
                      "batch": str(r.shape.batch_size)}
            table.add_row(*(values[name] for name in columns), needed, *marks)
        tables.append(table)
    return tables


def _configuration(p: Plan | Refusal) -> tuple[str, str, str]:
    r = p.request
    return r.model.name, r.adapter.name, r.optimizer.label


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
