"""User-facing errors: one line, naming the file and field, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (a suite, a flag, a path).

    The CLI prints ``str(error)`` as one line and exits 2; ``--debug`` shows the traceback.
    """

    exit_code = 2

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}" if where else what)


def one_line(err: BaseException) -> str:
    """An exception as a record's ``error``: its type and message on one line, at most 500 characters."""
    return f"{type(err).__name__}: {one_line_text(err)}"[:500]


def one_line_text(err: BaseException) -> str:
    """An exception's message with its line breaks and runs of spaces folded: one line of a user error."""
    return " ".join(str(err).split())
