"""What a run's memory comparisons compute: which cells are compared with each other (same model, adapter and
shape, same levers) and each cell's optimizer state against AdamW's in its group. Enters: records. Leaves: group
keys, ratios and each CUDA cell's memory on the card for the tables and the report."""

from __future__ import annotations

from collections.abc import Iterable

from memprof.config.spec import AXIS_BY_NAME, CellConfig
from memprof.results.record import Record

BASELINE_OPTIMIZER = "adamw_torch"
# What a memory comparison is one of: these axes name the group, the others that vary name its rows.
GROUP_AXES = ("model", "adapter", "batch_size", "seq_len", "precision")


def group_key(config: CellConfig) -> tuple:
    return tuple(repr(AXIS_BY_NAME[name].get(config)) for name in GROUP_AXES)


def state_vs_baseline(records: Iterable[Record]) -> dict[int, float]:
    """Each cell's optimizer-state bytes over those of the ``adamw_torch`` cell of its group with the same levers,
    by cell index. Left out: cells without such a baseline, and groups where no other optimizer is compared with it
    (each of their cells would read 1.00×, its own baseline)."""
    records = list(records)
    base: dict[tuple, int] = {}
    for r in reversed(records):
        if r.config.optimizer.name == BASELINE_OPTIMIZER and r.optimizer_state_bytes:
            base[group_key(r.config), r.config.levers_label] = r.optimizer_state_bytes
    compared = {(group_key(r.config), r.config.levers_label) for r in records
                if r.config.optimizer.name != BASELINE_OPTIMIZER and r.optimizer_state_bytes is not None}
    out = {}
    for r in records:
        key = group_key(r.config), r.config.levers_label
        if key in base and key in compared and r.optimizer_state_bytes is not None:
            out[r.config.index] = r.optimizer_state_bytes / base[key]
    return out


def on_card_bytes(r: Record) -> int | None:
    """What a CUDA cell held on the card at most: NVML's peak for its process (for the device where the driver lists
    no processes) plus its paged optimizer state, CUDA managed memory that NVML's process figure leaves out (the
    H100's 70B QLoRA cell: 1.64 GB paged, NVML 0.78 GB above the allocator's reserved peak). None where NVML did not
    read it (the CPU)."""
    if r.nvml_peak_bytes is None:
        return None
    return r.nvml_peak_bytes + (r.optimizer_state_paged_bytes or 0)
