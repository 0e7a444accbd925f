"""Optimizers that fail on purpose, for fault-injection tests.

Suites name them through memprof's ``module:Class`` custom-optimizer feature (``faulty:KillSelf``); the worker
imports this module by name, so the test puts this folder on ``PYTHONPATH`` before the zygote starts.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from torch.optim import SGD


class KillSelf(SGD):
    """Says why on stderr, then dies by SIGKILL in its first step, as the kernel's OOM killer would."""

    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        print("faulty: KillSelf sends itself SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class KillZygote(SGD):
    """Kills the process that forked it (memprof's zygote) by SIGKILL in its first step, and dies with it."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        print("faulty: KillZygote sends its zygote SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # the kernel kills this worker with its parent (PR_SET_PDEATHSIG)


class Raise(SGD):
    """Raises a library-style error in its first step."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        raise RuntimeError("faulty: Raise failed in step()\nsecond line of the message")


class Sleep(SGD):
    """Sleeps ``seconds`` in its first step. With ``marker``, it first creates that file (so a test knows the
    cell is running) and does not sleep at all when the file already exists (so a resumed run goes through)."""

    def __init__(self, params, lr: float, seconds: float = 600.0, marker: str = "") -> None:  # noqa: ANN001
        super().__init__(params, lr=lr)
        self.seconds = seconds
        self.marker = Path(marker) if marker else None

    def step(self, closure=None):  # noqa: ANN001, ANN201
        if self.marker is None:
            time.sleep(self.seconds)
        elif not self.marker.exists():
            self.marker.touch()
            time.sleep(self.seconds)
        return super().step(closure)


class KillRankOne(SGD):
    """In a sharded cell: rank 1 dies by SIGKILL in its first step, rank 0 goes on into the next collective."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(closure)
