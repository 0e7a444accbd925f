"""Which timings were taken on a contended machine: a record's ``cpu_pressure`` (``memprof.measure.load``) against
a threshold, and the note that explains the mark tables put beside them."""

from __future__ import annotations

from collections.abc import Sequence

from memprof.results.record import Record

# Timings taken while runnable tasks waited for a CPU during more than this share of the training time are flagged
# in tables and the report, and not judged by compare. A quick-suite cell alone on this 2-core machine measured
# 3-4%; beside two busy loops, 100% (and its tokens/s fell from ~10,000 to 130-2,400).
CONTENDED = 0.10


def contended(share: float | None) -> bool:
    return share is not None and share > CONTENDED


def worst(records: Sequence[Record]) -> float | None:
    """The highest contended ``cpu_pressure`` among ``records``; None when none was timed under contention."""
    return max((r.cpu_pressure for r in records if contended(r.cpu_pressure)), default=None)


def marked(timing: str, records: Sequence[Record]) -> str:
    """``timing`` with `` *`` beside it when any of ``records`` (its repeats) was timed on a contended machine; no
    timing ("–") as it is."""
    if timing == "–" or not any(contended(r.cpu_pressure) for r in records):
        return timing
    return timing + " *"


def contention_notes(records: Sequence[Record]) -> list[str]:
    """The note under a table whose timings ``marked`` starred: none when no record was timed under contention."""
    share = worst(records)
    if share is None:
        return []
    busy = sum(contended(r.cpu_pressure) for r in records)
    return [f"*: timed while other work held the CPUs: runnable tasks waited for a CPU during up to {share:.0%} of "
            f"the training time ({busy} cell{'s' if busy > 1 else ''}, Linux PSI; over "
            f"{CONTENDED:.0%} is flagged): those timings are not the cell's alone; rerun on a quiet machine"]
