"""Memory against context length: the per-token activation slope of each group of cells that differ only in
sequence length, so "how much more does 2x the context cost" is a fitted line with its worst residual."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memprof.results.record import Record, Status


@dataclass(frozen=True)
class Slope:
    """Saved activations ≈ ``bytes_per_token`` × tokens + ``intercept`` over one group's sequence lengths."""

    group: str
    seq_lens: tuple[int, ...]
    bytes_per_token: float
    intercept: float
    max_residual: float  # the worst |fit - measured| / measured: how straight the line is

    @property
    def linear(self) -> bool:
        """Within 1% at every length (sdpa; eager's seq × seq matrices bend the line)."""
        return self.max_residual <= 0.01


def group_label(r: Record) -> str:
    c = r.config
    levers = f" {c.levers_label}" if c.levers_label else ""
    return f"{c.model.name}/{c.adapter.name}/{c.optimizer.label} b{c.shape.batch_size} {c.shape.precision}{levers}"


def activation_slopes(records: Iterable[Record]) -> list[Slope]:
    """One least-squares line per group with at least two sequence lengths measured (ok cells only)."""
    groups: dict[str, dict[int, list[Record]]] = {}
    for r in records:
        if r.status is Status.OK and r.activation_bytes:
            groups.setdefault(group_label(r), {}).setdefault(r.config.shape.seq_len, []).append(r)
    out = []
    for label, by_seq in groups.items():
        if len(by_seq) < 2:
            continue
        points = [(r.config.shape.tokens, r.activation_bytes) for rows in by_seq.values() for r in rows]
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        intercept = mean_y - slope * mean_x
        worst = max(abs(slope * x + intercept - y) / y for x, y in points)
        out.append(Slope(label, tuple(sorted(by_seq)), slope, intercept, worst))
    return out
