"""Errors, safety: nothing but safetensors is ever read, metadata strings are data (never opened or
run), a build writes only its output file, and a symlinked output is replaced, not followed."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import save_file

import refframe
from helpers import REPO, build_args, cli, snapshot
from refframe import VerificationError
from refframe.cli import main
from refframe.tensorfile import SafetensorsFile


def test_only_safetensors_is_ever_read():
    forbidden = re.compile(
        r"torch\.load\(|import pickle|pickle\.|\bUnpickler|\beval\(|\bexec\(|allow_pickle=True|yaml\.load|"
        r"import marshal|weights_only=False"
    )
    offenders = []
    for p in sorted((REPO / "python" / "refframe").rglob("*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if forbidden.search(line):
                offenders.append(f"{p.name}:{i}: {line.strip()}")
    assert offenders == []


def test_metadata_strings_are_data(model, capsys, tmp_path, monkeypatch):
    """Path- and code-like metadata is stored and read back verbatim; nothing is opened or run."""
    monkeypatch.chdir(tmp_path)
    evil = {
        "model_name": "../../../etc/passwd",
        "n_tokens": "__import__('os').system('touch PWNED')",
        "d": "$(touch PWNED)",
        "source_dtype": "{{7*7}}",
        "eigenvector_signs": "/dev/zero",
    }
    f = SafetensorsFile(model["out"])
    meta_file = model["dir"] / "meta.safetensors"
    edited = {**f.metadata, **evil}
    save_file({k: f.tensor(k) for k in f.keys()}, meta_file, metadata=edited)
    with pytest.raises(VerificationError, match="metadata does not match the checksum"):
        refframe.verify_frame(meta_file)
    # The same values in a file without the checksum (another writer): read as plain data.
    del edited["metadata_hash"]
    save_file({k: f.tensor(k) for k in f.keys()}, meta_file, metadata=edited)
    before = snapshot(tmp_path)
    frame = refframe.load_frame(meta_file)
    assert {k: frame.metadata[k] for k in evil} == evil
    assert frame.n_tokens == 0  # not a number: ignored
    rc, err = cli(capsys, "verify", str(meta_file), "--W", str(model["W"]), "--cluster", str(model["ids"]))
    assert rc == 0, err
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.rglob("PWNED"))


def test_build_writes_only_the_output_file(model, tmp_path, monkeypatch):
    monkeypatch.chdir(model["dir"])
    model["out"].unlink()
    before = set(snapshot(tmp_path))
    assert main(build_args(model)) == 0
    after = set(snapshot(tmp_path))
    assert after - before == {"model/frame.safetensors"}


def test_symlinked_output_is_replaced_not_followed(model, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "precious.safetensors"
    target.write_bytes(b"precious")
    link = model["dir"] / "link.safetensors"
    link.symlink_to(target)
    assert main(build_args(model, out=link)) == 0
    assert target.read_bytes() == b"precious"
    assert not link.is_symlink() and link.is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.safetensors"]
