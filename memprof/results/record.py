"""The Record: one cell's outcome as plain, frozen data: the configuration it ran (``config``) and what it measured
(bytes as integers, seconds as floats). Flattened only when written (``to_row``: one CSV row)."""

from __future__ import annotations

import enum
import json
import math
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from memprof.config.spec import AXES, CellConfig

SCHEMA_VERSION = 2  # 2: the configuration nested in ``config`` (1: its fields flat beside the measurements)
# Record fields that map a name to bytes, and the column prefix each takes in a CSV row (``peak.activations``).
DICT_COLUMNS = {"optimizer_state_bytes_by_dtype": "optimizer_state_bytes",
                "phase_peak_allocated_bytes": "phase_peak_allocated_bytes", "breakdown": "peak"}
# The figures a sharded cell keeps for each of its ranks (the record's own fields hold the max over ranks).
# Byte fields that are differences, and may be negative (NVML's process figure below the allocator's reserve...)
SIGNED_BYTES = frozenset({"non_pytorch_bytes", "heap_free_delta_bytes", "peak_rss_delta_bytes"})
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
    UNAVAILABLE = "unavailable"    # its optimizer's library or a lever is missing here, or it needs CUDA


# the harness failed, where the other statuses are answers (an OOM, a divergence): `memprof run` exits 3, `compare`
# fails such a cell even when it failed before
HARNESS_FAILURES = (Status.CRASHED, Status.TIMEOUT)


