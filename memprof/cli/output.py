"""Where the command line writes: ``console`` (stderr: progress, results folders, warnings, errors) and ``out``
(stdout: the tables a command answers with). Commands read both from this module when they print, so that a test
can swap either."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape


def _console(stderr: bool) -> Console:
    """Piped output (a CI log, a file) gets a readable width instead of rich's 80-column fallback, which cuts the
    progress line's step counts and names."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() or "COLUMNS" in os.environ else 120)


console, out = _console(stderr=True), _console(stderr=False)


def warn(warning: str) -> None:
    """A warning (what a command read but left out) as one yellow line on stderr; '' says nothing."""
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
