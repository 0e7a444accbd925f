"""Measure one cell on one device: build → warm up → measured steps → Record. Every fault becomes a field of the
Record. Enters: a ``CellConfig`` and a device; leaves: a ``CellResult`` (record, per-step rows, memory timeline)."""

from __future__ import annotations

import gc
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from memprof.config.spec import CellConfig
from memprof.errors import one_line
from memprof.measure.attribution import attribute
from memprof.measure.host import HostBaseline, map_inherited_file_pages
from memprof.results.record import CellResult, Record, Status
from memprof.train.training import Training


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def measure_cell(cell: CellConfig, device: torch.device, sample_interval_s: float | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> CellResult:
    """Build the cell's model and optimizer on ``device``, train it, and measure everything on the way: the
    whole cell, or one of a sharded cell's ranks (``memprof.run.launch`` decides).

    Never raises for a fault inside the cell (OOM, divergence, a library error, Ctrl-C): those are the
    Record's ``status``. ``on_step(step, loss)`` hears of every finished optimizer step.
    """
    from memprof.analysis import convergence
    from memprof.measure import formulas
    from memprof.measure.load import CpuPressure
    from memprof.measure.probe import CellProbe
    from memprof.measure.readings import exact_values, memory_sources, peak_values, sample_interval, step_summary
    from memprof.measure.sampler import Sampler
    from memprof.train import models, optim
    from memprof.train.loop import Diverged

    # where RSS growth is the peak, the zygote's library pages are in its baseline, as in a process that loaded the
    # libraries itself (harness time, not the cell's: 30-60 ms on a 2-core VM)
    if device.type == "cpu":
        map_inherited_file_pages()
    t_start = time.perf_counter()
    if device.type == "cuda":  # an earlier cell of this process (tests, track) may sit in reference cycles on the
        gc.collect()  # device: the allocator's peaks are the process's, so free it before they are reset
        torch.cuda.empty_cache()
    baseline = HostBaseline.now()
    measured = memory_sources(device)
    allocator = measured.allocator
    values: dict[str, Any] = {"host": socket.gethostname(), "device": str(device), "device_name": measured.device_name}

    status, probe, built = Status.OK, None, Training(cell, device)
    sampler, pressure = Sampler(measured.sources, sample_interval(device, sample_interval_s)), CpuPressure()
    with ExitStack() as stack:
        stack.enter_context(sampler)
        if allocator is not None:
            stack.enter_context(allocator)
        try:
            built.build()
            probe = CellProbe(built.model, sampler, allocator,
                              snapshot_step=max(cell.training.warmup_steps - 1, 0), on_step=on_step)
            values["setup_s"] = time.perf_counter() - t_start
            with pressure:
                built.train(probe)
        except Diverged as err:
            status, values["error"], values["fail_step"] = Status.DIVERGED, str(err), err.step
            values["fail_phase"] = "forward"  # where the non-finite loss came from; it is checked after the step
        except (optim.OptimizerUnavailable, models.LeverUnavailable) as err:
            status, values["error"] = Status.UNAVAILABLE, str(err)
        except KeyboardInterrupt:
            status, values["error"] = Status.INTERRUPTED, "interrupted"
        except Exception as err:  # noqa: BLE001 - any library error is this cell's result
            status = Status.OOM if is_oom(err) else Status.CRASHED
            values["error"] = one_line(err)
            if status is Status.CRASHED:
                traceback.print_exc()  # into the cell's log, for the user who wants more than one line
        if status is not Status.OK and status is not Status.UNAVAILABLE and probe is not None:
            phase, step = probe.where
            values.setdefault("fail_phase", phase)
            values.setdefault("fail_step", step if step >= 0 else None)
        elif probe is None and status in (Status.OOM, Status.CRASHED):
            values["fail_phase"] = "setup"

    if callable(getattr(built.model, "reshard", None)):
        built.model.reshard()  # FSDP2 keeps the root unit gathered after a forward: count the rank's shards
    # the optimizer's state is whole once it has stepped: a cell that stopped before its first step has no figure
    stepped = probe is not None and bool(probe.logs)
    values.update(exact_values(built.model, built.optimizer if stepped else None))
    if built.optimizer is not None:
        values["predicted_state_bytes"] = formulas.predict_for_optimizer(cell.optimizer.name, built.optimizer)
    if status is not Status.UNAVAILABLE:  # a cell that never trained has no peak to speak of
        values.update(peak_values(sampler, allocator, baseline))
    logs = probe.logs if probe is not None else []
    if probe is not None:
        values.update(activation_bytes=probe.activation_bytes, gradient_bytes=probe.gradient_bytes)
    values.update(step_summary(logs, cell.training.warmup_steps, cell.tokens_per_step))
    if status in (Status.OK, Status.DIVERGED):  # a curve cut short by a crash or OOM says nothing about learning
        values.update(convergence.summarise(logs, built.entropy_floor_nats, cell.training.target_loss,
                                            cell.training.warmup_steps))
    values["cell_wall_s"] = time.perf_counter() - t_start
    values["cpu_pressure"] = pressure.share
    record = attribute(Record(cell, status=status, **values), values.get("peak_phase", ""))
    steps = [{"cell_key": cell.key, "repeat": cell.training.repeat, **vars(log)} for log in logs]
    return CellResult(record, steps, [{"cell_key": cell.key, **row} for row in sampler.timeline])
