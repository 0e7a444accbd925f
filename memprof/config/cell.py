"""A Cell: one fully resolved training configuration, the unit the executor runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# The axes a suite's grid may vary, in the order they appear in a cell's key.
AXES: tuple[str, ...] = (
    "model",
    "adapter",
    "optimizer",
    "batch_size",
    "seq_len",
    "grad_accum",
    "precision",
    "lr",
    "schedule",
    "gradient_checkpointing",
    "attn_implementation",
    "parallel",
)
# Axis values that leave a cell's key as it was before the axis existed.
DEFAULT_GRADIENT_CHECKPOINTING = "off"
DEFAULT_ATTN = "sdpa"
NO_PARALLEL = {"strategy": "none", "world_size": 1}
LEVER_DEFAULTS: dict[str, Any] = {"gradient_checkpointing": DEFAULT_GRADIENT_CHECKPOINTING,
                                  "attn_implementation": DEFAULT_ATTN, "parallel": NO_PARALLEL}


def lever_label(gradient_checkpointing: str, attn_implementation: str, strategy: str, world_size: int) -> str:
    """The memory levers pulled away from the defaults, for people ('' for none): ``ckpt eager fsdp2×8``."""
    parts = []
    if gradient_checkpointing != DEFAULT_GRADIENT_CHECKPOINTING:
        parts.append("ckpt" if gradient_checkpointing == "on" else f"ckpt-{gradient_checkpointing}")
    if attn_implementation != DEFAULT_ATTN:
        parts.append(attn_implementation)
    if strategy != "none":
        parts.append(f"{strategy}×{world_size}")
    return " ".join(parts)


@dataclass(frozen=True)
class Cell:
    """Everything a worker needs to build and train one configuration, as plain data.

    ``model_spec``, ``adapter_spec`` and ``data_spec`` are the validated suite tables the names point to,
    so a cell is self-contained and can be sent to another process as JSON.
    """

    suite: str
    index: int
    model: str
    adapter: str
    optimizer: str
    batch_size: int
    seq_len: int
    grad_accum: int
    precision: str
    lr: float
    schedule: str
    optim: str
    steps: int
    warmup_steps: int
    lr_warmup_steps: int
    seed: int
    repeat: int
    device: str
    timeout_s: float
    memory_budget_bytes: int
    max_grad_norm: float
    model_spec: dict[str, Any] = field(default_factory=dict)
    adapter_spec: dict[str, Any] = field(default_factory=dict)
    optim_kwargs: dict[str, Any] = field(default_factory=dict)
    data_spec: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0
    eval_batches: int = 4
    target_loss: float | None = None
    schedule_kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: str = DEFAULT_GRADIENT_CHECKPOINTING  # off | on (non-reentrant) | reentrant
    attn_implementation: str = DEFAULT_ATTN  # eager | sdpa | flash_attention_2
    parallel: dict[str, Any] = field(default_factory=lambda: dict(NO_PARALLEL))  # strategy, world_size

    @property
    def key(self) -> str:
        """Human-readable configuration key; the same configuration gives the same key in any run."""
        parts = [
            self.model,
            self.adapter,
            self.optimizer,
            f"b{self.batch_size}",
            f"s{self.seq_len}",
            f"ga{self.grad_accum}",
            self.precision,
            f"lr{self.lr:g}",
            self.schedule,
            f"seed{self.seed}",
        ]
        if self.gradient_checkpointing != DEFAULT_GRADIENT_CHECKPOINTING:
            parts.append("gc" if self.gradient_checkpointing == "on" else f"gc-{self.gradient_checkpointing}")
        if self.attn_implementation != DEFAULT_ATTN:
            parts.append(self.attn_implementation)
        if self.world_size > 1 or self.strategy != "none":
            parts.append(f"{self.strategy}x{self.world_size}")
        return "/".join(parts)

    @property
    def levers(self) -> str:
        return lever_label(self.gradient_checkpointing, self.attn_implementation, self.strategy, self.world_size)

    @property
    def strategy(self) -> str:
        """How the ranks share the work: none, ddp, zero1 or fsdp2."""
        return str(self.parallel.get("strategy", "none"))

    @property
    def world_size(self) -> int:
        return int(self.parallel.get("world_size", 1))

    @property
    def config_hash(self) -> str:
        """Hash of every field that defines the measurement (not the index or the suite name). Lever axes at
        their defaults stay out, so the hashes of cells from before those axes existed do not change."""
        data = self.to_dict()
        for name in ("index", "suite", "timeout_s"):
            data.pop(name)
        for name, default in LEVER_DEFAULTS.items():
            if data[name] == default:
                data.pop(name)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(**data)