@dataclass(frozen=True)
class Record:
    """What one cell measured. Fields a device does not have (CUDA peaks on the CPU) stay None.

    ``schema_version`` is the version of what it was read from (a schema-1 record's ``config`` holds only the
    names and values that record kept, see ``memprof.results.migrate``); records are always written in the
    current one.
    """

    config: CellConfig
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
    frozen_four_bit_bytes: int | None = None  # the part of frozen_weight_bytes bitsandbytes quantised
    trainable_weight_bytes: int | None = None
    buffer_bytes: int | None = None
    gradient_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    predicted_state_bytes: int | None = None  # memprof.measure.formulas: what the catalogue formula says
    optimizer_state_paged_bytes: int | None = None
    optimizer_state_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    activation_bytes: int | None = None
    # CUDA caching allocator
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    phase_peak_allocated_bytes: dict[str, int] = field(default_factory=dict)  # at the snapshot step, by phase
    # NVML
    nvml_peak_device_used_bytes: int | None = None
    nvml_peak_process_used_bytes: int | None = None
    # attribution at the peak (memprof.measure.attribution): the phase and moment it fell at, and its parts
    peak_phase: str = ""
    peak_moment: str = ""
    breakdown: dict[str, int] = field(default_factory=dict)  # attribution.PARTS name -> bytes; sums to the peak
    allocator_cache_bytes: int | None = None
    non_pytorch_bytes: int | None = None
    # host
    rss_baseline_bytes: int | None = None  # what RSS growth counts from (memprof.track: less the model it was given)
    peak_rss_bytes: int | None = None
    peak_rss_delta_bytes: int | None = None
    # CPU (glibc): growth of malloc's free heap, its least in the step of the highest RSS sample
    heap_free_delta_bytes: int | None = None
    # time and loss
    step_time_median_s: float | None = None
    step_time_p95_s: float | None = None
    tokens_per_s: float | None = None
    cpu_pressure: float | None = None  # share of training time a runnable task waited for a CPU (memprof.measure.load)
    train_s: float | None = None
    setup_s: float | None = None
    cell_wall_s: float | None = None
    harness_wall_s: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    final_loss_smoothed: float | None = None
    # convergence (memprof.analysis.convergence, memprof.analysis.diagnose)
    final_eval_loss: float | None = None
    eval_perplexity: float | None = None
    entropy_floor_nats: float | None = None
    floor_gap_nats: float | None = None
    steps_to_target: int | None = None
    seconds_to_target: float | None = None
    loss_auc: float | None = None
    diagnosis: str = ""  # comma-separated memprof.analysis.diagnose codes
    verdict: str = ""  # what went wrong with the training, when something did
    # a sharded cell's headline figures are the max over its ranks, never a sum
    ranks: list[dict[str, Any]] = field(default_factory=list)  # one dict of RANK_FIELDS per rank

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def peak_bytes(self) -> int | None:
        """The peak a user cares about on this device: the allocator peak on CUDA, RSS growth on the CPU; None for
        a cell that never trained (unavailable: older records kept what its set-up touched)."""
        if self.status is Status.UNAVAILABLE:
            return None
        return self.peak_allocated_bytes if self.peak_allocated_bytes is not None else self.peak_rss_delta_bytes

    @property
    def nvml_peak_bytes(self) -> int | None:
        """NVML's peak for this cell's process, or for the whole device where the driver lists no processes (a
        container's host PIDs); None where NVML did not read it (the CPU)."""
        return self.nvml_peak_process_used_bytes or self.nvml_peak_device_used_bytes

    @property
    def peak_is_lower_bound(self) -> bool:
        """The cell stopped before its steps were done (OOM, crash, timeout, interrupt): its peaks are what it
        reached until then, less than its steps need."""
        return self.status in (Status.OOM, Status.CRASHED, Status.TIMEOUT, Status.INTERRUPTED)

    @property
    def failed_at(self) -> str:
        """Where a cell that did not end ok stopped: its phase, and the step where there was one (``backward@3``,
        ``setup``); "" for an ok cell or one whose phase is unknown."""
        if self.status is Status.OK or not self.fail_phase:
            return ""
        return self.fail_phase if self.fail_step is None else f"{self.fail_phase}@{self.fail_step}"

    @property
    def outcome(self) -> str:
        """How the cell ended, and where when it failed: ``ok``, ``crashed optimizer@0``, ``unavailable``."""
        return f"{self.status.value} {self.failed_at}".strip()

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data, in the current schema (its key and hash beside, for readers)."""
        data = asdict(self)
        data.update(schema_version=SCHEMA_VERSION, status=self.status.value,
                    config=self.config.model_dump(mode="json"))
        return {"cell_key": self.key, "config_hash": self.config.config_hash, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """A record from ``to_dict``'s data (``memprof.results.migrate.read_record`` reads older schemas too).

        Raises:
            ValueError: another schema, a field missing or of another type (``check_types``), or a configuration
                that does not validate.
        """
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        check_types(values)
        values["config"] = CellConfig.model_validate(data["config"], strict=False)
        values["status"] = Status(values.get("status", "ok"))
        return cls(**values)

    def to_row(self) -> dict[str, Any]:
        """One flat CSV row: the key, each axis as its own column (a spec-valued axis by its fields), the whole
        configuration as JSON, then the measurements; nested figures become dotted columns
        (``optimizer_state_bytes.uint8``, ``rank0.gradient_bytes``)."""
        row: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "cell_key": self.key,
                               "config_hash": self.config.config_hash, "suite": self.config.suite,
                               "cell_index": self.config.index}
        for axis in AXES:
            row.update(axis.columns(self.config))
        row.update(seed=self.config.training.seed, repeat=self.config.training.repeat,
                   config=json.dumps(self.config.model_dump(mode="json"), sort_keys=True))
        data = asdict(self)
        for name in ("config", "schema_version"):
            data.pop(name)
        data["status"] = self.status.value
        for name, column in DICT_COLUMNS.items():
            data.update({f"{column}.{key}": nbytes for key, nbytes in data.pop(name).items()})
        for rank, figures in enumerate(data.pop("ranks")):
            data.update({f"rank{rank}.{name}": value for name, value in figures.items()})
        return {**row, **data}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> Record:
        """The inverse of ``to_row`` for a row read back from CSV text (an empty cell is None).

        Raises:
            ValueError: naming the column: text that is not a number where the field is one, an unknown status,
                a configuration that does not validate; or no column config.
        """
        kinds = {f.name: str(f.type) for f in fields(cls)}
        values: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **{name: {} for name in DICT_COLUMNS}}
        by_column = {column: name for name, column in DICT_COLUMNS.items()}
        ranks: dict[int, dict[str, Any]] = {}
        for key, text in row.items():
            head, _, rest = key.partition(".")
            try:
                if head in by_column and rest:
                    if text:
                        values[by_column[head]][rest] = int(text)
                elif key.startswith("rank") and "." in key:  # rank0.optimizer_state_bytes: a RANK_FIELDS figure
                    rank, name = key.split(".", 1)
                    ranks.setdefault(int(rank.removeprefix("rank")), {})[name] = parse_cell(kinds.get(name, "str"),
                                                                                           text)
                elif key == "config":
                    values["config"] = CellConfig.model_validate_json(text, strict=False)
                elif key == "status":
                    values["status"] = Status(text or "ok")
                elif key in kinds and key != "schema_version":
                    values[key] = parse_cell(kinds[key], text)
            except ValueError as err:
                raise ValueError(f"column {key}: {err}") from None
        if "config" not in values:
            raise ValueError("no column 'config'")
        # a CSV has the rank columns of its most sharded cell: the others' are empty
        values["ranks"] = [ranks[r] for r in sorted(ranks) if any(v is not None for v in ranks[r].values())]
        return cls(**values)


@dataclass(frozen=True)
class StepLog:
    """One optimizer step as the training loop logs it: a row of a cell's steps.csv."""

    step: int
    loss: float
    lr: float
    grad_norm: float  # before clipping
    step_time_s: float  # evaluation excluded
    eval_loss: float | None = None  # on steps with an evaluation


