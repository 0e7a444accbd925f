"""A cell forked from the zygote starts from the zygote's resident library pages, as a process that imported the
libraries itself would: fork maps none of them, and the cell's RSS growth would count them as it faults them in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memprof.measure.host import map_inherited_file_pages

pytestmark = pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's /proc page maps only")


def _file_rss_bytes() -> int:
    """Resident pages of mapped files (``RssFile``): library code and data."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))


def test_a_forked_process_maps_the_library_pages_its_parent_had_resident() -> None:
    import torch  # noqa: F401 - this process's own libraries: a few hundred MiB of file-backed pages resident

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only reads /proc and calls madvise: nothing a forked OpenMP pool could hang on
        before = _file_rss_bytes()
        map_inherited_file_pages()
        os.write(write, f"{before} {_file_rss_bytes()}".encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    before, after = map(int, os.read(read, 100).split())
    parent = _file_rss_bytes()
    assert status == 0 and parent > 32 << 20
    assert before < parent / 2  # what fork mapped of them
    assert after >= 0.9 * parent


def test_a_process_that_was_not_forked_maps_nothing_more() -> None:
    """Its parent (a shell, pytest's runner) maps other files at other addresses: none of them is inherited."""
    before = _file_rss_bytes()
    map_inherited_file_pages()
    assert _file_rss_bytes() - before < 1 << 20
