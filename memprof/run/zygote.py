"""The zygote: a process that imports the heavy libraries once, then forks one fresh process per cell.

It speaks ``memprof.run.messages`` as JSON lines: ``Hello`` once its imports are done, then for each ``RunCell``
the cell's ``StepDone`` lines as they come and one ``CellDone``, for each ``CheckModels`` one ``ModelsChecked``. It
imports and never computes (libgomp is not fork-safe once a parallel op ran), and on a CUDA host it imports without
initialising CUDA and refuses to fork once CUDA was initialised (a forked child could not use the GPU).

A cell's process that dies (signal, ``os._exit``) or runs past its timeout leaves no result; the zygote writes its
Record (``crashed`` with the exit status and stderr tail, ``timeout``, or ``interrupted`` when it died of the
Ctrl-C it was sent) instead. When the executor goes away (its end of stdin closes, even mid-cell after a
``kill -9``), the zygote kills the running cell and exits, and a cell whose zygote dies is killed by the kernel
(``memprof.run.processes.die_with``): nothing keeps computing for a run nobody records.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from memprof.run import processes
from memprof.run.messages import (CellDone, CheckModels, Hello, Message, ModelsChecked, RunCell, StepDone, decode,
                                  encode)

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

PREFLIGHT_TIMEOUT_S = 600.0
_child_pid = 0
_interrupted = False


LEAN = "MEMPROF_ZYGOTE_LEAN"  # set: on a CUDA host, preload only torch and transformers


def preload() -> bool:
    """Import what every cell needs; return whether this host has a CUDA device.

    On a CUDA host bitsandbytes asks torch for each card's compute capability at import (peft imports it), and
    torch's answer initialises CUDA, after which no forked cell could use the GPU: during these imports NVML answers
    instead, so cells skip seconds of imports. With ``MEMPROF_ZYGOTE_LEAN`` set, or where NVML cannot say, a CUDA host
    preloads torch and transformers alone (the zygote sets it and starts again when a library initialised CUDA
    anyway)."""
    import torch

    has_cuda = torch.cuda.device_count() > 0  # asks NVML: does not initialise CUDA
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    highest = _highest_capability() if has_cuda and not os.environ.get(LEAN) else None
    if has_cuda and highest is None:
        return has_cuda
    with _capability_answered(highest) if has_cuda else nullcontext():
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        from transformers import Trainer  # noqa: F401

        import memprof.run.launch  # noqa: F401
    return has_cuda


def _highest_capability() -> tuple[int, int] | None:
    """The highest CUDA compute capability among the host's cards, from NVML (None where NVML cannot say)."""
    from memprof.results.env import nvml_cards

    cards = nvml_cards()
    try:
        import pynvml

        return max(tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)) for handle in cards) if cards else None
    except Exception:  # noqa: BLE001 - no answer from NVML: the lean preload
        return None


@contextmanager
def _capability_answered(highest: tuple[int, int]) -> Iterator[None]:
    """``torch.cuda.get_device_capability`` answering ``highest`` inside the block: bitsandbytes asks it only to learn
    that a card exists (it picks its library by the CUDA version)."""
    import torch

    asked = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: highest
    try:
        yield
    finally:
        torch.cuda.get_device_capability = asked


