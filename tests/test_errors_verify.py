"""Errors, verify: a frame file truncated, with bytes appended, flipped or edited (tensors or
metadata), checked against its source or against the checksums recorded at write time; each
damage is named in one line (CLI) or a VerificationError (API)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
from helpers import D, N, assert_one_line_error, cli, make_w
from refframe import InputError, VerificationError
from refframe.inputs import load_ids, load_w
from refframe.tensorfile import SafetensorsFile

# ---------------------------------------------------------------------------------------------
# truncated, missing, appended to


def expect_verify_error(capsys, model, bad: Path, fragment: str, *, with_source: bool = True) -> None:
    args = ["verify", str(bad)]
    if with_source:
        args += ["--W", str(model["W"]), "--cluster", str(model["ids"])]
    rc, err = cli(capsys, *args)
    assert_one_line_error(rc, err, fragment)


def test_verify_truncated_file(model, capsys):
    raw = model["out"].read_bytes()
    bad = model["dir"] / "cut.safetensors"
    bad.write_bytes(raw[:-10])
    with pytest.raises(VerificationError, match="truncated"):
        refframe.verify_frame(bad)
    expect_verify_error(
        capsys, model, bad, "cut.safetensors: truncated (tensor 'cluster_centroid' needs bytes"
    )


def test_verify_missing_frame(model, capsys):
    with pytest.raises(InputError, match="no such file"):
        refframe.verify_frame(model["dir"] / "none.safetensors")


def test_verify_appended_bytes(model, capsys):
    bad = model["dir"] / "appended.safetensors"
    bad.write_bytes(model["out"].read_bytes() + b"\0" * 12)
    expect_verify_error(capsys, model, bad, "12 unexpected byte(s) after the last tensor")


# ---------------------------------------------------------------------------------------------
# flipped bits


def tensor_span(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor `key`'s data in a safetensors file."""
    f = SafetensorsFile(path)
    _, _, begin, end = f.entries[key]
    return f.data_offset + begin, f.data_offset + end


def edit_bytes(path: Path, dst: Path, fn) -> Path:
    buf = bytearray(path.read_bytes())
    fn(buf)
    dst.write_bytes(bytes(buf))
    return dst


def _flip(path: Path, dst: Path, key: str, index: int, byte: int, mask: int) -> Path:
    start, _ = tensor_span(path, key)
    pos = start + 4 * index + byte

    def fn(buf):
        buf[pos] ^= mask

    return edit_bytes(path, dst, fn)


def test_verify_flipped_exponent_in_eigenvectors(model, capsys):
    bad = _flip(model["out"], model["dir"] / "f.safetensors", "W_eigenvectors", D * 2 + 1, 3, 0x40)
    with pytest.raises(VerificationError, match="eigenvectors are not orthonormal"):
        refframe.verify_frame(bad)
    expect_verify_error(capsys, model, bad, "eigenvectors are not orthonormal")


def test_verify_flipped_exponent_in_leading_eigenvalue(model, capsys):
    bad = _flip(model["out"], model["dir"] / "f.safetensors", "W_eigenvalues", 0, 3, 0x40)
    expect_verify_error(capsys, model, bad, "eigenpair 0 does not satisfy C v = lambda v")
    # without W, the checksum recorded at write time still catches it
    expect_verify_error(capsys, model, bad, "W_eigenvalues does not match the checksum", with_source=False)


def test_verify_flipped_exponent_in_later_eigenvalue(model, capsys):
    bad = _flip(model["out"], model["dir"] / "f.safetensors", "W_eigenvalues", 5, 3, 0x40)
    expect_verify_error(capsys, model, bad, "eigenvalues not in descending order: W_eigenvalues[5]")


def test_verify_flipped_low_bit_caught_by_checksum(model, capsys):
    bad = _flip(model["out"], model["dir"] / "f.safetensors", "W_eigenvectors", 7, 0, 0x01)
    expect_verify_error(capsys, model, bad, "W_eigenvectors does not match the checksum recorded")


def test_verify_flipped_byte_in_centroid(model, capsys):
    bad = _flip(model["out"], model["dir"] / "f.safetensors", "cluster_centroid", 2, 2, 0x40)
    expect_verify_error(capsys, model, bad, "cluster_centroid differs from the mean of W[ids]")
    expect_verify_error(capsys, model, bad, "cluster_centroid does not match the checksum", with_source=False)


def test_verify_flipped_sign_breaks_convention(model, capsys):
    """Negating one eigenvector keeps a valid eigenpair but breaks the recorded sign convention."""
    start, _ = tensor_span(model["out"], "W_eigenvectors")

    def negate_column(buf, col=3):
        for row in range(D):
            buf[start + 4 * (row * D + col) + 3] ^= 0x80

    bad = edit_bytes(model["out"], model["dir"] / "neg.safetensors", negate_column)
    expect_verify_error(capsys, model, bad, "eigenvector 3 breaks the file's sign convention")


