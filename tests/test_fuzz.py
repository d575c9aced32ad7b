"""Fuzzing the readers and the CLI with malformed safetensors files and id tensors: the only
failure allowed is a RefframeError (exit status 1 from the CLI), and nothing may hang."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import refframe
from helpers import make_w
from refframe import RefframeError, RefframeWarning
from refframe.checks import check_ids
from refframe.cli import main
from refframe.inputs import load_ids, load_w
from refframe.tensorfile import SafetensorsFile

FUZZ = settings(
    max_examples=int(os.environ.get("REFFRAME_FUZZ_EXAMPLES", "150")),
    deadline=None,  # the alarm below catches a hang; a busy machine must not make this flaky
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 10


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    def fail(signum, frame):
        raise AssertionError(f"no result after {seconds} s: refframe hangs on this input")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def only_refframe_errors(fn, *args, **kwargs):
    """Call fn; a RefframeError is an accepted outcome, anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RefframeWarning)
            return fn(*args, **kwargs)
    except RefframeError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg, repr(msg)
        assert len(msg) < 2000, msg[:200]
        return None


def exercise_file(path: Path, out_dir: Path) -> None:
    """Everything that reads a user's file: the reader, W and id loading, build and verify."""
    f = only_refframe_errors(SafetensorsFile, path)
    if f is not None:
        for key in f.keys():
            t = only_refframe_errors(f.tensor, key)
            assert t is None or tuple(t.shape) == f.info(key)[1]
    only_refframe_errors(load_w, path)
    ids = only_refframe_errors(load_ids, path)
    if ids is not None:
        only_refframe_errors(check_ids, ids[0], 1000)
    out = out_dir / "frame.safetensors"
    for argv in (
        [
            "--debug",
            "build",
            "--W",
            str(path),
            "--cluster",
            str(path),
            "--out",
            str(out),
            "--backend",
            "torch",
        ],
        ["--debug", "build", "--W", str(path), "--cluster", str(path), "--out", str(out)],
        ["--debug", "verify", str(path)],
    ):
        rc = only_refframe_errors(main, argv)
        assert rc in (None, 0)
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def write(path: Path, header: bytes, data: bytes, hlen: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if hlen is None else hlen) + header + data)
    return path


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---------------------------------------------------------------------------------------------
# strategies

DTYPE_NAMES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "U64",
    "F8_E4M3",
    "f32",
    "",
]
ints = st.one_of(
    st.integers(min_value=-4, max_value=64),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64]),
)
json_scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def entries(draw):
    """A header entry: mostly plausible (known dtype, small shape, offsets that fit), each field
    broken with some probability, so that both the checks and the code behind them are reached."""
    which = draw(st.integers(0, 11))  # 0-3: that field is broken, 4: a field is missing, else valid
    broken = [which == i for i in range(4)]
    dtype = draw(json_values) if broken[0] else draw(st.sampled_from(DTYPE_NAMES[:11]))
    shape = draw(st.lists(ints, max_size=4) if broken[1] else st.lists(st.integers(0, 6), max_size=3))
    itemsize = (
        {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(dtype, 1)
        if isinstance(dtype, str)
        else 1
    )
    numel = 1
    for s in shape if isinstance(shape, list) else []:
        numel *= s if isinstance(s, int) else 1
    begin = draw(st.sampled_from([0, 0, 8, 16]))
    size = abs(numel) * itemsize + (draw(st.integers(-2, 2)) if broken[2] else 0)
    offsets = draw(st.one_of(st.lists(ints, max_size=3), json_values)) if broken[3] else [begin, begin + size]
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if which == 4:
        del entry[draw(st.sampled_from(sorted(entry)))]
    return entry


KEYS = st.sampled_from(
    ["W", "cluster_token_ids", "W_eigenvalues", "W_eigenvectors", "cluster_centroid", "x", ""]
)


@st.composite
def headers(draw):
    header = draw(st.dictionaries(KEYS, entries(), max_size=4))
    which = draw(st.integers(0, 3))  # 0: no metadata, 1: malformed, else str -> str
    if which == 1:
        header["__metadata__"] = draw(json_values)
    elif which > 1:
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=4))
    return header


# ---------------------------------------------------------------------------------------------
# tests


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_random_bytes(raw):
    with workdir() as d, no_hang():
        p = d / "x.safetensors"
        p.write_bytes(raw)
        exercise_file(p, d)


