"""Host memory: this process's resident set size."""

from __future__ import annotations

import psutil

_PROCESS = psutil.Process()


def rss_bytes() -> int:
    return _PROCESS.memory_info().rss