# ---------------------------------------------------------------------------------------------
# edited tensors, the wrong source, edited metadata


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda t: t["W_eigenvectors"][:, 1].mul_(1.01), "eigenvectors are not orthonormal"),
        (lambda t: t["W_eigenvalues"].mul_(1.01), "does not satisfy C v = lambda v"),
        (
            lambda t: (t["W_eigenvalues"].mul_(1.01), t["W_eigenvectors"].mul_(1.01)),
            "eigenvectors are not orthonormal",
        ),
        (lambda t: t["cluster_centroid"].add_(0.01), "cluster_centroid differs from the mean of W[ids]"),
        (lambda t: t.pop("W_eigenvectors"), "missing key 'W_eigenvectors'"),
        (lambda t: t.__setitem__("mean", torch.zeros(D)), "unexpected key 'mean'"),
        (
            lambda t: t.__setitem__("W_eigenvectors", t["W_eigenvectors"].half()),
            "W_eigenvectors has dtype float16",
        ),
        (lambda t: t.__setitem__("cluster_centroid", torch.zeros(D + 1)), "cluster_centroid has shape [17]"),
    ],
    ids=["scaled vector", "scaled values", "scaled pairs", "centroid", "missing", "extra", "dtype", "shape"],
)
def test_verify_edited_tensors(model, capsys, edit, fragment):
    f = SafetensorsFile(model["out"])
    t = {k: f.tensor(k).clone() for k in f.keys()}
    edit(t)
    bad = model["dir"] / "edited.safetensors"
    save_file(t, bad, metadata=f.metadata)
    with pytest.raises(VerificationError, match=re.escape(fragment)):
        refframe.verify_frame(bad, load_w(model["W"])[0], load_ids(model["ids"])[0])
    expect_verify_error(capsys, model, bad, fragment)


def test_verify_wrong_source(model, capsys):
    other = model["dir"] / "other.safetensors"
    save_file({"W": make_w(N, D + 1, torch.float32)}, other)
    rc, err = cli(capsys, "verify", str(model["out"]), "--W", str(other))
    assert_one_line_error(rc, err, "other.safetensors:W has d = 17 columns, the frame has d = 16")
    W = load_file(model["W"])["W"]
    W[10, 2] = float("nan")
    save_file({"W": W}, other)
    rc, err = cli(capsys, "verify", str(model["out"]), "--W", str(other))
    assert_one_line_error(rc, err, "other.safetensors:W: 1 NaN/Inf value(s) in W, first in row 10")


def test_verify_cluster_without_w(model, capsys):
    rc, err = cli(capsys, "verify", str(model["out"]), "--cluster", str(model["ids"]))
    assert_one_line_error(rc, err, "needs W too")


def test_verify_malformed_checksum_metadata(model, capsys):
    f = SafetensorsFile(model["out"])
    bad = model["dir"] / "meta.safetensors"
    meta = {k: v for k, v in f.metadata.items() if k != "metadata_hash"}  # as a file without one
    save_file({k: f.tensor(k) for k in f.keys()}, bad, metadata={**meta, "tensor_hashes": "nonsense"})
    expect_verify_error(capsys, model, bad, "metadata 'tensor_hashes' is malformed", with_source=False)


@pytest.mark.parametrize("edit", ["value", "one-byte", "added", "removed", "hash-itself"])
def test_verify_edited_metadata(model, capsys, edit):
    f = SafetensorsFile(model["out"])
    meta = dict(f.metadata)
    assert meta["metadata_hash"].startswith("xxh3_128:")
    if edit == "value":
        meta["n_tokens"] = str(int(meta["n_tokens"]) + 1)
    elif edit == "one-byte":
        meta["model_name"] = "r" + meta["model_name"][1:] if meta["model_name"] else "x"
    elif edit == "added":
        meta["note"] = "added later"
    elif edit == "removed":
        del meta["cluster_size"]
    else:
        meta["metadata_hash"] = "xxh3_128:" + "0" * 32
    bad = model["dir"] / "edited.safetensors"
    save_file({k: f.tensor(k) for k in f.keys()}, bad, metadata=meta)
    with pytest.raises(VerificationError, match="metadata does not match the checksum"):
        refframe.verify_frame(bad)
    expect_verify_error(capsys, model, bad, "the metadata does not match the checksum recorded", with_source=False)
    expect_verify_error(capsys, model, bad, "the metadata does not match the checksum recorded")


def test_verify_reports_metadata_checksum(model):
    res = refframe.verify_frame(model["out"])
    assert "metadata checksum matches the one recorded at write time" in res.checks
