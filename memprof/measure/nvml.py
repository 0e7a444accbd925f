"""NVML: device memory in use, and this process's share where the driver reports it.

Absent NVML or no GPU, ``open_nvml`` returns None and the columns stay empty. In some containers NVML lists
processes by host PID: then this process is not found and its column stays empty (the device figure still counts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from memprof.results.env import nvml_cards


def open_nvml(index: int, uuid: str | None = None) -> tuple[Callable[[], tuple[int | None, int | None]], str] | None:
    """A reader of (device used bytes, this process's used bytes or None) and the device name, or None. NVML numbers
    the cards ignoring ``CUDA_VISIBLE_DEVICES`` (each job of ``--jobs`` sees its own card as cuda:0), so the card
    is found by ``uuid`` (torch's ``get_device_properties(...).uuid``) where given, by ``index`` otherwise."""
    cards = nvml_cards()
    if not cards:
        return None
    import pynvml

    try:
        handle = _by_uuid(pynvml, uuid) if uuid else None
        if handle is None:
            handle = cards[index]
        name = pynvml.nvmlDeviceGetName(handle)
        pynvml.nvmlDeviceGetMemoryInfo(handle)  # a card whose memory NVML cannot read is no card to sample
    except Exception:  # noqa: BLE001 - any NVML failure means "no NVML here"
        return None
    pid = os.getpid()

    def read() -> tuple[int | None, int | None]:
        """Never raises: a sample NVML cannot take (an error mid-run, a process list some vGPU and MIG set-ups do
        not give) leaves its column empty, and the cell goes on."""
        try:
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except pynvml.NVMLError:
            return None, None
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError:
            return used, None
        return used, next((int(p.usedGpuMemory) for p in processes if p.pid == pid and p.usedGpuMemory is not None),
                          None)

    return read, name if isinstance(name, str) else name.decode()


def _by_uuid(pynvml: Any, uuid: str) -> Any:
    """NVML's handle of the card with this UUID, or None (unverified on a GPU: torch may print a UUID bare,
    ``58b6...``, where NVML wants ``GPU-58b6...``; both are tried, then the caller falls back on the index)."""
    for name in (uuid, f"GPU-{uuid}"):
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:  # noqa: BLE001 - not this spelling
            continue
    return None
