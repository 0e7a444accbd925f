"""The zygote: a process that imports the heavy libraries once, then forks one fresh worker per cell.

Protocol (JSON lines): the executor writes ``{"cell": {...}, "log": path, "sample_interval_s": s}`` on stdin;
the zygote answers one ``CellResult`` dict per request on its protocol stream. It imports and never computes
(libgomp is not fork-safe once a parallel op ran), and on a CUDA host it preloads only CUDA-clean modules and
refuses to fork once CUDA was initialised (a forked child could not use the GPU).

A worker that dies (signal, ``os._exit``) or runs past its timeout leaves no result; the zygote writes its
Record (``crashed`` with the exit status and stderr tail, ``timeout``, or ``interrupted`` when it died of the
Ctrl-C it was sent) instead. ``{"preflight": [...]}`` asks for the suite's model checks (``memprof.run.preflight``),
run in a forked process like a cell; the answer is ``{"problems": [...]}`` or ``{"failed": reason}``. When the
executor goes away (its end of stdin closes, even mid-cell after a ``kill -9``), the zygote kills the running
worker and exits, and a worker whose zygote dies is killed by the kernel (``PR_SET_PDEATHSIG``): nothing keeps
computing for a run nobody records.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STDERR_TAIL_BYTES = 2000
PREFLIGHT_TIMEOUT_S = 600.0
_child_pid = 0
_interrupted = False


def preload() -> bool:
    """Import what every worker needs; return whether this host has a CUDA device."""
    import torch

    has_cuda = torch.cuda.device_count() > 0  # asks NVML: does not initialise CUDA
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if not has_cuda:
        # bitsandbytes (and so peft) initialise CUDA at import on a CUDA host: only preload them without one.
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        from transformers import Trainer  # noqa: F401

        import memprof.run.worker  # noqa: F401
    return has_cuda


def memory_budget(budget_bytes: int) -> None:
    """Cap this process's address space at its current size plus ``budget_bytes`` (a CPU memory budget)."""
    if budget_bytes <= 0:
        return
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            current = int(line.split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (current + budget_bytes, resource.RLIM_INFINITY))
            return


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` (the zygote, or a sharded cell's launcher) dies, even
    of a SIGKILL that runs no clean-up (a Ray worker that exits kills its own children, the zygote, but not their
    children)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


def _child(request: dict[str, Any], write_fd: int, zygote: int) -> None:
    die_with(zygote)
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 0
    try:
        if "preflight" in request:
            from memprof.run.preflight import check_all

            answer: dict[str, Any] = {"problems": check_all(request["preflight"])}
        else:
            from memprof.config.cell import Cell
            from memprof.run.worker import run_cell

            cell = Cell.from_dict(request["cell"])
            memory_budget(cell.memory_budget_bytes)
            answer = run_cell(cell, request.get("sample_interval_s", 0.01)).to_dict()
        payload = json.dumps(answer, default=str).encode()
        with os.fdopen(write_fd, "wb") as out:
            out.write(payload)
    except BaseException:  # noqa: BLE001 - the parent records a crash from our exit code
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(request: dict[str, Any], timeout_s: float) -> tuple[bytes | None, int, bool]:
    """Fork a worker for the request and wait for it (blocking, never spinning).

    Returns:
        The worker's answer (None unless it exited cleanly with one), its exit code (negative: a signal), and
        whether it ran past ``timeout_s`` and was killed.
    """
    global _child_pid, _interrupted
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the zygote; refusing to fork")
    read_fd, write_fd = os.pipe()
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(request, write_fd, zygote)
    os.close(write_fd)
    _child_pid, _interrupted = pid, False
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    timed_out = False
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    # The executor writes nothing while a worker runs, so its end of stdin can only hang up: it went away.
    poller.register(sys.stdin.fileno(), 0)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = dict(poller.poll(left * 1000))
        if events.get(sys.stdin.fileno(), 0) & (select.POLLHUP | select.POLLERR):
            _kill_group(pid)
            os.waitpid(pid, 0)
            sys.exit(0)
        if read_fd not in events:
            continue
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    if timed_out:
        _kill_group(pid)
    os.close(read_fd)
    _, wait_status = os.waitpid(pid, 0)
    _child_pid = 0
    code = os.waitstatus_to_exitcode(wait_status)
    return (b"".join(chunks) if chunks and code == 0 else None), code, timed_out


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """Run one cell in a forked worker and return its result dict, or a fault Record the worker could not write."""
    timeout_s = float(request["cell"]["timeout_s"])
    answer, code, timed_out = _fork(request, timeout_s)
    if timed_out:
        return _fault(request, "timeout", f"ran past timeout_s = {timeout_s:g} and was killed", None)
    if answer is not None:
        return json.loads(answer)
    tail = _tail(request["log"])
    how = _how(code) + (f"; stderr: {tail}" if tail else "")
    if _interrupted:
        return _fault(request, "interrupted", f"interrupted; worker {how}", code)
    return _fault(request, "crashed", f"worker {how}", code)


def run_preflight(request: dict[str, Any]) -> dict[str, Any]:
    """Run the suite's model checks in a forked process (see ``memprof.run.preflight``)."""
    answer, code, timed_out = _fork(request, PREFLIGHT_TIMEOUT_S)
    if answer is not None:
        return json.loads(answer)
    if timed_out:
        return {"failed": f"the model checks ran past {PREFLIGHT_TIMEOUT_S:g} s"}
    tail = _tail(request["log"])
    return {"failed": f"the model checks' process {_how(code)}" + (f"; stderr: {tail}" if tail else "")}


def _how(code: int) -> str:
    return f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _fault(request: dict[str, Any], status: str, error: str, exit_code: int | None) -> dict[str, Any]:
    from memprof.config.cell import Cell
    from memprof.results.record import Record, Status

    cell = Cell.from_dict(request["cell"])
    record = Record.for_cell(cell, status=Status(status), error=error, exit_code=exit_code)
    return {"record": record.to_dict(), "steps": [], "timeline": []}


def _tail(path: str) -> str:
    try:
        data = Path(path).read_bytes()[-STDERR_TAIL_BYTES:]
    except OSError:
        return ""
    lines = [line for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return " | ".join(lines[-5:])


def _forward_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    if _child_pid:
        _interrupted = True
        try:
            os.kill(_child_pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def main() -> None:
    # The protocol gets a private copy of stdout; fd 1 then points at stderr so that nothing a library
    # prints can corrupt the protocol stream.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, _forward_interrupt)
    signal.signal(signal.SIGTERM, _forward_interrupt)
    has_cuda = preload()
    protocol.write(json.dumps({"ready": True, "cuda": has_cuda}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        result = run_preflight(request) if "preflight" in request else run_request(request)
        protocol.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    main()
