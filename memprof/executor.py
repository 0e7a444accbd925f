"""Executors: submit a cell, get back its CellResult. The local one runs each cell in a fresh forked process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from memprof.cell import Cell
from memprof.record import CellResult


class Executor(Protocol):
    def run(self, cell: Cell) -> CellResult: ...

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
    copied to ``zygote.log`` there on ``close``.
    """

    def __init__(self, log_dir: Path | None = None, sample_interval_s: float = 0.01) -> None:
        self.log_dir: Path | None = None
        self.sample_interval_s = sample_interval_s
        self._log = tempfile.TemporaryFile()
        if log_dir is not None:
            self.log_to(log_dir)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "memprof.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, start_new_session=True, text=True, bufsize=1,
            env={**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")})
        self._ready = False
        self.has_cuda: bool | None = None

    def _read(self) -> dict:
        # Blocks in read(2) until the zygote answers: the parent takes no CPU while a cell trains.
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self._log.seek(0)
            tail = " | ".join(self._log.read().decode("utf-8", "replace").strip().splitlines()[-5:])
            raise ZygoteDied(f"the worker zygote exited (code {code}): {tail}")
        return json.loads(line)

    def log_to(self, log_dir: Path) -> None:
        """Write the cells' logs into ``log_dir`` (created) from now on."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir

    def wait_ready(self) -> None:
        if not self._ready:
            hello = self._read()
            self.has_cuda = bool(hello.get("cuda"))
            self._ready = True

    def preflight(self, pairs: list[dict]) -> list[dict[str, str]]:
        """The problems ``memprof.preflight.check_all`` finds in these (model, adapter) pairs.

        Raises:
            PreflightFailed: the checking process died or hung (the reason is the message).
        """
        self.wait_ready()
        fd, log = tempfile.mkstemp(prefix="memprof-preflight-", suffix=".log")
        os.close(fd)
        try:
            answer = self._ask({"preflight": pairs, "log": log})
        finally:
            os.unlink(log)
        if "failed" in answer:
            raise PreflightFailed(answer["failed"])
        return answer["problems"]

    def _ask(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def run(self, cell: Cell) -> CellResult:
        if self.log_dir is None:
            raise RuntimeError("LocalExecutor.run before log_to: the cell's log has nowhere to go")
        self.wait_ready()
        t0 = time.perf_counter()
        log = self.log_dir / f"cell-{cell.index:04d}.log"
        request = {"cell": cell.to_dict(), "log": str(log.resolve()), "sample_interval_s": self.sample_interval_s}
        result = CellResult.from_dict(self._ask(request))
        result.record = replace(result.record, harness_wall_s=time.perf_counter() - t0)
        return result

    def interrupt(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)

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
