"""The Record: one cell's outcome as plain, frozen data (bytes as integers, seconds as floats)."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from memprof.config.cell import Cell, lever_label

SCHEMA_VERSION = 1
# The figures a sharded cell keeps for each of its ranks (the record's own fields hold the max over ranks).
RANK_FIELDS = ("frozen_weight_bytes", "trainable_weight_bytes", "gradient_bytes", "optimizer_state_bytes",
               "predicted_state_bytes", "activation_bytes", "peak_allocated_bytes", "peak_rss_delta_bytes",
               "step_time_median_s")


class Status(str, enum.Enum):
    """How a cell ended. Every fault is its own value; none of them ends the suite."""

    OK = "ok"
    OOM = "oom"                    # out of memory (CUDA OOM, host allocator failure, memory budget)
    DIVERGED = "diverged"          # loss became NaN/inf; the cell stopped at that step
    CRASHED = "crashed"            # an exception from a library, a signal (segfault, SIGKILL), a bad exit
    TIMEOUT = "timeout"            # ran past the suite's timeout_s and was killed
    INTERRUPTED = "interrupted"    # Ctrl-C / SIGTERM while it ran
    UNAVAILABLE = "unavailable"    # its optimizer's library is not installed, or it needs CUDA


@dataclass(frozen=True)
class Record:
    """What one cell measured. Fields a device does not have (CUDA peaks on the CPU) stay None."""

    cell_key: str
    config_hash: str
    suite: str
    cell_index: int
    model: str
    adapter: str
    optimizer: str
    optim: str
    batch_size: int
    seq_len: int
    grad_accum: int
    precision: str
    lr: float
    schedule: str
    seed: int
    repeat: int
    steps: int
    warmup_steps: int
    status: Status = Status.OK
    schema_version: int = SCHEMA_VERSION
    error: str = ""
    fail_phase: str = ""
    fail_step: int | None = None
    exit_code: int | None = None
    host: str = ""
    concurrent_jobs: int = 1
    visible_devices: str = ""  # CUDA_VISIBLE_DEVICES of the job that ran it ("" = not pinned)
    device: str = ""
    device_name: str = ""
    # exact accounting
    total_params: int | None = None
    trainable_params: int | None = None
    frozen_weight_bytes: int | None = None
    trainable_weight_bytes: int | None = None
    buffer_bytes: int | None = None
    gradient_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    predicted_state_bytes: int | None = None  # memprof.measure.formulas: what the catalogue formula says it should be
    optimizer_state_paged_bytes: int | None = None
    optimizer_state_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    activation_bytes: int | None = None
    # CUDA caching allocator
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    # NVML
    nvml_peak_device_used_bytes: int | None = None
    nvml_peak_process_used_bytes: int | None = None
    # attribution at the peak (memprof.measure.attribution)
    attributed_other_bytes: int | None = None
    allocator_cache_bytes: int | None = None
    non_pytorch_bytes: int | None = None
    # host
    rss_baseline_bytes: int | None = None
    peak_rss_bytes: int | None = None
    peak_rss_delta_bytes: int | None = None
    # time and loss
    step_time_median_s: float | None = None
    step_time_p95_s: float | None = None
    tokens_per_s: float | None = None
    train_s: float | None = None
    setup_s: float | None = None
    cell_wall_s: float | None = None
    harness_wall_s: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    final_loss_smoothed: float | None = None
    # convergence (memprof.analysis.convergence, memprof.analysis.diagnose)
    adapter_r: int | None = None
    final_eval_loss: float | None = None
    eval_perplexity: float | None = None
    entropy_floor_nats: float | None = None
    floor_gap_nats: float | None = None
    target_loss: float | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    loss_auc: float | None = None
    diagnosis: str = ""  # comma-separated memprof.analysis.diagnose codes
    verdict: str = ""  # what went wrong with the training, when something did
    # levers (the headline figures of a sharded cell are the max over its ranks, never a sum)
    gradient_checkpointing: str = "off"
    attn_implementation: str = "sdpa"
    parallel_strategy: str = "none"
    world_size: int = 1
    ranks: list[dict[str, Any]] = field(default_factory=list)  # one dict of RANK_FIELDS per rank

    @property
    def peak_bytes(self) -> int | None:
        """The peak a user cares about on this device: the allocator peak on CUDA, RSS growth on the CPU."""
        return self.peak_allocated_bytes if self.peak_allocated_bytes is not None else self.peak_rss_delta_bytes

    @property
    def levers(self) -> str:
        """The memory levers this cell pulled away from the defaults ('' for none)."""
        return lever_label(self.gradient_checkpointing, self.attn_implementation, self.parallel_strategy,
                           self.world_size)

    @classmethod
    def for_cell(cls, cell: Cell, **values: Any) -> Record:
        return cls(
            cell_key=cell.key, config_hash=cell.config_hash, suite=cell.suite, cell_index=cell.index,
            model=cell.model, adapter=cell.adapter, optimizer=cell.optimizer, optim=cell.optim,
            batch_size=cell.batch_size, seq_len=cell.seq_len, grad_accum=cell.grad_accum,
            precision=cell.precision, lr=cell.lr, schedule=cell.schedule, seed=cell.seed, repeat=cell.repeat,
            steps=cell.steps, warmup_steps=cell.warmup_steps, gradient_checkpointing=cell.gradient_checkpointing,
            attn_implementation=cell.attn_implementation, parallel_strategy=cell.strategy,
            world_size=cell.world_size, **values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = Status(values.get("status", "ok"))
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        """One flat CSV row: nested dicts become dotted columns (``optimizer_state_bytes.uint8``)."""
        row = self.to_dict()
        for dtype, nbytes in row.pop("optimizer_state_bytes_by_dtype").items():
            row[f"optimizer_state_bytes.{dtype}"] = nbytes
        for rank, figures in enumerate(row.pop("ranks")):
            for name, value in figures.items():
                row[f"rank{rank}.{name}"] = value
        return row

    @classmethod
    def from_row(cls, row: dict[str, str]) -> Record:
        """The inverse of ``to_row`` for a row read back from CSV text (an empty cell is None).

        Raises:
            ValueError: a cell that is not a number where the field is one.
        """
        types = {f.name: str(f.type) for f in fields(cls)}

        def parse(name: str, text: str) -> Any:
            kind = types.get(name, "str").split(" ")[0]
            if text == "" and "None" in types.get(name, ""):
                return None
            if kind in ("int", "float"):
                return int(text) if kind == "int" else float(text)
            return text

        values: dict[str, Any] = {}
        by_dtype: dict[str, int] = {}
        ranks: dict[int, dict[str, Any]] = {}
        for key, text in row.items():
            if key.startswith("optimizer_state_bytes."):
                if text:
                    by_dtype[key.split(".", 1)[1]] = int(text)
            elif key.startswith("rank") and "." in key:  # rank0.optimizer_state_bytes: a RANK_FIELDS figure
                rank, name = key.split(".", 1)
                ranks.setdefault(int(rank.removeprefix("rank")), {})[name] = parse(name, text)
            else:
                values[key] = parse(key, text)
        # a CSV has the rank columns of its most sharded cell: the others' are empty
        held = [ranks[r] for r in sorted(ranks) if any(v is not None for v in ranks[r].values())]
        return cls.from_dict({**values, "optimizer_state_bytes_by_dtype": by_dtype, "ranks": held})


def smoothed_final(losses: list[float], window: int = 5) -> float:
    """Mean of the last ``window`` finite losses (NaN when there are none)."""
    tail = [x for x in losses[-window:] if math.isfinite(x)]
    return sum(tail) / len(tail) if tail else math.nan


@dataclass
class CellResult:
    """A Record and the per-step and timeline rows that go beside it."""

    record: Record
    steps: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"record": self.record.to_dict(), "steps": self.steps, "timeline": self.timeline}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        return cls(Record.from_dict(data["record"]), data.get("steps", []), data.get("timeline", []))
