"""Run a suite's cells as tasks on a Ray cluster (``memprof run SUITE --executor ray``).

Each cell is one Ray task, never retried, asking for one GPU per rank when the cluster has GPUs (and the cell
may use them), and ``CPUS_PER_RANK`` core per rank (a cell has ``world_size`` ranks, one unless it is sharded).
Inside the Ray worker the cell runs exactly as it does locally: in a
process forked from a zygote (``memprof.run.executor.LocalExecutor``) that the worker starts for its first cell and
keeps for the next ones, so the libraries are imported once per Ray worker. The Ray worker never touches CUDA
itself (the zygote refuses to fork after that), which is why GPU tasks may reuse their worker (``max_calls=0``).

The driver writes every result into its own results folder as local runs do; the cell's log travels back with
its result. If the Ray worker dies mid-cell, the cell's process goes with it (the zygote sees its stdin close
and kills it; a zygote killed by its exiting worker takes it along through ``PR_SET_PDEATHSIG``), and the cell
is recorded as ``crashed`` (``oom`` when Ray's memory monitor killed it), without the host or GPU: Ray does not
say where a dead task ran.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from memprof.config.spec import CellConfig
from memprof.errors import UserError, one_line
from memprof.results.record import CellResult, Record, Status
from memprof.run.executor import LocalExecutor, OnStep, PreflightFailed, threads_env
from memprof.run.messages import CellDone, Problem

try:
    import ray
except ImportError:  # an optional extra: RayPool says how to install it
    ray = None  # type: ignore[assignment]

# One core and one torch thread per rank: on the CPU a node runs as many ranks as it has cores and none
# oversubscribes them (the records' concurrent_jobs says how many cells ran at once, as for --jobs).
CPUS_PER_RANK = 1
LOG_TAIL_BYTES = 1 << 20

_worker: tuple[tuple[str | None, int, float | None], LocalExecutor] | None = None


def run_cell_task(cell: CellConfig, threads: int, sample_interval_s: float | None) -> CellDone:
    """A Ray task: one cell in a process forked from this worker's zygote; its result and the tail of its log."""
    executor = _worker_executor(threads, sample_interval_s)
    log = executor.log_path(cell)
    try:
        result = executor.run(cell)
    except BaseException:
        _close_worker_executor()  # a zygote left mid-answer cannot take the next cell
        raise
    result.record = replace(result.record, host=socket.gethostname(),
                            visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return CellDone(result, log.name, _take_tail(log))


def run_preflight_task(cells: list[CellConfig], sample_interval_s: float | None) -> list[Problem]:
    """A Ray task: the suite's model checks (``LocalExecutor.preflight``), by this worker's zygote."""
    try:
        return _worker_executor(CPUS_PER_RANK, sample_interval_s).preflight(cells)
    except PreflightFailed:
        raise  # the zygote answered: it can take the cells
    except BaseException:
        _close_worker_executor()
        raise


def _worker_executor(threads: int, sample_interval_s: float | None) -> LocalExecutor:
    """This Ray worker's zygote; a new one when this task has other GPUs (Ray sets ``CUDA_VISIBLE_DEVICES`` per
    task) or cores than the zygote was started with."""
    global _worker
    key = (os.environ.get("CUDA_VISIBLE_DEVICES"), threads, sample_interval_s)
    if _worker is not None and _worker[0] != key:
        _close_worker_executor()
    if _worker is None:
        executor = LocalExecutor(Path(tempfile.mkdtemp(prefix="memprof-ray-")), sample_interval_s,
                                 env=threads_env(threads))
        _worker = (key, executor)
    return _worker[1]


def _close_worker_executor() -> None:
    global _worker
    if _worker is not None:
        executor = _worker[1]
        _worker = None
        executor.close()
        if executor.log_dir is not None:
            shutil.rmtree(executor.log_dir, ignore_errors=True)


def _take_tail(log: Path) -> str:
    """The last ``LOG_TAIL_BYTES`` of the log (deleted: the driver keeps the copy)."""
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
        log.unlink()
    except OSError:
        return ""
    cut = f"[first {size - LOG_TAIL_BYTES} bytes left out]\n" if size > LOG_TAIL_BYTES else ""
    return cut + data.decode("utf-8", "replace")


def require_ray() -> None:
    """Raises ``UserError`` where Ray, an optional extra, is not installed."""
    if ray is None:
        raise UserError("--executor", 'ray is not installed: pip install "memprof[ray]"')


class RayPool:
    """Cells as Ray tasks, behind the interface of ``LocalPool`` (the runner does not care which it has).

    The suite's model checks (``preflight``) run on the cluster too, as one CPU task: they then see the
    libraries and local checkpoints the cells will use, the driver never imports torch, and the zygote they
    start is the one the worker's first cell reuses. ``address`` goes to ``ray.init`` (``auto``,
    ``ray://head:10001``, ``host:port``; None: ``RAY_ADDRESS`` or a new local Ray instance); when this process
    is already connected, that connection is used and kept.
    """

    def __init__(self, address: str | None = None, sample_interval_s: float | None = None) -> None:
        require_ray()
        self.sample_interval_s = sample_interval_s
        self.log_dir: Path | None = None
        self._refs: dict[ray.ObjectRef, tuple[CellConfig, int]] = {}
        self._checking: ray.ObjectRef | None = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, ValueError) as err:
                raise UserError("--address", f"cannot connect to Ray at {address or 'a new local instance'}: "
                                f"{' '.join(str(err).split())}") from None
        self._task = ray.remote(max_retries=0, max_calls=0)(run_cell_task)
        self._check = ray.remote(max_retries=0, max_calls=0, num_cpus=CPUS_PER_RANK)(run_preflight_task)

    def preflight(self, cells: list[CellConfig]) -> list[Problem]:
        """The problems ``memprof.run.preflight.check_all`` finds, checked by a Ray worker (see the class).

        Raises:
            PreflightFailed: the checking process died or hung, or ``interrupt`` cancelled the checks.
        """
        self._checking = self._check.options(name="memprof preflight").remote(cells, self.sample_interval_s)
        try:
            return ray.get(self._checking)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, PreflightFailed):
                raise PreflightFailed(str(err.cause)) from None
            raise PreflightFailed("the Ray task failed: " + one_line(err.cause or err)) from None
        except ray.exceptions.RayError as err:
            raise PreflightFailed(one_line(err)) from None
        finally:
            self._checking = None

    def log_to(self, log_dir: Path) -> None:
        """Write the cells' logs, brought back from the workers, into ``log_dir`` (created)."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir

    def run_all(self, cells: list[CellConfig], stopping: Callable[[], bool],
                on_step: OnStep | None = None) -> Iterator[CellResult]:
        """Results in the order the tasks end. Every cell is submitted at once: Ray queues what it cannot start.
        Ray brings a cell back whole, so ``on_step`` hears nothing.

        A task whose worker died is a ``crashed`` record (``oom`` if Ray's memory monitor killed it); once
        ``stopping()`` is true, cancelled cells are not recorded (``--resume`` runs them).
        """
        resources = ray.cluster_resources()
        for cell in cells:
            if stopping():
                break
            self._submit(cell, resources)
        while self._refs:
            (ref,), _ = ray.wait(list(self._refs), num_returns=1)  # blocks until a task ends: no polling
            cell, concurrent = self._refs.pop(ref)
            result = self._collect(ref, cell, stopping())
            if result is not None:  # as many at once as the cluster runs, or as there are cells
                result.record = replace(result.record, concurrent_jobs=min(concurrent, len(cells)))
                yield result

    def _submit(self, cell: CellConfig, resources: dict[str, float]) -> None:
        """One task for the cell; remembers how many such tasks the cluster runs at once."""
        ranks = cell.levers.parallel.world_size
        gpus = ranks if resources.get("GPU", 0) >= 1 and cell.budget.device != "cpu" else 0
        cpus = CPUS_PER_RANK * ranks
        concurrent = int(resources["GPU"] // gpus) if gpus else int(resources.get("CPU", cpus) // cpus)
        ref = self._task.options(name=f"memprof cell {cell.index}", num_gpus=gpus, num_cpus=cpus).remote(
            cell, cpus, self.sample_interval_s)
        self._refs[ref] = (cell, max(1, concurrent))

    def _collect(self, ref: ray.ObjectRef, cell: CellConfig, stopping: bool) -> CellResult | None:
        """The task's result, or the Record of its failure; None for a task that ended because we stopped."""
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError as err:
            if stopping:
                return None
            status, error = _failure(err)
            return CellResult(Record(cell, status=status, error=error))
        if self.log_dir is not None:
            (self.log_dir / answer.log_name).write_text(answer.log, encoding="utf-8")
        return answer.result

    def interrupt(self) -> None:
        """Ctrl-C: cancel the model checks and every task not collected yet. A running task is cancelled by
        killing its Ray worker (a task blocked on its cell never sees a gentler cancel), and its cell's process
        dies with it (see the module's docstring)."""
        for ref in [self._checking, *self._refs]:
            if ref is not None:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        self.interrupt()
        self._refs.clear()
        if self._owns_ray:
            ray.shutdown()


def _failure(err: Exception) -> tuple[Status, str]:
    """The status and one-line error of a task that brought back no result."""
    if isinstance(err, ray.exceptions.RayTaskError):
        return Status.CRASHED, "the Ray task failed: " + one_line(err.cause or err)
    status = Status.OOM if isinstance(err, ray.exceptions.OutOfMemoryError) else Status.CRASHED
    return status, "the Ray worker running the cell died: " + one_line(err)
