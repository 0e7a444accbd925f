"""User-facing errors: one line, naming the file and field, exit code 2."""

from __future__ import annotations


# what str.splitlines() breaks a line at, each as its escape: a value the user wrote (a model named "\x85") keeps
# an error on one line and says what the value held
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class UserError(Exception):
    """A mistake in what the user gave us (a suite, a flag, a path).

    The CLI prints ``str(error)`` as one line and exits 2; ``--debug`` shows the traceback.
    """

    exit_code = 2

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__((f"{where}: {what}" if where else what).translate(_LINE_BREAKS))


def one_line(err: BaseException) -> str:
    """An exception as a record's ``error``: its type and message on one line, at most 500 characters."""
    return f"{type(err).__name__}: {one_line_text(err)}"[:500]


def one_line_text(err: BaseException) -> str:
    """An exception's message with its line breaks and runs of spaces folded: one line of a user error."""
    return " ".join(str(err).split())
