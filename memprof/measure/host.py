"""Host memory: this process's resident set size, and what of it glibc's malloc holds free."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import BinaryIO

import psutil

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_reader: tuple[int, Callable[[], int]] | None = None  # (the pid it reads, the reader)


def rss_bytes() -> int:
    """The RSS of the calling process.

    The sampler calls this every 10 ms beside the training threads, so on Linux it re-reads ``/proc/self/statm``
    through a descriptor kept open: about 5 µs a call against psutil's 50 µs (it opens, reads and parses the file
    each time), which took the trackers' cost to a CPU-bound step from about 2.5% to 1.8%
    (benchmarks/tracker_overhead.py). Both
    ``/proc/self`` and a ``psutil.Process`` name the process that made them, so one made in the zygote would keep
    reading the zygote from every forked worker: the reader is re-made after a fork.
    """
    global _reader
    if _reader is None or _reader[0] != os.getpid():
        _reader = (os.getpid(), _make_reader())
    return _reader[1]()


def _make_reader() -> Callable[[], int]:
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:  # no /proc (macOS)
        process = psutil.Process()
        return lambda: process.memory_info().rss
    # statm: size, resident, ... in pages; pread at offset 0 makes the kernel write the line afresh
    return lambda: int(os.pread(fd, 128, 0).split()[1]) * _PAGE_BYTES


def high_water_bytes() -> int:
    """The kernel's high-water mark of this process's RSS (``ru_maxrss``): it only ever rises, and catches a peak
    between two samples."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class HostBaseline:
    """The host's memory when a measurement begins: the RSS it counts growth from, glibc's free heap (None without
    glibc), and the kernel's high-water mark, whose later value is this measurement's only where it rose past this."""

    rss: int
    heap_free: int | None
    high_water: int

    @classmethod
    def now(cls, resident_tensor_bytes: int = 0) -> HostBaseline:
        """The baseline now, less ``resident_tensor_bytes`` of CPU tensors already there that the measurement is to
        count as its own (a tracked loop's model, built before the tracking began)."""
        return cls(rss_bytes() - resident_tensor_bytes, heap_free_bytes(), high_water_bytes())


_MADV_POPULATE_READ = 22  # Linux 5.14+


def map_inherited_file_pages() -> None:
    """Map the file-backed pages (library code and data) that this process's parent has resident, in the mappings
    this process inherited from it by fork: 26 ms of minor faults for 70 MiB. fork copies no page-table entry of a
    file mapping, so a cell forked from the zygote would fault in again, page by page, library pages the zygote had
    loaded long before, and its RSS growth counted them (14.5 MiB of a tiny-llama cell's 65 MiB on a 2-core VM),
    which a process that imported the libraries itself does not. Nothing to do where nothing is inherited (the parent
    is another program); nothing done where the parent's page map cannot be read, or off Linux."""
    try:
        parent, own = _file_mappings(os.getppid()), set(_file_mappings(os.getpid()))
        madvise = _madvise()
        with open(f"/proc/{os.getppid()}/pagemap", "rb") as pagemap:
            runs = [run for lo, hi, *_ in (m for m in parent if m in own) for run in _resident_runs(pagemap, lo, hi)]
    except (OSError, AttributeError):
        return
    for start, end in runs:
        madvise(start, end - start, _MADV_POPULATE_READ)  # fails (EINVAL) before Linux 5.14: then the RSS as it was


def _file_mappings(pid: int) -> list[tuple[int, int, str, str, str]]:
    """(start, end, offset, inode, path) of each mapping of a file in ``/proc/PID/maps``."""
    out = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, fields[2], fields[4], fields[5].rstrip("\n")))
    return out


def _resident_runs(pagemap: BinaryIO, lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of pages of [lo, hi) present in the page map's process (bit 63 of each 8-byte entry)."""
    pagemap.seek(lo // _PAGE_BYTES * 8)
    entries = pagemap.read((hi - lo) // _PAGE_BYTES * 8)
    present = [entries[i + 7] & 0x80 for i in range(0, len(entries), 8)] + [0]
    runs, start = [], None
    for i, page in enumerate(present):
        if page and start is None:
            start = i
        elif not page and start is not None:
            runs.append((lo + start * _PAGE_BYTES, lo + i * _PAGE_BYTES))
            start = None
    return runs


@cache
def _madvise() -> Callable[[int, int, int], int]:
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int | None:
    """Bytes glibc's malloc holds free in its arenas (``mallinfo2().fordblks``, every arena): memory the process
    freed that stays resident and counts in its RSS. It walks every free chunk under the arenas' locks: 2 µs in a
    fresh process, more on a fragmented heap, so not a read for every sample. None without glibc 2.33 or later
    (macOS, musl)."""
    mallinfo2 = _mallinfo2()
    return None if mallinfo2 is None else int(mallinfo2().fordblks)


@cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function
