"""Launch a sharded cell's ranks: fork one process per rank, join them in a process group, merge their results.

Each rank runs the cell's ordinary measured training (``memprof.run.worker.measure_cell``) on its own device, after
``torch.distributed`` joins it to the others (``gloo`` on the CPU, ``nccl`` on GPUs; a file rendezvous, so no
port is needed). The cell's record holds every rank's figures and, as its headline, the max over ranks: the
rank that must fit is the fullest one, and a sum would describe no device.

Forking is safe here for the same reason the zygote's is: the cell's process has computed nothing yet.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from memprof.config.spec import CellConfig
from memprof.results.record import RANK_FIELDS, CellResult, Record, Status
from memprof.run import processes
from memprof.run.worker import measure_cell

EXIT_CELL_FAILED = 3  # a rank whose cell did not end ok: the others would wait in a collective until the timeout


def run_ranks(cell: CellConfig, sample_interval_s: float | None,
              on_step: Callable[[int, float], None] | None = None) -> CellResult:
    """Run ``cell`` on ``world_size`` ranks and merge their records; a rank that dies takes the others down and
    makes the cell ``crashed``. Rank 0 reports its steps to ``on_step``."""
    world_size = cell.levers.parallel.world_size
    missing = missing_ranks(cell)
    if missing:
        return CellResult(Record(cell, status=Status.UNAVAILABLE, error=missing))
    with tempfile.TemporaryDirectory(prefix="memprof-ranks-") as tmp:
        rendezvous = Path(tmp) / "rendezvous"
        pids = {}
        for rank in range(world_size):
            out = Path(tmp) / f"rank{rank}.json"
            report = on_step if rank == 0 else None
            pid = processes.fork(lambda rank=rank, out=out, report=report:
                                 _rank(cell, rank, rendezvous, out, sample_interval_s, report))
            pids[pid] = rank
        codes = _join(pids)
        results: dict[int, CellResult] = {}
        for rank in range(world_size):
            path = Path(tmp) / f"rank{rank}.json"
            if path.exists():
                results[rank] = CellResult.from_dict(json.loads(path.read_text()))
    return merge(cell, results, codes)


def missing_ranks(cell: CellConfig) -> str:
    """Why this machine cannot run the cell's ranks ('' where it can): each rank is a process of its own, on a GPU
    of its own on CUDA, and on the CPU on a core of its own at most (ranks beyond the cores would only multiply the
    memory and slow every rank)."""
    world_size = cell.levers.parallel.world_size
    gpus = torch.cuda.device_count() if cell.budget.device != "cpu" else 0  # NVML's count: CUDA left uninitialised
    have, what = (gpus, "GPUs") if gpus else (len(os.sched_getaffinity(0)), "CPU cores")
    if world_size <= have:
        return ""
    return (f"{cell.levers.parallel.strategy}×{world_size} needs {world_size} ranks, one per device: this machine "
            f"has {have} {what}")


def _join(pids: dict[int, int]) -> dict[int, int]:
    """Wait for every rank (blocking). When one exits abnormally the rest could only hang in a collective, so
    they are killed. Returns each rank's exit code (negative: a signal), in the order the ranks exited."""
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        try:
            pid, status = os.wait()
        except KeyboardInterrupt:  # the ranks got the same Ctrl-C and finish with an 'interrupted' record
            continue
        if pid not in pids:
            continue
        codes[pids[pid]] = os.waitstatus_to_exitcode(status)
        if status != 0:
            for other, rank in pids.items():
                if rank not in codes:
                    processes.kill(other)
    return codes


def _rank(cell: CellConfig, rank: int, rendezvous: Path, out: Path, sample_interval_s: float | None,
          on_step: Callable[[int, float], None] | None) -> int:
    import torch.distributed as dist

    world_size = cell.levers.parallel.world_size
    cuda = cell.budget.device != "cpu" and torch.cuda.device_count() > 0
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:  # NCCL, and whatever later uses the current device (transformers' TrainingArguments), on this card
        torch.cuda.set_device(device)
    else:  # the ranks share the cell's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=cell.budget.timeout_s))
    try:
        result = measure_cell(cell, device, sample_interval_s, on_step)
    finally:
        dist.destroy_process_group()
    out.write_text(json.dumps(result.to_dict(), default=str))
    return 0 if result.record.status is Status.OK else EXIT_CELL_FAILED


# A rank's figures of its own peak that ``ranks`` does not keep apart, besides its RANK_FIELDS
PEAK_FIELDS = ("peak_reserved_bytes", "num_alloc_retries", "num_ooms", "phase_peak_allocated_bytes",
               "nvml_peak_device_used_bytes", "nvml_peak_process_used_bytes", "peak_phase", "peak_moment", "breakdown",
               "allocator_cache_bytes", "non_pytorch_bytes", "heap_free_delta_bytes")
# A rank's host figures, from the rank whose host memory rose most, so that they give the record's
# peak_rss_delta_bytes (the max over ranks). On the CPU that rank is the fullest; on CUDA it may be another.
HOST_FIELDS = ("rss_baseline_bytes", "peak_rss_bytes")


def merge(cell: CellConfig, results: dict[int, CellResult], codes: dict[int, int]) -> CellResult:
    """One record for the cell: each memory figure the max over ranks, every rank's figures kept in ``ranks``, and
    the rest of its peak (``PEAK_FIELDS``: its parts, the allocator's and NVML's figures, the free heap) the fullest
    rank's, so that its parts sum to the headline peak; its host RSS (``HOST_FIELDS``) that of the rank whose RSS
    rose most. The first rank to fail (``codes`` is in exit order) gives the status and the base record (else rank
    0: losses and steps, one stream of batches)."""
    failed = [r for r, code in codes.items() if code != 0]
    base = failed[0] if failed else 0
    if base not in results:
        return CellResult(Record(cell, status=Status.CRASHED, error=_why(base, codes.get(base))))
    world_size = cell.levers.parallel.world_size
    ranks = [{name: getattr(results[r].record, name) for name in RANK_FIELDS} if r in results else {}
             for r in range(world_size)]
    values: dict[str, Any] = {}
    for name in RANK_FIELDS:
        figures = [f[name] for f in ranks if f.get(name) is not None]
        if figures and name != "step_time_median_s":
            values[name] = max(figures)
    if not failed:  # the rank with the highest peak (the lowest of equals)
        fullest = results[max(results, key=lambda r: (results[r].record.peak_bytes or 0, -r))].record
        values.update({name: getattr(fullest, name) for name in PEAK_FIELDS})
        host = results[max(results, key=lambda r: (results[r].record.peak_rss_delta_bytes or 0, -r))].record
        values.update({name: getattr(host, name) for name in HOST_FIELDS})
    record = replace(results[base].record, ranks=ranks, **values)
    if failed:
        record = replace(record, error=f"rank {base}: {record.error}")
    return CellResult(record, results[base].steps, results[base].timeline)


def _why(rank: int, code: int | None) -> str:
    if code is None:
        return f"rank {rank} left no result"
    if code == processes.EXIT_EXCEPTION:
        return f"rank {rank} {processes.describe_exit(code)} (its traceback is in the cell's log)"
    return f"rank {rank} {processes.describe_exit(code)}"
