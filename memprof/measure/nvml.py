"""NVML: device memory in use, and this process's share where the driver reports it.

Absent NVML or no GPU, ``open_nvml`` returns None and the columns stay empty. In some containers NVML lists
processes by host PID: then this process is not found and its column stays empty (the device figure still counts).
"""

from __future__ import annotations

import os
from collections.abc import Callable


def open_nvml(index: int) -> tuple[Callable[[], tuple[int, int | None]], str] | None:
    """A reader of (device used bytes, this process's used bytes or None) and the device name, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML here"
        return None
    pid = os.getpid()

    def read() -> tuple[int, int | None]:
        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return used, int(proc.usedGpuMemory)
        return used, None

    return read, name if isinstance(name, str) else name.decode()
