"""The `refframe` command line: one module per command (build, verify, demo, bench), the parser,
console output, and main (parse, run, one-line errors)."""

from __future__ import annotations

from .main import entry, main
from .parser import build_parser

__all__ = ["build_parser", "entry", "main"]
