"""Errors, inputs: a W or cluster-id file that is missing, unreadable, not safetensors, malformed or
truncated, or holds the wrong keys; a W of the wrong shape or dtype or with NaN/Inf; bad or
duplicate cluster ids. Each ends in one line (CLI) or a specific RefframeError (API), and the
failing build changes nothing on disk."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
import refframe.checks as checks
import refframe.tensorfile as rio
from helpers import D, N, assert_one_line_error, build_args, cli, expect_build_error, make_w
from refframe import (
    ClusterIdsError,
    FileFormatError,
    InputError,
    KeyNotFoundError,
    NonFiniteError,
    RefframeWarning,
)
from refframe.cli import main
from refframe.inputs import load_ids, load_w
from refframe.tensorfile import SafetensorsFile

# ---------------------------------------------------------------------------------------------
# files


def write_raw(path: Path, header: object, data: bytes = b"", *, hlen: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data)
    return path


def test_missing_file(model, capsys):
    missing = model["dir"] / "missing.safetensors"
    with pytest.raises(InputError, match="missing.safetensors: no such file"):
        SafetensorsFile(missing)
    expect_build_error(capsys, model, "missing.safetensors: no such file", w=missing)


def test_directory_instead_of_file(model, capsys):
    sub = model["dir"] / "sub"
    sub.mkdir()
    with pytest.raises(InputError, match="is a directory, expected a .safetensors file"):
        load_w(sub)
    expect_build_error(capsys, model, "sub: is a directory", w=sub)


def test_missing_model_dir(tmp_path, capsys):
    rc, err = cli(capsys, "build", "--model-dir", str(tmp_path / "nope"))
    assert_one_line_error(rc, err, "nope: model directory does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_chmod(model, capsys):
    model["W"].chmod(0)
    try:
        expect_build_error(capsys, model, "W.safetensors: cannot be read (Permission denied)")
    finally:
        model["W"].chmod(0o644)


def test_unreadable_file(model, capsys, monkeypatch):
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("W.safetensors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rio, "open", deny, raising=False)
    with pytest.raises(InputError, match=r"W.safetensors: cannot be read \(Permission denied\)"):
        SafetensorsFile(model["W"])
    expect_build_error(capsys, model, "W.safetensors: cannot be read (Permission denied)")


def test_not_a_safetensors_file(model, capsys):
    junk = model["dir"] / "junk.safetensors"
    junk.write_text("name,value\nW,1.0\n" * 4)
    with pytest.raises(FileFormatError, match="not a safetensors file"):
        SafetensorsFile(junk)
    expect_build_error(capsys, model, "junk.safetensors: not a safetensors file (it starts with text: 'name,val')", w=junk)
    as_json = model["dir"] / "ids.json"
    as_json.write_text('{"cluster_token_ids": [1, 2, 3]}\n')
    expect_build_error(capsys, model, "ids.json: not a safetensors file (it starts with text: '{\"cluste')", w=as_json)
    tiny = model["dir"] / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    expect_build_error(capsys, model, "tiny.safetensors: not a safetensors file (only 3 bytes)", w=tiny)


def test_truncated_file(model, capsys):
    raw = model["W"].read_bytes()
    cut = model["dir"] / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(FileFormatError, match=r"truncated \(tensor 'W' needs bytes up to 19200"):
        SafetensorsFile(cut)
    expect_build_error(capsys, model, "cut.safetensors: truncated (tensor 'W' needs bytes", w=cut)


def test_corrupted_header(model, capsys):
    raw = bytearray(model["W"].read_bytes())
    raw[8] = ord("#")  # the opening brace of the JSON header
    bad = model["dir"] / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    expect_build_error(
        capsys, model, "bad.safetensors: not a safetensors file (header is not valid JSON)", w=bad
    )


@pytest.mark.parametrize(
    "header, data, message",
    [
        ([1, 2], b"", "corrupted safetensors header (not a JSON object)"),
        ({"W": "x"}, b"", "corrupted safetensors header (entry 'W' is malformed)"),
        ({"W": {"dtype": "F32", "shape": [2]}}, b"", "entry 'W' is malformed"),
        ({"W": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "entry 'W' is malformed"),
        ({"W": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype 'Q7'"),
        (
            {"W": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "offsets [0, 8] do not match shape [3] of F32",
        ),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map str to str"),
    ],
)
def test_malformed_header(tmp_path, header, data, message):
    with pytest.raises(FileFormatError, match=re.escape(message)):
        SafetensorsFile(write_raw(tmp_path / "h.safetensors", header, data))


def test_duplicate_key_in_header(tmp_path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = ('{"W": ' + entry + ', "W": ' + entry + "}").encode()
    with pytest.raises(FileFormatError, match="key 'W' appears twice"):
        SafetensorsFile(write_raw(tmp_path / "dup.safetensors", raw, b"\0" * 4))


def test_header_claims_more_bytes_than_exist(model, capsys):
    raw = model["W"].read_bytes()
    big = model["dir"] / "big.safetensors"
    big.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    with pytest.raises(FileFormatError, match="header length .* exceeds the .* bytes that follow"):
        SafetensorsFile(big)
    expect_build_error(
        capsys, model, "big.safetensors: not a safetensors file or truncated (header length", w=big
    )


def test_key_not_found_lists_keys(model, capsys):
    other = model["dir"] / "other.safetensors"
    save_file({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int32)}, other)
    with pytest.raises(KeyNotFoundError, match=r"key 'lm_head' not found \(keys present: a, b\)"):
        load_w(other, "lm_head")
    expect_build_error(
        capsys,
        model,
        "other.safetensors: key 'lm_head' not found (keys present: a, b)",
        w=other,
        extra=["--W-key", "lm_head"],
    )
    expect_build_error(
        capsys,
        model,
        "other.safetensors: key 'W' not found and no other 2-D floating-point tensor (keys present: a, b)",
        w=other,
    )


def test_more_than_one_candidate_key(model, capsys):
    two = model["dir"] / "two.safetensors"
    save_file({"embed": torch.zeros(4, 3), "lm_head": torch.zeros(4, 3)}, two)
    with pytest.raises(KeyNotFoundError, match="several candidates"):
        load_w(two)
    expect_build_error(
        capsys,
        model,
        "two.safetensors: key 'W' not found and several candidates for 2-D floating-point tensor: "
        "embed, lm_head; choose one with --W-key",
        w=two,
    )


# ---------------------------------------------------------------------------------------------
# W


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.zeros(N * D), f"expected a 2-D matrix (tokens x dims), got shape ({N * D},)"),
        (torch.zeros(2, 3, 4), "expected a 2-D matrix (tokens x dims), got shape (2, 3, 4)"),
        (
            torch.zeros(N, D, dtype=torch.int32),
            "expected a floating-point dtype (bf16, fp16, fp32), got int32",
        ),
        (torch.zeros(N, D, dtype=torch.bool), "expected a floating-point dtype (bf16, fp16, fp32), got bool"),
        (torch.zeros(1, D), "needs at least 2 rows (tokens) for a covariance, got 1"),
        (torch.zeros(N, 0), "has d = 0 columns"),
    ],
    ids=["1-D", "3-D", "int32", "bool", "N=1", "d=0"],
)
def test_bad_w_shape_or_dtype(model, capsys, tensor, message):
    bad = model["dir"] / "badw.safetensors"
    save_file({"W": tensor}, bad)
    with pytest.raises(InputError, match=re.escape(message)):
        refframe.build_frame(tensor, torch.tensor([0]))
    expect_build_error(capsys, model, f"badw.safetensors:W: {message}", w=bad)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_nonfinite_w_reports_count_and_first_row(model, capsys, backend):
    W = load_file(model["W"])["W"]
    W[[41, 200], 3] = float("nan")
    W[77, 0] = float("inf")
    W[250, 5] = float("-inf")
    bad = model["dir"] / "nan.safetensors"
    save_file({"W": W}, bad)
    with pytest.raises(NonFiniteError, match=r"4 NaN/Inf value\(s\) in W, first in row 41"):
        refframe.build_frame(W, torch.tensor([0, 1]), backend=backend)
    expect_build_error(capsys, model, "nan.safetensors:W: 4 NaN/Inf value(s) in W, first in row 41", w=bad)


def test_nonfinite_scan_is_chunked_and_only_runs_when_needed(monkeypatch):
    W = make_w(N, D, torch.bfloat16)
    W[123, 7] = float("nan")
    W[299, 0] = float("inf")
    # a chunk of one row at a time finds the same count and first row as one big chunk
    assert checks.find_nonfinite(W, chunk_bytes=1) == (2, 123)
    assert checks.find_nonfinite(W) == (2, 123)
    assert checks.find_nonfinite(make_w(N, D, torch.float16)) == (0, -1)

    def no_scan(*args, **kwargs):
        raise AssertionError("a finite W must not be scanned")

    monkeypatch.setattr(checks, "find_nonfinite", no_scan)
    refframe.build_frame(make_w(N, D, torch.float32), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------
# cluster ids


def save_ids(m, ids: torch.Tensor, key: str = "cluster_token_ids") -> Path:
    p = m["dir"] / "badids.safetensors"
    save_file({key: ids}, p)
    return p


def test_ids_missing_key(model, capsys):
    p = save_ids(model, torch.zeros(3), key="scores")
    with pytest.raises(KeyNotFoundError):
        load_ids(p)
    expect_build_error(
        capsys,
        model,
        "badids.safetensors: key 'cluster_token_ids' not found and no other 1-D integer tensor "
        "(keys present: scores)",
        ids=p,
    )
    expect_build_error(
        capsys, model, "key 'ids' not found (keys present: scores)", ids=p, extra=["--cluster-key", "ids"]
    )


@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([1.0, 2.0]), "expected an integer dtype, got float32"),
        (torch.tensor([True, False]), "expected an integer dtype, got bool"),
        (torch.tensor([[1, 2], [3, 4]]), "expected a 1-D tensor, got shape (2, 2)"),
        (torch.zeros(0, dtype=torch.int64), "empty; a centroid needs at least one id"),
        (torch.tensor([5, -1, 7, -3]), f"2 id(s) outside [0, {N}); first: ids[1] = -1"),
        (torch.tensor([0, N, N + 5, 1], dtype=torch.int32), f"2 id(s) outside [0, {N}); first: ids[1] = {N}"),
        (
            torch.tensor([2**63 + 1], dtype=torch.uint64),
            f"1 id(s) outside [0, {N}); first: ids[0] = {2**63 + 1}",
        ),
    ],
    ids=["float", "bool", "2-D", "empty", "negative", ">=N", "uint64"],
)
def test_bad_ids(model, capsys, ids, message):
    with pytest.raises(ClusterIdsError, match=re.escape(message)):
        refframe.build_frame(make_w(N, D, torch.float32), ids)
    p = save_ids(model, ids)
    expect_build_error(capsys, model, f"badids.safetensors:cluster_token_ids: {message}", ids=p)


def test_duplicate_ids_warn_and_count_as_given(model, capsys):
    W = make_w(N, D, torch.float32)
    ids = torch.tensor([4, 9, 4, 11, 9, 4])
    with pytest.warns(
        RefframeWarning, match=r"cluster ids: 3 duplicate id\(s\) \(6 ids, 3 distinct\), first: ids\[2\] = 4"
    ):
        frame = refframe.build_frame(W, ids)
    assert frame.cluster_size == 6
    expected = W[ids].double().mean(0).float()  # the seed's W[ids].mean(0): repeats count as given
    assert torch.allclose(frame.centroid, expected, atol=1e-6)

    p = save_ids(model, ids)
    capsys.readouterr()
    assert main(build_args(model, ids=p)) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "refframe: warning: "
        + f"{p}:cluster_token_ids: 3 duplicate id(s) (6 ids, 3 distinct), first: ids[2] = 4; each is counted as often as "
        "it appears, as the seed notebook does"
    ]
