"""NVML: device memory in use, and this process's share where the driver reports it.

Absent NVML or no GPU, ``open_nvml`` returns None and the columns stay empty. In many containers NVML lists
processes by host PID, so a process figure that cannot be matched falls back to the device-level figure.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def open_nvml(index: int) -> tuple[Callable[[], int], Callable[[], int | None], str] | None:
    """Readers for (device used bytes, this process's used bytes or None) and the device name, or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML here"
        return None
    pid = os.getpid()

    def device_used() -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def process_used() -> int | None:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    return device_used, process_used, name if isinstance(name, str) else name.decode()
