"""A run's progress on the terminal (``memprof.run.runner.Observer``): one bar over every optimizer step of the
suite with its ETA, the running cell's step and loss, and the last cell's outcome, each cell named by what sets it
apart in this suite (the axes that vary)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from memprof.config.spec import CellConfig, varying
from memprof.results.record import CellResult, Record
from memprof.run.messages import StepDone
from memprof.views.tables import STATUS_STYLE


class ProgressView:
    """Shows a run's progress on ``console`` while it lasts; ``close`` when the run ends."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.progress: Progress | None = None
        self._task = 0
        self._labels: dict[int, str] = {}
        self._steps: dict[int, int] = {}  # cell index -> its optimizer steps
        self._seen: dict[int, int] = {}  # cell index -> steps shown so far

    @contextmanager
    def checking(self) -> Iterator[None]:
        with self.console.status(f"{self.title}: starting workers and checking the models"):
            yield

    def start(self, cells: list[CellConfig], finished: list[Record]) -> None:
        axes = varying(cells) or varying(cells, always=("optimizer",))
        self._labels = {c.index: " ".join(str(a.display(a.get(c))) for a in axes) for c in cells}
        self._steps = {c.index: c.training.steps for c in cells}
        done = {r.config.index for r in finished}
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("steps"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[cells]}"), TextColumn("{task.fields[now]}"),
                                 console=self.console, transient=False)
        self.progress.start()
        self._cells_done = len(done)
        self._task = self.progress.add_task(self.title, total=sum(self._steps.values()),
                                            completed=sum(self._steps[i] for i in done if i in self._steps),
                                            cells=self._cells_text(), now="")

    def step(self, message: StepDone) -> None:
        self._seen[message.index] = message.step + 1
        label = self._labels.get(message.index, str(message.index))
        self._update(1, now=f"{label}: step {message.step + 1}/{message.steps}, loss {message.loss:.3f}")

    def done(self, result: CellResult) -> None:
        r = result.record
        index = r.config.index
        self._cells_done += 1
        left = self._steps.get(index, 0) - self._seen.pop(index, 0)  # a cell that stopped early: its steps end here
        style = STATUS_STYLE[r.status]
        outcome = f"[{style}]{r.status.value}[/]" + (f" [dim]{r.failed_at}[/]" if r.failed_at else "")
        self._update(left, now=f"last: {self._labels.get(index, r.key)} {outcome}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _cells_text(self) -> str:
        return f"cell {min(self._cells_done + 1, len(self._steps))}/{len(self._steps)}"

    def _update(self, advance: int, now: str) -> None:
        if self.progress is not None:
            self.progress.update(self._task, advance=advance, cells=self._cells_text(), now=now)