def check_types(values: dict[str, Any]) -> None:
    """Check values read from JSON against the Record's field types: every field without a default present, each
    value of its field's type (an int where a float is, a status by its value); ``config`` is the configuration's
    own model's to validate.

    Raises:
        ValueError: naming the first field that is missing or holds a value of another type.
    """
    hints = get_type_hints(Record)
    for f in fields(Record):
        hint = hints[f.name]
        if f.name not in values:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"no field '{f.name}'")
        elif f.name != "config" and not _fits(values[f.name], hint):
            expected = f"one of {', '.join(m.value for m in hint)}" if _is_enum(hint) else f.type
            raise ValueError(f"{f.name}: {json.dumps(values[f.name], default=str)[:60]} is not {expected}")
        elif f.name.endswith("_bytes") and f.name not in SIGNED_BYTES and _negative(values[f.name]):
            raise ValueError(f"{f.name}: {json.dumps(values[f.name])[:60]} is negative, which no count of bytes is")


def _negative(value: Any) -> bool:
    """A negative count, or a dict of counts holding one."""
    if isinstance(value, dict):
        return any(_negative(v) for v in value.values())
    return isinstance(value, (int, float)) and value < 0


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON is of the type ``hint`` (one of the Record's field types)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is types.UnionType:
        return any(_fits(value, arg) for arg in args)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if hint is Any:
        return True
    if _is_enum(hint):
        return value in [member.value for member in hint]
    if hint is float:
        hint = (int, float)
    # JSON's true and false read as bools, which Python counts as ints: never a count of bytes
    return isinstance(value, hint) and (not isinstance(value, bool) or hint is bool)


def _is_enum(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, enum.Enum)


def parse_cell(type_text: str, text: str) -> Any:
    """A CSV cell's text as the field's type (``int | None``...): '' is None where None is allowed.

    Raises:
        ValueError: text that is not a number where the type is one.
    """
    kind = type_text.split(" ")[0]
    if text == "" and "None" in type_text:
        return None
    if kind in ("int", "float"):
        return int(text) if kind == "int" else float(text)
    return text


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
