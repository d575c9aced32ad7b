"""All-or-none file writes: temporary files beside their paths, renamed into place with signals held.

Output paths are checked before any work (check_output_path); atomic_write_files writes a batch of
files through a few writer threads and renames them only when every one is complete (and fsynced,
unless durable=False), so an error, Ctrl-C or SIGTERM never leaves a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from .errors import OutputError, RefframeError


def check_output_path(
    path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Fail early, before any work, if `path` cannot receive the output file.

    Refuses a directory, anything but a regular file, a read-only file, a missing or read-only
    directory, and a path that is one of `inputs` (the output must never replace its own input).
    """
    if not str(path):
        raise OutputError("empty output path")
    p = Path(path).expanduser()
    try:
        st: os.stat_result | None = os.stat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise OutputError(f"{p}: output directory {p.parent} is not a directory") from None
    except OSError as exc:
        raise OutputError(f"{p}: output path cannot be accessed ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise OutputError(f"{p!r}: invalid output path ({exc})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{p}: output path is a directory; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{p}: output path exists and is not a regular file")
        if not os.access(p, os.W_OK):
            raise OutputError(f"{p}: output file exists and is read-only; remove it or choose another path")
        for inp in inputs:
            if inp is not None and _same_file(p, Path(inp).expanduser()):
                raise OutputError(
                    f"{p}: output path is the input file {inp}; writing would replace it, choose another path"
                )
    parent = p.parent
    if not parent.exists():
        raise OutputError(f"{p}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{p}: output directory {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: output directory {parent} is not writable")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _new_file_mode(p: Path) -> int:
    """The mode the output should get: the replaced file's, else 0o666 less the umask (as open() gives)."""
    try:
        return stat.S_IMODE(os.stat(p).st_mode)
    except (OSError, ValueError):
        pass
    umask = None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (unless ignored) for a few statements (creating or removing
    temporary files, renaming a batch into place) and deliver them afterwards, so an interrupt can
    never strand a temporary file or split a batch. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old: dict[int, object] = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, lambda s, _f: pending.append(s))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        for sig in pending:
            signal.raise_signal(sig)


def _write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> None:
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            view = view[os.write(fd, view) :]


