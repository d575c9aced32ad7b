"""Console output of the command line: report lines on stdout, one-line warnings on stderr."""

from __future__ import annotations

import sys
import warnings

from ..errors import RefframeWarning


def say(*args: object) -> None:
    print(*args, flush=True)


def one_line(text: object) -> str:
    """Messages are one line by construction; this guards against a newline in a file name."""
    return " ".join(str(text).splitlines()).strip()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the CLI: refframe's own warnings as one line `refframe: warning: ...`."""
    if issubclass(category, RefframeWarning):
        print(f"refframe: warning: {one_line(message)}", file=sys.stderr, flush=True)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")
