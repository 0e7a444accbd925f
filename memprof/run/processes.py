"""Process plumbing shared by the zygote, the rank launcher and the commands that drive workers: fork a child that
dies with its parent, kill it quietly, say how it ended, read its log's tail, cap its address space, catch Ctrl-C to
pass it on. Nothing here knows what a cell is."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_EXCEPTION = 70  # a child whose function raised (its traceback is on its stderr)
LOG_TAIL_BYTES = 2000


def fork(child: Callable[[], int]) -> int:
    """Fork a process that runs ``child`` and exits with its return code (``EXIT_EXCEPTION`` if it raised), never
    returning into the caller's code; it dies with this process. Returns the child's pid.

    Forking is safe only before the process computed anything (libgomp is not fork-safe once a parallel op ran)
    and before it initialised CUDA; the zygote and a sharded cell's launcher fork at exactly those moments.

    Raises:
        RuntimeError: this process initialised CUDA (a forked child could not use the GPU).
    """
    torch = sys.modules.get("torch")  # a process that never imported torch never initialised CUDA
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in this process; a forked child could not use the GPU")
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = EXIT_EXCEPTION
    try:
        die_with(parent)
        code = child()
    except BaseException:  # noqa: BLE001 - the parent reads our exit code, the log keeps the traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, even of a SIGKILL that runs no clean-up (a Ray
    worker that exits kills its own children, the zygote, but not their children)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def kill(pid: int, group: bool = False) -> None:
    """SIGKILL a process (or its process group), if it is still there."""
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def describe_exit(code: int) -> str:
    """How a process ended, from ``os.waitstatus_to_exitcode`` (negative: the signal that killed it)."""
    return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def log_tail(path: str | Path, lines: int = 5) -> str:
    """The last non-empty lines of a log, joined on one line ('' when there is none)."""
    try:
        data = Path(path).read_bytes()[-LOG_TAIL_BYTES:]
    except OSError:
        return ""
    text = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])


def cap_address_space(budget_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``budget_bytes`` (a CPU memory budget: an
    allocation beyond it fails, a real OOM); 0 leaves it uncapped."""
    if budget_bytes <= 0:
        return
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            current = int(line.split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (current + budget_bytes, resource.RLIM_INFINITY))
            return


class Interrupts:
    """Ctrl-C and SIGTERM inside a ``with`` block: each calls ``interrupt`` (which passes it on to the workers) and
    sets ``came``, so the block stops when it is ready to; the handlers from before are back after the block."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self.came = False
        self._interrupt = interrupt
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.came = True
        self._interrupt()