def _child_io(log: str) -> None:
    """A forked process's own process group (Ctrl-C reaches it only through the zygote), default signal
    handling, and its stdout and stderr in its log."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _run_cell(request: RunCell, pipe: Any) -> int:
    from memprof.run.launch import run_cell

    cell = request.cell

    def step_done(step: int, loss: float) -> None:
        pipe.write(encode(StepDone(cell.index, step, cell.training.steps, loss)) + "\n")

    processes.cap_address_space(cell.budget.memory_budget_bytes)
    result = run_cell(cell, request.sample_interval_s, step_done)
    pipe.write(encode(CellDone(result)) + "\n")
    return 0


def _check_models(request: CheckModels, pipe: Any) -> int:
    from memprof.run.preflight import check_all

    pipe.write(encode(ModelsChecked(check_all(request.cells))) + "\n")
    return 0


def _fork(request: RunCell | CheckModels, timeout_s: float,
          forward: Callable[[StepDone], None]) -> tuple[Message | None, int, bool]:
    """Fork a process for the request and wait for it (blocking, never spinning), forwarding its ``StepDone``
    lines as they arrive.

    Returns:
        Its answer (None unless it exited cleanly with one), its exit code (negative: a signal), and whether it ran
        past ``timeout_s`` and was killed.
    """
    global _child_pid, _interrupted
    read_fd, write_fd = os.pipe()
    work = _run_cell if isinstance(request, RunCell) else _check_models

    def child() -> int:
        os.close(read_fd)
        _child_io(request.log)
        with os.fdopen(write_fd, "w", buffering=1) as pipe:
            return work(request, pipe)

    try:
        pid = processes.fork(child)
    except BaseException:  # it refused (CUDA initialised here): the pipe is nobody's
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    _child_pid, _interrupted = pid, False
    deadline = time.monotonic() + timeout_s
    pending, answer, timed_out = b"", None, False
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    # The executor writes nothing while a cell runs, so its end of stdin can only hang up: it went away.
    poller.register(sys.stdin.fileno(), 0)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        events = dict(poller.poll(left * 1000))
        if events.get(sys.stdin.fileno(), 0) & (select.POLLHUP | select.POLLERR):
            processes.kill(pid, group=True)
            os.waitpid(pid, 0)
            sys.exit(0)
        if read_fd not in events:
            continue
        chunk = os.read(read_fd, 1 << 20)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            message = decode(line.decode())
            if isinstance(message, StepDone):
                forward(message)
            else:
                answer = message
    if timed_out:
        processes.kill(pid, group=True)
    os.close(read_fd)
    _, wait_status = os.waitpid(pid, 0)
    _child_pid = 0
    code = os.waitstatus_to_exitcode(wait_status)
    return (answer if code == 0 else None), code, timed_out


def run_request(request: RunCell, forward: Callable[[StepDone], None]) -> CellDone:
    """Run one cell in a forked process; its result, or a fault Record for what it could not write itself."""
    from memprof.results.record import CellResult, Record, Status

    cell = request.cell
    answer, code, timed_out = _fork(request, cell.budget.timeout_s, forward)
    if timed_out:
        status, error = Status.TIMEOUT, f"ran past timeout_s = {cell.budget.timeout_s:g} and was killed"
    elif isinstance(answer, CellDone):
        return answer
    else:
        tail = processes.log_tail(request.log)
        how = processes.describe_exit(code) + (f"; stderr: {tail}" if tail else "")
        status, error = (Status.INTERRUPTED, f"interrupted; worker {how}") if _interrupted else \
            (Status.CRASHED, f"worker {how}")
    exit_code = None if timed_out else code
    return CellDone(CellResult(Record(cell, status=status, error=error, exit_code=exit_code)))


def check_models(request: CheckModels) -> ModelsChecked:
    """Run the suite's model checks in a forked process (see ``memprof.run.preflight``)."""
    answer, code, timed_out = _fork(request, PREFLIGHT_TIMEOUT_S, lambda message: None)
    if isinstance(answer, ModelsChecked):
        return answer
    if timed_out:
        return ModelsChecked(failed=f"the model checks ran past {PREFLIGHT_TIMEOUT_S:g} s")
    tail = processes.log_tail(request.log)
    return ModelsChecked(failed=f"the model checks' process {processes.describe_exit(code)}"
                         + (f"; stderr: {tail}" if tail else ""))


def _forward_interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    if _child_pid:
        _interrupted = True
        try:
            os.kill(_child_pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def _cuda_initialised() -> bool:
    import torch

    return torch.cuda.is_initialized()


def main() -> None:
    # The protocol gets a private copy of stdout; fd 1 then points at stderr so that nothing a library
    # prints can corrupt the protocol stream.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, _forward_interrupt)
    signal.signal(signal.SIGTERM, _forward_interrupt)

    def send(message: Message) -> None:
        protocol.write(encode(message) + "\n")

    has_cuda = preload()
    if has_cuda and _cuda_initialised() and not os.environ.get(LEAN):
        # a library initialised CUDA at import after all: start again, preloading only what does not
        print("memprof: a library initialised CUDA while the zygote preloaded it; restarting it without (cells "
              "import it themselves)", file=sys.stderr)
        os.dup2(protocol.fileno(), 1)  # the executor reads this process's stdout
        os.environ[LEAN] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "memprof.run.zygote"])
    send(Hello(has_cuda))
    for line in sys.stdin:
        if not line.strip():
            continue
        request = decode(line)
        if isinstance(request, CheckModels):
            send(check_models(request))
        elif isinstance(request, RunCell):
            send(run_request(request, send))
        else:
            raise ValueError(f"the zygote takes RunCell and CheckModels, not {type(request).__name__}")


if __name__ == "__main__":
    main()
