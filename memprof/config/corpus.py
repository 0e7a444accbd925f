"""A file corpus as the tokens it holds (a byte is a token): read by a cell's set-up, and sized by the suite's check
that the file is long enough, both here."""

from __future__ import annotations

import json
from pathlib import Path


def file_bytes(path: Path) -> bytes:
    """The file's bytes, or for JSONL the ``text`` strings of its non-blank lines joined by newlines.

    Raises:
        OSError: the file does not read.
        ValueError: a JSONL file that is not UTF-8, or a line that is not a JSON object with a ``text`` string
            (named by its number).
    """
    raw = path.read_bytes()
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, TypeError, KeyError):
            text = None
        if not isinstance(text, str):
            raise ValueError(f"line {number} of {path} is not a JSON object with a 'text' string")
        texts.append(text)
    return "\n".join(texts).encode("utf-8")
