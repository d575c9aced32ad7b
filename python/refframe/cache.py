"""The PCA cache: the mean, eigenvalues and eigenvectors of a W, computed once and reused.

An entry is keyed by W's content hash (tensorfile.hash_tensor: xxh3-128 of dtype, shape and bytes) and a
numerics tag (NUMERICS_VERSION and the eigh dtype). The tag does not name the backend or device: a
PCA computed by the native kernels serves a torch build and the other way round (the entry records
which one computed it). Bump NUMERICS_VERSION whenever the maths that produces the PCA changes.

Layout of the cache directory (default $REFFRAME_CACHE_DIR, else $XDG_CACHE_HOME/refframe, else
~/.cache/refframe):

    pca/<hash>.<tag>.safetensors   mean, eigenvalues, eigenvectors (fp32) + metadata with a checksum
    index.json                     stat fast path: (resolved path, tensor key) -> size, mtime_ns, ctime_ns,
                                   inode, device -> content hash, as git's index does
    .lock                          fcntl.flock'ed while an entry or the index is written

Safety: entries and the index are written to a temporary file and renamed (atomic.atomic_write_bytes),
under the lock, so concurrent builds never see or leave a partial file. An entry whose checksum,
shapes or metadata do not match is ignored with a RefframeWarning and rebuilt; so is a corrupt
index. A cache that cannot be written (read-only, disk full) only costs a warning.

Racy entries: as in git, a file modified within the same timestamp tick as its hashing could keep
its size and mtime; a record is therefore trusted only when the file's mtime is at least RACY_NS
older than the moment hashing began. A younger file is hashed again (cheap) until it is old enough.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from . import tensorfile
from .atomic import atomic_write_bytes
from .errors import RefframeError, RefframeWarning
from .layout import __version__
from .tensorfile import save_tensors

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: writes stay atomic, only the lock is missing
    fcntl = None  # type: ignore[assignment]

NUMERICS_VERSION = 2  # 2: the native covariance removes the rank-one term of its fp32-rounded mean
ENTRY_FORMAT = "refframe-pca-cache/1"
INDEX_FORMAT = "refframe-stat-index/1"
INDEX_NAME = "index.json"
LOCK_NAME = ".lock"
ENTRY_DIR = "pca"
RACY_NS = 2_000_000_000
INDEX_LIMIT = 4096  # records kept in index.json (the most recently hashed)
CACHE_DIR_ENV = "REFFRAME_CACHE_DIR"
NO_CACHE_ENV = "REFFRAME_NO_CACHE"  # 1: builds neither read nor write the cache (as --no-cache)
KEY_MEAN = "mean"
KEY_EIGENVALUES = "eigenvalues"
KEY_EIGENVECTORS = "eigenvectors"
_HASH_RE = re.compile(r"^xxh3_128:([0-9a-f]{32})$")


def default_cache_dir() -> Path:
    """$REFFRAME_CACHE_DIR, else $XDG_CACHE_HOME/refframe, else ~/.cache/refframe."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "refframe"
    return Path.home() / ".cache" / "refframe"


def cache_disabled_by_env() -> bool:
    """True when REFFRAME_NO_CACHE is set to anything but "" or "0"."""
    return os.environ.get(NO_CACHE_ENV, "") not in ("", "0")


def numerics_tag(eigh_dtype: torch.dtype = torch.float32) -> str:
    """The part of the cache key that names the numerics: version and eigh dtype."""
    return f"pca-v{NUMERICS_VERSION}-eigh_{str(eigh_dtype).removeprefix('torch.')}"


def _warn(msg: str) -> None:
    warnings.warn(msg, RefframeWarning, stacklevel=3)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over each tensor's name, dtype, shape and bytes (the entry's own checksum)."""
    h = xxhash.xxh3_128()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "xxh3_128:" + h.hexdigest()


@dataclass
class CachedPCA:
    """A PCA read from (or just written to) the cache."""

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    backend: str
    device: str
    path: Path


@dataclass
class HashResult:
    """W's content hash and how it was obtained: "stat" (index record, no read), "hashed"."""

    w_hash: str
    how: str
    seconds: float
    nbytes: int


