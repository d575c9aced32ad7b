"""The `refframe` command: parse, run one command, and turn every failure into one line.

Exit status: 0, 1 for an error, 2 for a usage error, 128 + the signal number when interrupted.
Each command lives in its own module (build, verify, project, plot, demo, bench), imported only once the arguments
are parsed: --help answers at once, and Ctrl-C while torch loads is reported like any other interrupt.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..errors import RefframeError, RefframeWarning
from .console import one_line, show_warning
from .parser import build_parser, expand_user_paths


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs command `name` (its module is imported now, loading torch)."""
    if name == "build" and _torchrun_ranks() > 1:
        from .sharded import run
    elif name == "build":
        from .build import run
    elif name == "verify":
        from .verify import run
    elif name == "project":
        from .project import run
    elif name == "plot":
        from .plot import run
    elif name == "demo":
        from .demo import run
    else:
        from .bench import run
    return run


def _torchrun_ranks() -> int:
    """The number of ranks torchrun started (WORLD_SIZE; 1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _install_signal_handlers() -> dict[int, object]:
    """SIGTERM (and SIGHUP, unless ignored as under nohup) interrupt like Ctrl-C: the build stops,
    its temporary file is removed, the previous output stays as it was. Returns the handlers
    replaced, for main() to put back."""
    old: dict[int, object] = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if name == "SIGHUP" and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def _outputs_state(args: argparse.Namespace, exc: BaseException) -> str:
    """What an interrupted command left on disk: the outputs of finished models, plus any files of
    a batch that was already renamed into place when the interrupt was delivered."""
    planned = int(getattr(args, "outputs_planned", 1))
    written = int(getattr(args, "outputs_written", 0)) + int(getattr(exc, "refframe_files_written", 0))
    if written == 0:
        return "the output file was left as it was" if planned <= 1 else "the output files were left as they were"
    if written >= planned:
        return "the output file had already been written" if planned == 1 else "every output file had already been written"
    return f"{written} of {planned} output files had already been written, the others were left as they were"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure prints one line `refframe: error: ...` and returns
    non-zero (1 for an error, 2 for a usage error, 128 + the signal number when interrupted).
    --debug re-raises instead, with the traceback."""
    args = expand_user_paths(build_parser().parse_args(argv))
    old_handlers = _install_signal_handlers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RefframeWarning)
            warnings.showwarning = show_warning
            return int(_command(args.command_module)(args) or 0)
    except RefframeError as exc:
        if args.debug:
            raise
        print(f"refframe: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        signum = int(getattr(exc, "signum", signal.SIGINT))
        print(f"refframe: interrupted ({_signal_name(signum)}); {_outputs_state(args, exc)}", file=sys.stderr)
        return 128 + signum
    except MemoryError:
        if args.debug:
            raise
        print("refframe: error: out of memory (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a failure refframe does not know yet: still one line
        if args.debug:
            raise
        lines = str(exc).strip().splitlines()
        print(
            f"refframe: error: unexpected {type(exc).__name__}: {lines[0] if lines else ''} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        for sig, handler in old_handlers.items():
            try:
                signal.signal(sig, handler)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass


def entry() -> None:
    """The `refframe` command. After an interrupt the process ends at once, without the interpreter's
    shutdown: a native computation may still run in a worker thread (LAPACK cannot be stopped), and
    a second signal (`timeout` signals the process and then its group) would otherwise land in the
    shutdown. Outputs are complete or untouched either way, and temporary files are already gone."""
    try:
        code = main()
    except KeyboardInterrupt as exc:  # --debug re-raises it, or a second signal came meanwhile
        traceback.print_exc()
        code = 128 + int(getattr(exc, "signum", signal.SIGINT))
    interrupt = sys.modules.get("refframe.interrupt")
    if code >= 128 or (interrupt is not None and interrupt.compute_running()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
