"""The background sampler: every source at the first and last sample, a slow source at most once per period, peaks
over what was read."""

from __future__ import annotations

import itertools
import time

from memprof.measure.readings import memory_sources
from memprof.measure.sampler import Sampler, Source


def test_a_slow_source_is_read_at_its_period_and_at_both_ends() -> None:
    fast, slow = itertools.count(1), itertools.count(100)
    reads = {"fast": 0, "slow": 0}

    def read_fast() -> tuple[int]:
        reads["fast"] += 1
        return (next(fast),)

    def read_slow() -> tuple[int, None]:
        reads["slow"] += 1
        return next(slow), None

    sampler = Sampler([Source(("fast",), read_fast), Source(("slow", "never"), read_slow, period_s=3600)],
                      interval_s=0.002)
    with sampler:
        sampler.mark(0, "forward")
        time.sleep(0.1)
    rows = sampler.timeline
    assert len(rows) > 5 and reads["fast"] == len(rows)
    assert reads["slow"] == 2  # the first and the last sample only
    assert [row["slow"] for row in rows if row["slow"] is not None] == [100, 101]
    assert rows[0]["slow"] == 100 and rows[-1]["slow"] == 101 and rows[1]["slow"] is None
    assert all(row["never"] is None for row in rows) and rows[-1]["phase"] == "forward"
    assert sampler.peaks == {"fast": reads["fast"], "slow": 101, "never": None}
    assert 0 < sampler.busy_s < 0.1  # its thread's CPU time: sampling every 2 ms is far from a whole CPU


def test_a_source_with_a_due_check_is_read_only_when_it_says_so_besides_both_ends() -> None:
    asked, reads = itertools.count(), itertools.count(1)
    due_at = {3, 4, 9}  # the calls of due() that answer True

    sampler = Sampler([Source(("watched",), lambda: (next(reads),), due=lambda: next(asked) in due_at)],
                      interval_s=0.001)
    for _ in range(12):  # the samples between the first and the last, taken by hand: no thread's timing involved
        sampler.sample()
    sampler.sample(every_source=True)
    values = [row["watched"] for row in sampler.timeline]
    assert values == [None, None, None, 1, 2, None, None, None, None, 3, None, None, 4]
    assert sampler.peaks == {"watched": 4}


def test_a_sample_is_labelled_with_the_phase_its_reading_ended_in() -> None:
    """A read can wait for the GIL while the training thread moves into the next phase and grows there: the value
    belongs to the phase the read ended in, not to the one before it."""
    sampler = Sampler([Source(("rss",), lambda: (sampler.mark(0, "forward"), 9_000)[1:])])
    sampler.sample(every_source=True)
    assert (sampler.timeline[0]["step"], sampler.timeline[0]["phase"], sampler.timeline[0]["rss"]) == (0, "forward",
                                                                                                     9_000)


def test_a_source_read_each_phase_is_read_at_the_first_sample_after_each_mark() -> None:
    reads = itertools.count(1)
    sampler = Sampler([Source(("heap",), lambda: (next(reads),), due=lambda: False, each_phase=True)])
    sampler.sample()
    sampler.mark(0, "forward")
    sampler.sample()
    sampler.sample()
    sampler.mark(0, "backward")
    sampler.mark(0, "optimizer")  # two marks between samples: one read, labelled with the phase it ended in
    sampler.sample()
    sampler.sample()
    assert [(row["phase"], row["heap"]) for row in sampler.timeline] == [
        ("setup", None), ("forward", 1), ("forward", None), ("optimizer", 2), ("optimizer", None)]


def test_the_free_heap_at_the_peak_is_its_least_reading_in_the_step_of_the_rss_high() -> None:
    """What the step freed before its RSS high is free there, but the peak's moment counts it alive (activations
    a backward consumed): what stayed free through the step is the reading's least."""
    from memprof.measure.readings import heap_free_at_peak

    def row(step: int, phase: str, rss: int, heap: int | None) -> dict[str, object]:
        return {"step": step, "phase": phase, "rss_bytes": rss, "heap_free_bytes": heap}

    timeline = [row(-1, "setup", 100, 10), row(0, "forward", 150, 5), row(0, "backward", 200, 40),
                row(1, "forward", 210, 60), row(1, "forward", 205, None), row(1, "backward", 210, 30),
                row(1, "backward", 260, 90), row(1, "optimizer", 260, 95), row(2, "forward", 250, 20)]
    assert heap_free_at_peak(timeline) == 30
    assert heap_free_at_peak([row(-1, "setup", 100, None)]) is None
    assert heap_free_at_peak([]) is None


def test_on_the_cpu_only_host_memory_is_sampled() -> None:
    import torch

    from memprof.measure.host import heap_free_bytes

    measured = memory_sources(torch.device("cpu"))
    glibc = heap_free_bytes() is not None  # its free heap, read as RSS rises and as each phase begins
    assert [s.columns for s in measured.sources] == [("rss_bytes",)] + [("heap_free_bytes",)] * glibc
    assert measured.allocator is None
    with Sampler(measured.sources, 0.005) as sampler:
        time.sleep(0.03)
        sampler.mark(0, "forward")
        time.sleep(0.03)
    rows = sampler.timeline
    assert sampler.peaks["rss_bytes"] > 0 and all(row["rss_bytes"] for row in rows)
    if glibc:  # the first and last samples and the first of the phase read it, a still RSS leaves it unread
        heap = [row["heap_free_bytes"] for row in rows]
        first_forward = next(i for i, row in enumerate(rows) if row["phase"] == "forward")
        assert heap[0] and heap[-1] and heap[first_forward] and None in heap


def test_nvml_is_due_when_the_allocators_reserved_bytes_move_or_after_a_long_idle(monkeypatch) -> None:
    import torch

    from memprof.measure import readings
    from memprof.measure.allocator import CudaAllocator

    allocator = CudaAllocator(torch.device("cuda", 0))  # made without touching CUDA: only its last reading is used
    due = readings._reserved_moved(allocator)
    answers = [due()]
    allocator.last_reserved = 2 << 20
    answers += [due(), due()]
    allocator.last_reserved = 4 << 20
    answers += [due(), due()]
    monkeypatch.setattr(readings, "NVML_IDLE_S", 0.0)
    answers += [due()]
    assert answers == [True, True, False, True, False, True]
