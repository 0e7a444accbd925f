"""Executors: submit a cell, get back its CellResult. The local one runs each cell in a fresh forked process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


class LocalExecutor:
    """Runs cells one at a time, each in its own process forked from a zygote that pre-imported the libraries.

    The zygote starts in the background at construction (its imports overlap with whatever the caller does
    next) in its own session, so a terminal's Ctrl-C reaches only us; ``interrupt`` forwards it to the cell.
    """

    def __init__(self, log_dir: Path, sample_interval_s: float = 0.01) -> None:
        self.log_dir = log_dir
        self.sample_interval_s = sample_interval_s
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(log_dir / "zygote.log", "ab")
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
            raise ZygoteDied(f"the worker zygote exited (code {self._proc.wait()}); see {self.log_dir / 'zygote.log'}")
        return json.loads(line)

    def wait_ready(self) -> None:
        if not self._ready:
            hello = self._read()
            self.has_cuda = bool(hello.get("cuda"))
            self._ready = True

    def run(self, cell: Cell) -> CellResult:
        self.wait_ready()
        t0 = time.perf_counter()
        log = self.log_dir / f"cell-{cell.index:04d}.log"
        request = {"cell": cell.to_dict(), "log": str(log.resolve()), "sample_interval_s": self.sample_interval_s}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        result = CellResult.from_dict(self._read())
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
        self._log.close()
