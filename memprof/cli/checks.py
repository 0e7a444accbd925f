"""Input checks several commands share, each refusing with one line before any work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from memprof.errors import UserError

if TYPE_CHECKING:
    from memprof.run.messages import Problem
    from memprof.suite import Suite


def check_folder(flag: str, path: Path) -> None:
    """Refuse ``path``, a folder to write in, before any work: when it or the nearest of its parents that exists is
    a file, or it cannot be made (no permission, a read-only file system, a folder that takes none: /proc). The
    probe makes the folders that are missing and removes them again."""
    taken = next((p for p in (path, *path.parents) if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise UserError(flag, f"{taken} is a file, not a folder")
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(flag, f"cannot make {path}: {err.strerror or err}") from None
    finally:
        for made in (p for p in missing if p.is_dir()):
            made.rmdir()


def check_file(flag: str, path: Path) -> None:
    """Refuse ``path``, a file to write, before any work: when it is a folder, its folder does not exist, or it
    cannot be opened for writing (no permission, a read-only file system, a folder that takes no file: /proc). The
    probe opens it for appending, so a file that exists is left as it is, and one it makes is removed again; only
    the write itself can find a full disk."""
    if path.is_dir():
        raise UserError(flag, f"{path} is a folder, not a file")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise UserError(flag, f"{path.parent} {what}: {path.name} cannot be written there")
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as err:
        raise UserError(flag, f"{path}: cannot be written: {err.strerror or err}") from None
    if not existed:
        path.unlink(missing_ok=True)


def refuse(suite: Suite, problems: list[Problem]) -> None:
    """The first problem the checks found (``memprof.run.preflight``), as the suite's one-line error."""
    if problems:
        p = problems[0]
        raise suite.preflight_error(p.model, p.adapter, p.field, p.error)
