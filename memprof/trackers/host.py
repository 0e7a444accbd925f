"""Host memory: this process's resident set size."""

from __future__ import annotations

import os

import psutil

_process: psutil.Process | None = None


def rss_bytes() -> int:
    """The RSS of the calling process. A ``psutil.Process`` keeps the pid it was made with, so one made in the
    zygote would keep reading the zygote from every forked worker: it is re-made after a fork."""
    global _process
    if _process is None or _process.pid != os.getpid():
        _process = psutil.Process()
    return _process.memory_info().rss
