"""The `refframe` command line: one module per command (build, verify, project, plot, demo, bench), the parser,
console output, and command.py (parse, run one command, one-line errors)."""

from __future__ import annotations

from .command import entry, main
from .parser import build_parser

__all__ = ["build_parser", "entry", "main"]