def atomic_write_bytes(
    path: str | os.PathLike[str],
    chunks: Iterable[bytes | memoryview],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    durable: bool = True,
) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`.

    On any failure (exception, KeyboardInterrupt, SystemExit, disk full) the temporary file is
    removed and whatever was at `path` before is left untouched. Nothing is written anywhere but
    `path` and its temporary file `.NAME.XXXXXXXX.tmp` in the same directory. durable=False skips the
    fsyncs (see atomic_write_files).
    """
    atomic_write_files([(path, chunks)], inputs, durable=durable)


WRITE_WORKERS = 4


class _Stopped(Exception):
    """Marks a batch of writes as abandoned (the caller's own exception is what propagates)."""


class _FileWriters:
    """Writes (and fsyncs) temporary files, several at once on daemon threads. Each descriptor is
    closed by whoever wrote it; abort() closes the ones nobody started, and files being written
    finish on their own (an interrupted process does not wait for them; they skip their fsync)."""

    def __init__(self, fds: list[int], files: Sequence, durable: bool):
        self.fds, self.files, self.durable = fds, files, durable
        self.state = ["pending"] * len(fds)
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.threaded = False

    def _take(self) -> int | None:
        with self.lock:
            if self.error is None and "pending" in self.state:
                i = self.state.index("pending")
                self.state[i] = "running"
                return i
            return None

    def done(self) -> int:
        with self.lock:
            return self.state.count("closed")

    def _work(self) -> None:
        while (i := self._take()) is not None:
            err: BaseException | None = None
            try:
                _write_all(self.fds[i], self.files[i][1])
                if self.durable and self.error is None:
                    os.fsync(self.fds[i])
            except BaseException as exc:  # reported by run() in the calling thread
                err = exc
            finally:
                try:
                    os.close(self.fds[i])
                except OSError as exc:
                    err = err or exc
                if isinstance(err, OSError):
                    err.refframe_index = i  # type: ignore[attr-defined]
                with self.lock:
                    self.state[i] = "closed"
                    if err is not None and self.error is None:
                        self.error = err
                    if self.error is not None or self.state.count("closed") == len(self.state):
                        self.finished.set()

    def run(self, workers: int, progress: Callable[[int, int], None] | None) -> None:
        """Write every file; progress(done, total) is called from this thread as files complete."""
        n = len(self.fds)
        started = 0
        if n > 1 and workers > 1:
            self.threaded = True
            for _ in range(min(workers, n)):
                try:
                    threading.Thread(target=self._work, name="refframe-writer", daemon=True).start()
                except RuntimeError:  # no threads left: the others (or this thread) do the work
                    break
                started += 1
        if started == 0:
            self.threaded = False
            self._work()
        shown = 0
        while not self.finished.wait(0.05):
            if progress is not None and (done := self.done()) != shown:
                shown = done
                progress(done, n)
        if self.error is not None:
            raise self.error
        if progress is not None:
            progress(n, n)

    def abort(self) -> None:
        with self.lock:
            if self.error is None:
                self.error = _Stopped()  # the writers take no more files
            for i, st in enumerate(self.state):
                # running files belong to their writer thread; inline, nothing else will close them
                if st == "pending" or (st == "running" and not self.threaded):
                    self.state[i] = "closed"
                    _close_quietly(self.fds[i])


def atomic_write_files(
    files: Sequence[tuple[str | os.PathLike[str], Iterable[bytes | memoryview]]],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write several files, all or none: each goes to a temporary file beside its path; only when
    every one is written (and, if `durable`, fsynced) are they renamed over their paths, in one step
    that SIGINT/SIGTERM/SIGHUP cannot split. Then each directory is fsynced.

    Several files are written and fsynced by a few threads at once, which lets the disk work on
    them together (64 frames of 26 MB: 1.5-3x faster than one fsync after another here).

    On any failure before the renames nothing at any path changes and no temporary file is left.
    durable=False skips the fsyncs: the renames are still atomic, so an interrupted or killed
    process still never leaves a partial file, but a power cut or OS crash soon after can.
    `progress(done, total)` is called from the calling thread as files are complete.
    An interrupt held back during the renames is raised once every file is in place, with the
    attribute `refframe_files_written` set to the number of files written.
    """
    if not files:
        return
    targets = _targets(files, list(inputs))
    temps = _write_temporaries(files, targets, durable, progress)
    _commit(temps, targets, durable)


def _targets(files: Sequence, inputs: list) -> list[Path]:
    """The checked output paths, none of them given twice."""
    targets = [check_output_path(path, inputs) for path, _ in files]
    seen: set[tuple[str, str]] = set()
    for p in targets:
        key = (os.path.realpath(p.parent), p.name)  # the same folder under two names is one folder
        if key in seen:
            raise OutputError(f"{p}: the same output path is given twice")
        seen.add(key)
    return targets


def _write_temporaries(
    files: Sequence, targets: list[Path], durable: bool, progress: Callable[[int, int], None] | None
) -> list[str]:
    """Each file written (and fsynced if durable) to a temporary file beside its target, which
    gets the mode of the file it replaces. On any failure every temporary file is removed."""
    modes = [_new_file_mode(p) for p in targets]
    fds: list[int] = []
    temps: list[str] = []
    writers: _FileWriters | None = None
    failed: Path | None = targets[0]
    try:
        with _signals_deferred():
            for p in targets:
                failed = p
                fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
                fds.append(fd)
                temps.append(tmp)
        failed = None
        for fd, mode in zip(fds, modes):
            try:
                os.fchmod(fd, mode)
            except OSError:
                pass
        writers = _FileWriters(fds, files, durable)
        writers.run(WRITE_WORKERS, progress)
    except BaseException as exc:
        with _signals_deferred():
            if writers is not None:
                writers.abort()
            else:
                for fd in fds:
                    _close_quietly(fd)
            for tmp in temps:
                _unlink_quietly(tmp)
        if isinstance(exc, OSError):
            index = getattr(exc, "refframe_index", None)
            raise _output_error(exc, targets[index] if index is not None else failed or targets[0]) from None
        raise
    return temps


def _commit(temps: list[str], targets: list[Path], durable: bool) -> None:
    """Rename every file into place with signals held, then make the renames durable."""
    replaced = 0
    failed: Path | None = None
    try:
        with _signals_deferred():
            try:
                for tmp, p in zip(temps, targets):
                    failed = p
                    os.replace(tmp, p)
                    replaced += 1
            except OSError as exc:
                for tmp in temps[replaced:]:
                    _unlink_quietly(tmp)
                if durable:
                    _fsync_dirs(targets[:replaced])
                if replaced:
                    done = ", ".join(str(p) for p in targets[:replaced])
                    changed = f"{replaced} of {len(targets)} files were written ({done}), the others left as they were"
                else:
                    changed = "nothing was changed"
                raise _output_error(exc, failed or targets[0], changed) from None
            if durable:
                _fsync_dirs(targets)
    except BaseException as exc:
        if not isinstance(exc, RefframeError):
            with contextlib.suppress(AttributeError, TypeError):
                exc.refframe_files_written = replaced  # type: ignore[attr-defined]
        raise


def _output_error(exc: OSError, path: Path, changed: str = "nothing was changed") -> OutputError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why += "; free some space and run again"
    return OutputError(f"{path}: could not write output ({why}); {changed}")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dirs(paths: Iterable[Path]) -> None:
    """fsync each distinct folder holding one of `paths` (makes their renames durable)."""
    for directory in dict.fromkeys(p.parent for p in paths):
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