@FUZZ
@given(
    header=headers(),
    seed=st.integers(0, 2**32),
    data_delta=st.sampled_from([0, 0, 0, 0, -1, -7, 3]),
    hlen_delta=st.sampled_from([0, 0, 0, 0, 0, -1, 1, 7, 10**6]),
)
def test_fuzz_json_headers(header, seed, data_delta, hlen_delta):
    raw = json.dumps(header).encode()
    ends = [
        e["data_offsets"][1]
        for k, e in header.items()
        if k != "__metadata__"
        and isinstance(e, dict)
        and isinstance(e.get("data_offsets"), list)
        and len(e["data_offsets"]) == 2
        and isinstance(e["data_offsets"][1], int)
        and 0 <= e["data_offsets"][1] < 4096
    ]
    data = random.Random(seed).randbytes(max(0, max(ends, default=0) + data_delta))
    with workdir() as d, no_hang():
        p = write(d / "x.safetensors", raw, data, hlen=max(0, len(raw) + hlen_delta))
        exercise_file(p, d)


@FUZZ
@given(header=st.binary(max_size=120), data=st.binary(max_size=64))
def test_fuzz_header_bytes(header, data):
    with workdir() as d, no_hang():
        exercise_file(write(d / "x.safetensors", b"{" + header, data), d)


_GOOD: dict[str, bytes] = {}


def good_files() -> dict[str, bytes]:
    """A valid W/ids file and a valid frame file, built once."""
    if not _GOOD:
        with workdir() as d:
            W = make_w(64, 8, torch.float32)
            save_file({"W": W, "cluster_token_ids": torch.arange(0, 64, 5)}, d / "w.safetensors")
            frame = refframe.build_frame(W, torch.arange(0, 64, 5), backend="torch")
            refframe.save_frame(frame, d / "f.safetensors")
            _GOOD["w"] = (d / "w.safetensors").read_bytes()
            _GOOD["frame"] = (d / "f.safetensors").read_bytes()
    return _GOOD


@FUZZ
@given(
    which=st.sampled_from(["w", "frame"]),
    cut=st.floats(min_value=0.0, max_value=1.0),
    flips=st.lists(st.tuples(st.floats(min_value=0.0, max_value=1.0), st.integers(1, 255)), max_size=3),
)
def test_fuzz_damaged_valid_files(which, cut, flips):
    """Truncations and byte flips anywhere in a valid file."""
    buf = bytearray(good_files()[which])
    for where, mask in flips:
        buf[min(len(buf) - 1, int(where * len(buf)))] ^= mask
    if cut < 0.5:
        buf = buf[: int(cut * 2 * len(buf))]
    with workdir() as d, no_hang():
        p = d / "x.safetensors"
        p.write_bytes(bytes(buf))
        exercise_file(p, d)
        only_refframe_errors(refframe.verify_frame, p)


ID_DTYPES = [
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.float32,
    torch.float16,
    torch.bool,
]
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        ID_DTYPES.append(getattr(torch, _name))


@st.composite
def id_tensors(draw):
    dtype = draw(st.sampled_from(ID_DTYPES))
    shape = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
    numel = 1
    for s in shape:
        numel *= s
    values = draw(st.lists(st.integers(min_value=-(2**40), max_value=2**40), min_size=numel, max_size=numel))
    t = (
        torch.tensor(values, dtype=torch.int64).reshape(shape)
        if shape
        else torch.tensor(values[0] if values else 0)
    )
    if dtype == torch.bool:
        return t != 0
    if dtype.is_floating_point:
        return t.to(dtype)
    info = (
        torch.iinfo(dtype)
        if dtype not in (getattr(torch, "uint32", None), getattr(torch, "uint64", None))
        else None
    )
    if info is not None:
        t = t.clamp(info.min, info.max)
    else:
        t = t.abs()
    return t.to(dtype)


@FUZZ
@given(ids=id_tensors(), n=st.integers(min_value=2, max_value=100))
def test_fuzz_id_tensors(ids, n):
    with no_hang():
        out = only_refframe_errors(check_ids, ids, n)
        if out is not None:
            assert out.dtype == torch.int64 and out.dim() == 1 and out.numel() > 0
            assert int(out.min()) >= 0 and int(out.max()) < n
        with workdir() as d:
            W = make_w(n, 4, torch.float32)
            save_file({"W": W}, d / "w.safetensors")
            save_file({"cluster_token_ids": ids.contiguous()}, d / "ids.safetensors")
            rc = only_refframe_errors(
                main,
                [
                    "--debug",
                    "build",
                    "--W",
                    str(d / "w.safetensors"),
                    "--cluster",
                    str(d / "ids.safetensors"),
                    "--out",
                    str(d / "f.safetensors"),
                    "--backend",
                    "torch",
                ],
            )
            assert rc in (None, 0)
            assert (rc == 0) == (out is not None)


@pytest.mark.parametrize("value", [[1, 2, "x"], "abc", None, [[1], [2, 3]], object()])
def test_ids_that_are_not_tensors(value):
    with pytest.raises(refframe.ClusterIdsError):
        check_ids(value, 10)
