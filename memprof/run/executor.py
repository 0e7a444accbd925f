"""Executors: submit a cell, get back its CellResult. The local one runs each cell in a fresh process forked by a
zygote (``memprof.run.zygote``), speaking ``memprof.run.messages`` with it."""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from memprof.config.spec import CellConfig
from memprof.errors import UserError
from memprof.results.env import nvml_cards
from memprof.results.record import CellResult, Record, Status
from memprof.run.messages import CellDone, CheckModels, Hello, Message, ModelsChecked, Problem, RunCell, StepDone, \
    decode, encode

OnStep = Callable[[StepDone], None]


class Pool(Protocol):
    """What the runner drives: local processes (``LocalPool``) or a Ray cluster (``memprof.run.ray_pool``)."""

    def preflight(self, cells: list[CellConfig]) -> list[Problem]: ...

    def log_to(self, log_dir: Path) -> None: ...

    def run_all(self, cells: list[CellConfig], stopping: Callable[[], bool],
                on_step: OnStep | None = None) -> Iterator[CellResult]: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


class ZygoteDied(RuntimeError):
    """The zygote process itself went away (not a cell fault: the harness cannot go on)."""


class PreflightFailed(RuntimeError):
    """The process checking a suite's models died or hung, so the checks have no answer."""


class LocalExecutor:
    """Runs cells one at a time, each in its own process forked from a zygote that pre-imported the libraries.

    The zygote starts in the background at construction (its imports overlap with whatever the caller does
    next) in its own session, so a terminal's Ctrl-C reaches only us; ``interrupt`` forwards it to the cell.
    Nothing is written to disk before ``log_to`` names the logs folder (the runner checks the suite first and
    creates no results folder for a suite it refuses); the zygote's own stderr is kept in a temporary file and
    copied to ``zygote.log`` there on ``close``. A zygote that dies while a cell runs takes the cell's worker with
    it (``processes.die_with``): that cell is a crashed result, and the next cell starts a new zygote.
    """

    def __init__(self, log_dir: Path | None = None, sample_interval_s: float | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_dir: Path | None = None
        self.sample_interval_s = sample_interval_s
        self._log = tempfile.TemporaryFile()
        if log_dir is not None:
            self.log_to(log_dir)
        self._env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore"), **(env or {})}
        self._start()
        self.has_cuda: bool | None = None
        self._interrupted = False

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "memprof.run.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, start_new_session=True, text=True, bufsize=1, env=self._env)
        self._ready = False

    def _read(self) -> Message:
        # Blocks in read(2) until the zygote answers: the parent takes no CPU while a cell trains.
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self._log.seek(0)
            tail = " | ".join(self._log.read().decode("utf-8", "replace").strip().splitlines()[-5:])
            raise ZygoteDied(f"the worker zygote exited (code {code}): {tail}")
        return decode(line)

    def log_to(self, log_dir: Path) -> None:
        """Write the cells' logs into ``log_dir`` (created) from now on."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir

    def wait_ready(self) -> None:
        """Wait for the zygote's Hello (starting a new one where the last died).

        Raises:
            ZygoteDied: it did not start (the harness, not a cell, failed).
        """
        if self._ready and self._proc.poll() is not None:  # it died after a cell it ran
            self._start()
        if not self._ready:
            hello = self._read()
            if not isinstance(hello, Hello):
                raise ZygoteDied(f"the worker zygote said {type(hello).__name__} before Hello")
            self.has_cuda = hello.cuda
            self._ready = True

    def ready_unless_interrupted(self) -> bool:
        """``wait_ready``; False where ``interrupt`` came first and the zygote died of it (one still importing is
        killed) instead of saying Hello.

        Raises:
            ZygoteDied: it did not start, and no interrupt explains why.
        """
        try:
            self.wait_ready()
        except ZygoteDied:
            if not self._interrupted:
                raise
            return False
        return True

    def preflight(self, cells: list[CellConfig]) -> list[Problem]:
        """The problems ``memprof.run.preflight.check_all`` finds in these cells' models and adapters.

        Raises:
            PreflightFailed: the checking process died or hung (the reason is the message).
        """
        self.ready_unless_interrupted()
        if self._interrupted:  # Ctrl-C while the zygote imported: the checks would only delay the exit
            raise PreflightFailed("interrupted before the checks")
        fd, log = tempfile.mkstemp(prefix="memprof-preflight-", suffix=".log")
        os.close(fd)
        try:
            self._send(CheckModels(cells, log))
            answer = self._read()
        finally:
            os.unlink(log)
        if not isinstance(answer, ModelsChecked):
            raise ZygoteDied(f"the worker zygote answered the model checks with {type(answer).__name__}")
        if answer.failed:
            raise PreflightFailed(answer.failed)
        return answer.problems

    def _send(self, message: Message) -> None:
        try:
            self._proc.stdin.write(encode(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise ZygoteDied(f"the worker zygote exited (code {self._proc.wait()})") from None

    def log_path(self, cell: CellConfig) -> Path:
        """Where ``run`` writes the cell's log."""
        if self.log_dir is None:
            raise RuntimeError("LocalExecutor.run before log_to: the cell's log has nowhere to go")
        return self.log_dir / f"cell-{cell.index:04d}.log"

    def run(self, cell: CellConfig, on_step: OnStep | None = None) -> CellResult:
        """The cell's result; ``on_step`` hears of each optimizer step as the cell finishes it. A zygote that dies
        meanwhile makes it a crashed cell (interrupted after ``interrupt``).

        Raises:
            ZygoteDied: the zygote did not start.
        """
        log = self.log_path(cell)
        if not self.ready_unless_interrupted():
            return CellResult(Record(cell, status=Status.INTERRUPTED, error="interrupted while its zygote started"))
        t0 = time.perf_counter()
        try:
            result = self._run(cell, log, on_step)
        except ZygoteDied as err:
            self._proc.kill()  # one that answered out of turn; one that exited is reaped already
            self._proc.wait()
            status = Status.INTERRUPTED if self._interrupted else Status.CRASHED
            result = CellResult(Record(cell, status=status, error=f"{err}; the cell's worker died with it"))
        result.record = replace(result.record, harness_wall_s=time.perf_counter() - t0)
        return result

    def _run(self, cell: CellConfig, log: Path, on_step: OnStep | None) -> CellResult:
        self._send(RunCell(cell, str(log.resolve()), self.sample_interval_s))
        while True:
            answer = self._read()
            if isinstance(answer, StepDone):
                if on_step is not None:
                    on_step(answer)
            elif isinstance(answer, CellDone):
                return answer.result
            else:
                raise ZygoteDied(f"the worker zygote answered a cell with {type(answer).__name__}")

    def interrupt(self) -> None:
        """Pass Ctrl-C on to the running cell or model checks; a zygote still importing has nothing to keep and
        goes at once (not after its imports and the checks)."""
        self._interrupted = True
        if self._proc.poll() is None:
            if self._ready:
                self._proc.send_signal(signal.SIGINT)
            else:
                self._proc.kill()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self.log_dir is not None:
            self._log.seek(0)
            with open(self.log_dir / "zygote.log", "ab") as f:
                f.write(self._log.read())
        self._log.close()


def threads_env(threads: int) -> dict[str, str]:
    """The environment that gives a zygote's cells ``threads`` OpenMP/MKL threads."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (``gpu_names``); none without NVML or
    a GPU. Asks no CUDA runtime, so it is safe before forking."""
    return gpu_names(os.environ.get("CUDA_VISIBLE_DEVICES"), len(nvml_cards()))


def gpu_names(inherited: str | None, count: int) -> list[str]:
    """The GPUs a process with ``CUDA_VISIBLE_DEVICES=inherited`` (None: unset) on a host with ``count`` cards may
    use, named as that variable names them: its entries (indices or UUIDs) up to the first invalid one, as CUDA
    reads it, else every card's index."""
    if not count:
        return []
    if inherited is None:
        return [str(i) for i in range(count)]
    names = (name.strip() for name in inherited.split(","))
    return list(itertools.takewhile(lambda name: bool(name) and not name.startswith("-"), names))


class LocalPool:
    """``jobs`` local executors, each with its own zygote, taking cells as they free up.

    On a CUDA host each job is pinned to its own GPU (``CUDA_VISIBLE_DEVICES``), so two cells never share one
    and memory figures stay clean; on the CPU each job gets ``cores // jobs`` threads, and the records say how
    many jobs ran at once (their timings were taken side by side). One job changes nothing in the environment.
    """

    def __init__(self, jobs: int = 1, sample_interval_s: float | None = None) -> None:
        gpus = visible_gpus()
        if gpus and jobs > len(gpus):
            raise UserError("--jobs", f"{jobs} jobs but {len(gpus)} GPU(s): cells never share a GPU")
        cores = os.cpu_count() or 1
        if not gpus and jobs > cores:  # each job's zygote holds the libraries (~0.5 GB) and each cell a core
            raise UserError("--jobs", f"{jobs} jobs but {cores} CPU cores: cells never share a core")
        self.jobs = jobs
        self.envs = [self._env(i, gpus) for i in range(jobs)]
        self.executors = [LocalExecutor(sample_interval_s=sample_interval_s, env=env) for env in self.envs]

    def _env(self, index: int, gpus: list[str]) -> dict[str, str]:
        if self.jobs == 1:
            return {}
        if gpus:
            return {"CUDA_VISIBLE_DEVICES": gpus[index]}
        return threads_env((os.cpu_count() or 1) // self.jobs)

    def preflight(self, cells: list[CellConfig]) -> list[Problem]:
        return self.executors[0].preflight(cells)

    def log_to(self, log_dir: Path) -> None:
        for executor in self.executors:
            executor.log_to(log_dir)

    def run_all(self, cells: list[CellConfig], stopping: Callable[[], bool],
                on_step: OnStep | None = None) -> Iterator[CellResult]:
        """Results in the order cells finish. A job takes no new cell once ``stopping()`` is true; ``on_step``
        hears of every cell's steps (from the jobs' threads).

        Raises:
            ZygoteDied: a job's zygote died (the harness, not a cell, failed).
        """
        todo: queue.SimpleQueue[CellConfig] = queue.SimpleQueue()
        for cell in cells:
            todo.put(cell)
        done: queue.SimpleQueue[CellResult | BaseException | None] = queue.SimpleQueue()

        def work(executor: LocalExecutor, env: dict[str, str]) -> None:
            try:
                while not stopping():
                    try:
                        cell = todo.get_nowait()
                    except queue.Empty:
                        break
                    result = executor.run(cell, on_step)
                    result.record = replace(result.record, concurrent_jobs=min(self.jobs, len(cells)),
                                            visible_devices=env.get("CUDA_VISIBLE_DEVICES", ""))
                    done.put(result)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                done.put(err)
            finally:
                done.put(None)

        threads = [threading.Thread(target=work, args=pair, daemon=True) for pair in zip(self.executors, self.envs)]
        for thread in threads:
            thread.start()
        running = len(threads)
        while running:
            item = done.get()  # blocks: no polling while cells train
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    def interrupt(self) -> None:
        for executor in self.executors:
            executor.interrupt()

    def close(self) -> None:
        for executor in self.executors:
            executor.close()
