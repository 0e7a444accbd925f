"""Suites: a TOML file in, the validated grid of ``CellConfig``s out (nothing heavy imported).

``load("quick")`` reads a shipped suite by name, or any file by path; every problem is one ``UserError`` naming the
file and the key.
"""

from memprof.suite.load import Suite, load, parse, resolve_path

__all__ = ["Suite", "load", "parse", "resolve_path"]