class PCACache:
    """A PCA cache in `directory` (default_cache_dir() when None). durable=False writes entries
    and the index without fsync (still atomically renamed), as `refframe build --no-fsync` asks."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, durable: bool = True):
        self.dir = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.durable = durable
        self._index_warned = False

    # -- locations -------------------------------------------------------------------------------

    def entry_path(self, w_hash: str, tag: str) -> Path:
        m = _HASH_RE.match(w_hash)
        if m is None:
            raise ValueError(f"not a refframe content hash: {w_hash!r}")
        return self.dir / ENTRY_DIR / f"{m.group(1)}.{tag}.safetensors"

    @property
    def index_path(self) -> Path:
        return self.dir / INDEX_NAME

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock on the cache directory (creates it), for writers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_NAME, "a+b") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- content hash with the stat fast path ----------------------------------------------------

    def _read_index(self) -> dict:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn_index(f"cannot be read ({exc.strerror or exc})")
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
                raise ValueError("unknown format")
            files = data.get("files")
            if not isinstance(files, dict):
                raise ValueError("no files")
            return files
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._warn_index("is corrupt; it is ignored and rebuilt")
            return {}

    def _warn_index(self, why: str) -> None:
        if not self._index_warned:
            self._index_warned = True
            _warn(f"PCA cache index {self.index_path} {why}")

    @staticmethod
    def _record_key(path: Path, key: str) -> str:
        return json.dumps([str(path), key])

    def lookup_stat(self, path: str | os.PathLike[str], key: str) -> str | None:
        """The content hash recorded for this unchanged file and tensor key, or None."""
        p = Path(path).expanduser().resolve()
        try:
            st = os.stat(p)
        except (OSError, ValueError):
            return None
        rec = self._read_index().get(self._record_key(p, key))
        if not isinstance(rec, dict):
            return None
        try:
            same = (
                rec["size"] == st.st_size
                and rec["mtime_ns"] == st.st_mtime_ns
                and rec["ctime_ns"] == st.st_ctime_ns
                and rec["ino"] == st.st_ino
                and rec["dev"] == st.st_dev
                and st.st_mtime_ns < rec["hashed_ns"] - RACY_NS
            )
            w_hash = rec["hash"]
        except (KeyError, TypeError):
            return None
        if same and isinstance(w_hash, str) and _HASH_RE.match(w_hash):
            return w_hash
        return None

    def record_stat(
        self, path: str | os.PathLike[str], key: str, st: os.stat_result, w_hash: str, hashed_ns: int
    ) -> None:
        """Remember that (path, key) with this stat has content hash `w_hash` (hashing began at
        hashed_ns). Failures only warn."""
        p = Path(path).expanduser().resolve()
        rec = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino,
            "dev": st.st_dev,
            "hash": w_hash,
            "hashed_ns": hashed_ns,
        }
        try:
            with self.lock():
                files = self._read_index()
                files[self._record_key(p, key)] = rec
                if len(files) > INDEX_LIMIT:
                    keep = sorted(files.items(), key=lambda kv: -_hashed_ns(kv[1]))[:INDEX_LIMIT]
                    files = dict(keep)
                body = json.dumps({"format": INDEX_FORMAT, "files": files}, indent=0).encode()
                atomic_write_bytes(self.index_path, [body], durable=self.durable)
        except (OSError, RefframeError) as exc:
            _warn(
                f"could not update the PCA cache index in {self.dir} ({_why(exc)}); W will be hashed again next time"
            )

    def content_hash(
        self,
        W: torch.Tensor,
        path: str | os.PathLike[str] | None = None,
        key: str = "",
        progress: Callable[[int, int], None] | None = None,
    ) -> HashResult:
        """W's content hash: from the index if `path` (the file W is memory-mapped from) is
        unchanged since it was last hashed, else by hashing W (and recording it)."""
        nbytes = W.numel() * W.element_size()
        t0 = time.perf_counter()
        if path is not None:
            hit = self.lookup_stat(path, key)
            if hit is not None:
                return HashResult(hit, "stat", time.perf_counter() - t0, nbytes)
            try:
                before = os.stat(Path(path).expanduser().resolve())
            except (OSError, ValueError):
                before = None
        hashed_ns = time.time_ns()
        w_hash = tensorfile.hash_tensor(W, progress=progress)
        seconds = time.perf_counter() - t0
        if path is not None and before is not None:
            try:
                after = os.stat(Path(path).expanduser().resolve())
            except (OSError, ValueError):
                after = None
            unchanged = after is not None and (
                (after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino, after.st_dev)
                == (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino, before.st_dev)
            )
            if unchanged:  # a file that changed while it was hashed is not recorded
                self.record_stat(path, key, before, w_hash, hashed_ns)
        return HashResult(w_hash, "hashed", seconds, nbytes)

    # -- entries ---------------------------------------------------------------------------------

    def load(self, w_hash: str, tag: str, d: int | None = None) -> CachedPCA | None:
        """The entry for (w_hash, tag), or None if there is none; a damaged entry is reported with a
        RefframeWarning and treated as missing (the build recomputes and replaces it)."""
        p = self.entry_path(w_hash, tag)
        if not p.exists():
            return None
        try:
            return self._read_entry(p, w_hash, tag, d)
        except (RefframeError, OSError, ValueError, RuntimeError) as exc:
            if not p.exists():  # removed meanwhile (cache cleared by hand): simply a miss
                return None
            _warn(f"PCA cache entry {p} is damaged ({_why(exc)}); ignoring it and recomputing the PCA")
            return None

    def _read_entry(self, p: Path, w_hash: str, tag: str, d: int | None) -> CachedPCA:
        f = tensorfile.SafetensorsFile(p)
        meta = f.metadata
        if meta.get("format") != ENTRY_FORMAT:
            raise ValueError(f"format {tensorfile.short_repr(meta.get('format'))}, expected {ENTRY_FORMAT}")
        if meta.get("w_hash") != w_hash or meta.get("numerics") != tag:
            raise ValueError("its metadata names another W or other numerics")
        keys = (KEY_MEAN, KEY_EIGENVALUES, KEY_EIGENVECTORS)
        if sorted(f.keys()) != sorted(keys):
            raise ValueError(f"tensors {tensorfile.key_list(f.keys())}, expected {', '.join(keys)}")
        t = {k: f.tensor(k) for k in keys}
        dim = t[KEY_MEAN].shape[0] if t[KEY_MEAN].dim() == 1 else -1
        if (
            any(x.dtype != torch.float32 for x in t.values())
            or t[KEY_MEAN].shape != (dim,)
            or t[KEY_EIGENVALUES].shape != (dim,)
            or t[KEY_EIGENVECTORS].shape != (dim, dim)
            or (d is not None and dim != d)
        ):
            raise ValueError("tensor shapes or dtypes do not match")
        if meta.get("checksum") != _checksum(t):
            raise ValueError("checksum mismatch")
        return CachedPCA(
            mean=t[KEY_MEAN].clone(),
            eigenvalues=t[KEY_EIGENVALUES].clone(),
            eigenvectors=t[KEY_EIGENVECTORS].clone(),
            backend=meta.get("backend", ""),
            device=meta.get("device", ""),
            path=p,
        )

    def store(
        self,
        w_hash: str,
        tag: str,
        mean: torch.Tensor,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        *,
        backend: str = "",
        device: str = "",
        info: dict[str, str] | None = None,
    ) -> Path | None:
        """Write the entry (atomically, under the lock); returns its path, or None (with a warning)
        if the cache cannot be written. An intact entry written meanwhile by another build is kept."""
        p = self.entry_path(w_hash, tag)
        t = {
            KEY_MEAN: mean.detach().to("cpu", torch.float32).contiguous(),
            KEY_EIGENVALUES: eigenvalues.detach().to("cpu", torch.float32).contiguous(),
            KEY_EIGENVECTORS: eigenvectors.detach().to("cpu", torch.float32).contiguous(),
        }
        meta = {
            **(info or {}),
            "format": ENTRY_FORMAT,
            "w_hash": w_hash,
            "numerics": tag,
            "backend": backend,
            "device": device,
            "refframe_version": __version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checksum": _checksum(t),
        }
        try:
            with self.lock():
                p.parent.mkdir(parents=True, exist_ok=True)
                if p.exists():
                    try:
                        self._read_entry(p, w_hash, tag, int(t[KEY_MEAN].shape[0]))
                        return p  # another build wrote it meanwhile
                    except (RefframeError, OSError, ValueError, RuntimeError):
                        pass
                save_tensors(p, t, meta, durable=self.durable)
        except (OSError, RefframeError) as exc:
            _warn(
                f"could not write the PCA cache entry in {self.dir} ({_why(exc)}); the build goes on without it"
            )
            return None
        return p


def _hashed_ns(rec: object) -> int:
    try:
        return int(rec["hashed_ns"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return 0


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
