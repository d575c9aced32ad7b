"""safetensors in and out: a validating, memory-mapped reader and an atomic writer.

Only the safetensors format is ever read (no pickle). The reader checks the header against the file
size before touching any tensor, and returns tensors that are views of a private memory map, so a
large W is paged in on demand and never copied whole.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save as _serialize

from .errors import InputError, KeyNotFoundError, OutputError

MAX_HEADER_BYTES = 100 * 1024 * 1024

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


class SafetensorsFile:
    """A validated, read-only view of one safetensors file.

    Raises InputError with a one-line message naming the file if it is missing, not a regular file,
    unreadable, or not a well-formed safetensors file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p}: is a directory, expected a .safetensors file")
        if not p.is_file():
            raise InputError(f"{p}: not a regular file")
        try:
            fh = open(p, "rb")
        except OSError as exc:
            raise InputError(f"{p}: cannot be read ({exc.strerror or exc})") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise InputError(f"{p}: not a safetensors file (only {size} bytes)")
            (hlen,) = struct.unpack("<Q", fh.read(8))
            if hlen > min(size - 8, MAX_HEADER_BYTES):
                raise InputError(
                    f"{p}: not a safetensors file or truncated (header length {hlen} exceeds the "
                    f"{size - 8} bytes that follow)"
                )
            raw = fh.read(hlen)
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + hlen else None
        self.data_offset = 8 + hlen
        self.data_size = size - self.data_offset
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{p}: not a safetensors file (header is not valid JSON)") from None
        if not isinstance(header, dict):
            raise InputError(f"{p}: corrupted safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise InputError(f"{p}: corrupted safetensors header (__metadata__ must map str to str)")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            self.entries[key] = self._check_entry(key, info)

    def _check_entry(self, key: str, info: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        p = self.path
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise InputError(f"{p}: corrupted safetensors header (entry {key!r} is malformed)")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise InputError(f"{p}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
        shape, offs = info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise InputError(f"{p}: corrupted safetensors header (entry {key!r} is malformed)")
        begin, end = offs
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != nbytes:
            raise InputError(
                f"{p}: corrupted safetensors header (tensor {key!r}: offsets {offs} do not match "
                f"shape {shape} of {info['dtype']})"
            )
        if end > self.data_size:
            raise InputError(
                f"{p}: truncated (tensor {key!r} needs bytes up to {end}, the file has "
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
            have = ", ".join(sorted(self.entries)) or "none"
            raise KeyNotFoundError(f"{self.path}: key {key!r} not found (keys present: {have})")
        return self.entries[key]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor `key` as a zero-copy view of the file (a copy only if misaligned)."""
        dtype, shape, begin, end = self._entry(key)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        start = self.data_offset + begin
        if start % itemsize == 0:
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=(end - begin) // itemsize, offset=start)
        else:
            flat = torch.frombuffer(bytearray(self._mmap[start : self.data_offset + end]), dtype=dtype)
        return flat.view(shape)


def read_tensor(path: str | os.PathLike[str], key: str) -> torch.Tensor:
    """Read one tensor from a safetensors file (memory-mapped)."""
    return SafetensorsFile(path).tensor(key)


def hash_tensor(t: torch.Tensor, chunk_bytes: int = 64 << 20) -> str:
    """Content hash (xxh3-128) of a tensor's dtype, shape and bytes, streamed without a copy."""
    h = xxhash.xxh3_128()
    h.update(f"{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    buf = raw.numpy()
    for i in range(0, buf.size, chunk_bytes):
        h.update(buf[i : i + chunk_bytes])
    return "xxh3_128:" + h.hexdigest()


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any work, if `path` cannot receive the output file."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: output path is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{p}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: output directory {parent} is not writable")
    return p


def atomic_write_bytes(path: str | os.PathLike[str], chunks: Iterable[bytes | memoryview]) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`.

    On any failure (exception, KeyboardInterrupt, SystemExit, disk full) the temporary file is
    removed and whatever was at `path` before is left untouched.
    """
    p = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise OutputError(
            f"{p}: could not write output ({exc.strerror or exc}); nothing was changed"
        ) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(p.parent)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Atomically write `tensors` (CPU, contiguous) and string metadata as a safetensors file."""
    data = _serialize({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, [data])
