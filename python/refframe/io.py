"""safetensors in and out: a validating, memory-mapped reader and an atomic writer.

Only the safetensors format is ever read (no pickle). The reader checks the header against the file
size before touching any tensor, and returns tensors that are views of a private memory map, so a
large W is paged in on demand and never copied whole.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import signal
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import xxhash

from .errors import FileFormatError, InputError, KeyNotFoundError, OutputError, RefframeError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: file contents quoted in a message stay on one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_list(keys: Iterable[str], limit: int = 20) -> str:
    """Sorted keys for a message, at most `limit` of them, or "none"."""
    ks = sorted(keys)
    if not ks:
        return "none"
    shown = ", ".join(k if len(k) <= 60 and k.isprintable() else short_repr(k) for k in ks[:limit])
    return shown + (f", ... ({len(ks) - limit} more)" if len(ks) > limit else "")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _stat_input(p: Path) -> os.stat_result:
    """os.stat with every failure turned into a one-line InputError naming the file."""
    try:
        return os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise InputError(f"{p!r}: invalid path ({exc})") from None


class SafetensorsFile:
    """A validated, read-only view of one safetensors file.

    Raises InputError with a one-line message naming the file if it is missing, not a regular file,
    unreadable, or not a well-formed safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        p = self.path
        st = _stat_input(p)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{p}: is a directory, expected a .safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{p}: not a regular file")
        try:
            with open(p, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 8:
                    raise FileFormatError(f"{p}: not a safetensors file (only {size} bytes)")
                head = fh.read(8)
                if all(32 <= b < 127 or b in b"\t\n\r" for b in head):
                    # A real header length below the byte limit has zero high bytes, never text.
                    raise FileFormatError(
                        f"{p}: not a safetensors file (it starts with text: {head.decode('ascii')!r})"
                    )
                (hlen,) = struct.unpack("<Q", head)
                if hlen > size - 8:
                    raise FileFormatError(
                        f"{p}: not a safetensors file or truncated (header length {hlen} exceeds the "
                        f"{size - 8} bytes that follow)"
                    )
                if hlen > MAX_HEADER_BYTES:
                    raise FileFormatError(
                        f"{p}: not a safetensors file (header length {hlen} exceeds the "
                        f"{MAX_HEADER_BYTES} byte limit)"
                    )
                raw = fh.read(hlen)
                if len(raw) != hlen:
                    raise FileFormatError(f"{p}: truncated while reading (the file shrank)")
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + hlen else None
        except OSError as exc:
            raise InputError(f"{p}: cannot be read ({exc.strerror or exc})") from None
        self.data_offset = 8 + hlen
        self.data_size = size - self.data_offset
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as exc:
            raise FileFormatError(
                f"{p}: corrupted safetensors header (key {short_repr(exc.args[0])} appears twice)"
            ) from None
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise FileFormatError(f"{p}: not a safetensors file (header is not valid JSON)") from None
        if not isinstance(header, dict):
            raise FileFormatError(f"{p}: corrupted safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise FileFormatError(f"{p}: corrupted safetensors header (__metadata__ must map str to str)")
        # Metadata is kept as plain strings: never interpreted as paths, code or anything to follow.
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._check_entry(key, info)

    def _check_entry(self, key: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        p = self.path
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise FileFormatError(f"{p}: corrupted safetensors header (entry {short_repr(key)} is malformed)")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise FileFormatError(
                f"{p}: tensor {short_repr(key)} has unsupported dtype {short_repr(info['dtype'])}"
            )
        shape, offs = info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DIMS
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in shape)
            and isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise FileFormatError(f"{p}: corrupted safetensors header (entry {short_repr(key)} is malformed)")
        begin, end = offs
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != nbytes:
            raise FileFormatError(
                f"{p}: corrupted safetensors header (tensor {short_repr(key)}: offsets {offs} do not match "
                f"shape {shape} of {info['dtype']})"
            )
        if end > self.data_size:
            raise FileFormatError(
                f"{p}: truncated (tensor {short_repr(key)} needs bytes up to {end}, the file has "
                f"{self.data_size} after its header)"
            )
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entry(key)
        return dtype, shape

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if key not in self.entries:
            raise KeyNotFoundError(
                f"{self.path}: key {short_repr(key)} not found (keys present: {key_list(self.entries)})"
            )
        return self.entries[key]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` as a zero-copy view of the file (one aligned copy only if misaligned)."""
        dtype, shape, begin, end = self._entry(key)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        start = self.data_offset + begin
        if start % itemsize == 0:
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // itemsize, offset=start)
        else:
            raw = torch.frombuffer(self._mmap, dtype=torch.uint8, count=end - begin, offset=start)
            flat = raw.clone().view(dtype)
        return flat.view(shape)


def read_tensor(path: str | os.PathLike[str], key: str) -> torch.Tensor:
    """Read one tensor from a safetensors file (memory-mapped)."""
    return SafetensorsFile(path).tensor(key)


def hash_tensor(
    t: torch.Tensor, chunk_bytes: int = 64 << 20, progress: Callable[[int, int], None] | None = None
) -> str:
    """Content hash (xxh3-128) of a tensor's dtype, shape and bytes, streamed without a copy
    (~17 GB/s from the page cache on one core). `progress(done_bytes, total_bytes)` is called
    after each chunk."""
    h = xxhash.xxh3_128()
    h.update(f"{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    buf = raw.numpy()
    for i in range(0, buf.size, chunk_bytes):
        h.update(buf[i : i + chunk_bytes])
        if progress is not None:
            progress(min(i + chunk_bytes, buf.size), buf.size)
    return "xxh3_128:" + h.hexdigest()


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
    inputs = list(inputs)
    targets = [check_output_path(path, inputs) for path, _ in files]
    seen: set[tuple[str, str]] = set()
    for p in targets:
        key = (os.path.realpath(p.parent), p.name)  # the same folder under two names is one folder
        if key in seen:
            raise OutputError(f"{p}: the same output path is given twice")
        seen.add(key)
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

    # Commit: rename every file into place with signals held, then make the renames durable.
    replaced = 0
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


_DTYPE_NAMES = {dt: name for name, dt in DTYPES.items()}


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def safetensors_chunks(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list:
    """[header, tensor bytes, ...] of a safetensors file holding `tensors` and string `metadata`.

    The tensors' bytes are views of their memory, not copies (safetensors.torch.save copies every
    tensor into one bytes object first, ~35 ms for a 2560 x 2560 fp32 matrix). The layout is the
    format's own: an 8-byte little-endian header length, a JSON header padded with spaces to a
    multiple of 8 bytes, then the tensors' bytes back to back in key order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    views = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{key}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        views.append(_raw_bytes(t))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return [struct.pack("<Q", len(text)) + text, *views]


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    durable: bool = True,
) -> None:
    """Atomically write `tensors` and string metadata as a safetensors file, without copying them."""
    atomic_write_bytes(path, safetensors_chunks(tensors, metadata), inputs, durable=durable)
