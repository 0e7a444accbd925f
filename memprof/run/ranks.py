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
import signal
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from memprof.config.cell import Cell
from memprof.results.record import RANK_FIELDS, CellResult, Record, Status
from memprof.run.zygote import die_with


def run_ranks(cell: Cell, sample_interval_s: float) -> CellResult:
    """Run ``cell`` on ``cell.world_size`` ranks and merge their records; a rank that dies takes the others down
    and makes the cell ``crashed``."""
    with tempfile.TemporaryDirectory(prefix="memprof-ranks-") as tmp:
        rendezvous = Path(tmp) / "rendezvous"
        pids, launcher = {}, os.getpid()
        for rank in range(cell.world_size):
            pid = os.fork()
            if pid == 0:
                die_with(launcher)  # a rank outliving its cell would wait in a collective until the timeout
                _rank_child(cell, rank, rendezvous, Path(tmp) / f"rank{rank}.json", sample_interval_s)
            pids[pid] = rank
        codes = _join(pids)
        results: dict[int, CellResult] = {}
        for rank in range(cell.world_size):
            path = Path(tmp) / f"rank{rank}.json"
            if path.exists():
                results[rank] = CellResult.from_dict(json.loads(path.read_text()))
    return merge(cell, results, codes)


def _join(pids: dict[int, int]) -> dict[int, int]:
    """Wait for every rank (blocking). When one exits abnormally the rest could only hang in a collective, so
    they are killed. Returns each rank's wait status, in the order the ranks exited."""
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        try:
            pid, status = os.wait()
        except KeyboardInterrupt:  # the ranks got the same Ctrl-C and finish with an 'interrupted' record
            continue
        if pid not in pids:
            continue
        codes[pids[pid]] = status
        if status != 0:
            for other, rank in pids.items():
                if rank not in codes:
                    _kill(other)
    return codes


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rank_child(cell: Cell, rank: int, rendezvous: Path, out: Path, sample_interval_s: float) -> None:
    code = 0
    try:
        import torch.distributed as dist

        from memprof.run.worker import measure_cell

        cuda = cell.device != "cpu" and torch.cuda.device_count() > 0
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if not cuda:  # the ranks share the cell's cores
            torch.set_num_threads(max(1, torch.get_num_threads() // cell.world_size))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=cell.world_size, timeout=timedelta(seconds=cell.timeout_s))
        try:
            result = measure_cell(cell, device, sample_interval_s)
        finally:
            dist.destroy_process_group()
        out.write_text(json.dumps(result.to_dict(), default=str))
        if result.record.status is not Status.OK:
            code = 3  # the others would wait in a collective until the timeout: the launcher stops them
    except BaseException:  # noqa: BLE001 - the launcher records a crash from our exit code
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        os._exit(code)


def merge(cell: Cell, results: dict[int, CellResult], codes: dict[int, int]) -> CellResult:
    """One record for the cell: each memory figure the max over ranks, every rank's figures kept in ``ranks``.
    The first rank to fail (``codes`` is in exit order) gives the status and the base record (else rank 0)."""
    failed = [r for r, status in codes.items() if status != 0]
    base = failed[0] if failed else 0
    if base not in results:
        return CellResult(Record.for_cell(cell, status=Status.CRASHED, error=_why(base, codes.get(base))))
    ranks = [{name: getattr(results[r].record, name) for name in RANK_FIELDS} if r in results else {}
             for r in range(cell.world_size)]
    values: dict[str, Any] = {}
    for name in RANK_FIELDS:
        figures = [f[name] for f in ranks if f.get(name) is not None]
        if figures and name != "step_time_median_s":
            values[name] = max(figures)
    record = replace(results[base].record, ranks=ranks, **values)
    if failed:
        record = replace(record, error=f"rank {base}: {record.error}")
    return CellResult(record, results[base].steps, results[base].timeline)


def _why(rank: int, status: int | None) -> str:
    if status is None:
        return f"rank {rank} left no result"
    if os.WIFSIGNALED(status):
        return f"rank {rank} was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"rank {rank} exited with code {os.WEXITSTATUS(status)} (its traceback is in the cell's log)"
