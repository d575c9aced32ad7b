"""Errors, outputs: output paths that cannot be written (missing, read-only, a directory, an input,
a device node), and atomic writes that lose nothing: a full disk, a failure or an exception while
writing, several files written all or none, fsync, the mode of a replaced file.

Signals during a build are in test_errors_interrupts.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import refframe
import refframe.atomic as rio
from helpers import assert_one_line_error, build_args, cli, expect_build_error, snapshot, temp_files
from refframe import OutputError
from refframe.cli import main

# ---------------------------------------------------------------------------------------------
# the output path


def test_output_directory_missing(model, capsys):
    out = model["dir"] / "nowhere" / "frame.safetensors"
    err = expect_build_error(capsys, model, "output directory", "does not exist", out=out)
    assert str(model["dir"] / "nowhere") in err


def test_output_directory_not_writable(model, capsys, monkeypatch):
    target = model["dir"] / "ro"
    target.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        rio.os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode)
    )
    expect_build_error(
        capsys, model, f"output directory {target} is not writable", out=target / "f.safetensors"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_output_directory_not_writable_chmod(model, capsys):
    target = model["dir"] / "ro"
    target.mkdir()
    target.chmod(0o555)
    try:
        expect_build_error(capsys, model, "is not writable", out=target / "f.safetensors")
    finally:
        target.chmod(0o755)


def test_output_path_is_a_directory(model, capsys):
    expect_build_error(capsys, model, f"{model['dir']}: output path is a directory", out=model["dir"])


def test_output_parent_is_a_file(model, capsys):
    expect_build_error(capsys, model, "is not a directory", out=model["W"] / "frame.safetensors")


def test_output_is_an_input(model, capsys):
    expect_build_error(capsys, model, "output path is the input file", out=model["W"])
    expect_build_error(capsys, model, "output path is the input file", out=model["ids"])


def test_output_file_read_only(model, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        rio.os, "access", lambda p, mode: False if Path(p) == model["out"] else real_access(p, mode)
    )
    expect_build_error(capsys, model, "output file exists and is read-only")


def test_output_to_device_node_refused(model, capsys):
    expect_build_error(
        capsys, model, "/dev/null: output path exists and is not a regular file", out=Path("/dev/null")
    )


# ---------------------------------------------------------------------------------------------
# nothing lost: a full disk, a failure while writing


def test_disk_full_leaves_previous_output(model, capsys, monkeypatch):
    before = model["out"].read_bytes()
    real_write = os.write

    def full_disk(fd, data):
        name = os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").exists() else ""
        if name.endswith(".tmp"):
            real_write(fd, bytes(memoryview(data)[:100]))  # a partial temporary file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    frame = refframe.load_frame(model["out"])
    with pytest.raises(
        OutputError, match=r"could not write output \(No space left on device; free some space"
    ):
        refframe.save_frame(frame, model["out"])
    rc, err = cli(capsys, *build_args(model))
    assert_one_line_error(
        rc, err, f"{model['out']}: could not write output (No space left on device", "nothing was changed"
    )
    assert model["out"].read_bytes() == before
    assert temp_files(model["dir"]) == []


def test_cannot_create_temporary_file(model, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rio.tempfile, "mkstemp", denied)
    before = snapshot(model["dir"])
    with pytest.raises(
        OutputError, match=r"could not write output \(Permission denied\); nothing was changed"
    ):
        rio.atomic_write_bytes(model["out"], [b"x"])
    assert snapshot(model["dir"]) == before


def test_exception_and_interrupt_during_write_leave_previous_output(model, monkeypatch):
    before = snapshot(model["dir"])

    def chunks(exc):
        yield b"partial data " * 1000
        raise exc

    for exc in (RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)):
            rio.atomic_write_bytes(model["out"], chunks(exc))
        assert snapshot(model["dir"]) == before


# ---------------------------------------------------------------------------------------------
# several files: all or none


def _batch(tmp_path: Path, n: int = 5) -> tuple[Path, list[Path]]:
    """A folder with n output paths, the first three holding previous outputs."""
    d = tmp_path / "out"
    d.mkdir()
    paths = [d / f"f{i}.bin" for i in range(n)]
    for i, p in enumerate(paths[:3]):
        p.write_bytes(f"previous {i}".encode() * 100)
    return d, paths


@pytest.mark.parametrize(
    "exc, match",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "f3.bin: could not write output"),
        (KeyboardInterrupt(), None),
        (RuntimeError("boom"), "boom"),
    ],
)
def test_several_files_are_written_all_or_none(tmp_path, exc, match):
    d, paths = _batch(tmp_path)
    before = snapshot(d)

    def chunks(i):
        yield f"new {i}".encode() * 50_000
        if i == 3:
            raise exc

    expected = OutputError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected, match=match) as info:
        rio.atomic_write_files([(p, chunks(i)) for i, p in enumerate(paths)])
    if isinstance(exc, OSError):
        assert str(info.value).endswith("free some space and run again); nothing was changed")
    assert snapshot(d) == before
    assert temp_files(d) == []


def test_several_files_written_and_fsynced(tmp_path, monkeypatch):
    d, paths = _batch(tmp_path, n=9)
    synced: list[int] = []
    real = rio.os.fsync
    monkeypatch.setattr(rio.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    rio.atomic_write_files([(p, [f"new {i}".encode(), b"!" * i]) for i, p in enumerate(paths)])
    assert [p.read_bytes() for p in paths] == [f"new {i}".encode() + b"!" * i for i in range(9)]
    assert len(synced) == 9 + 1  # every file, then their directory once
    assert temp_files(d) == []
    synced.clear()
    rio.atomic_write_files([(p, [b"again"]) for p in paths], durable=False)
    assert synced == [] and all(p.read_bytes() == b"again" for p in paths)


def test_several_files_rename_failure_says_what_changed(tmp_path, monkeypatch):
    d, paths = _batch(tmp_path, n=3)
    old = [p.read_bytes() for p in paths]
    calls = []
    real = rio.os.replace

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(rio.os, "replace", flaky)
    with pytest.raises(
        OutputError,
        match=r"f1.bin: could not write output \(Input/output error\); 1 of 3 files were written "
        r"\(\S*f0.bin\), the others left as they were",
    ):
        rio.atomic_write_files([(p, [b"new"]) for p in paths])
    assert [p.read_bytes() for p in paths] == [b"new", old[1], old[2]]
    assert temp_files(d) == []


def test_same_output_path_twice_is_refused(tmp_path):
    d, paths = _batch(tmp_path, n=2)
    before = snapshot(d)
    with pytest.raises(OutputError, match="the same output path is given twice"):
        rio.atomic_write_files([(paths[0], [b"a"]), (d / "." / "f0.bin", [b"b"])])
    assert snapshot(d) == before


def test_progress_callback_error_is_raised_and_cleans_up(tmp_path):
    d, paths = _batch(tmp_path, n=8)
    before = snapshot(d)

    def broken(done, total):
        raise ValueError("display broke")

    with pytest.raises(ValueError, match="display broke"):
        rio.atomic_write_files([(p, [b"new" * 1000]) for p in paths], progress=broken)
    assert snapshot(d) == before and temp_files(d) == []
    seen = []
    rio.atomic_write_files([(p, [b"new"]) for p in paths], progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8, 8) and seen == sorted(seen)


def test_same_folder_under_two_names_is_one_output(tmp_path):
    d, paths = _batch(tmp_path, n=1)
    alias = tmp_path / "alias"
    alias.symlink_to(d, target_is_directory=True)
    before = snapshot(d)
    with pytest.raises(OutputError, match="the same output path is given twice"):
        rio.atomic_write_files([(paths[0], [b"a"]), (alias / paths[0].name, [b"b"])])
    assert snapshot(d) == before


# ---------------------------------------------------------------------------------------------
# a build's output: fsync, a failed build, the file mode


def test_build_no_fsync(model, capsys, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(rio.os, "fsync", lambda fd: synced.append(fd))
    assert main([*build_args(model), "--no-fsync"]) == 0
    assert synced == []
    assert refframe.verify_frame(model["out"]).checks  # raises VerificationError on a bad file
    assert main(build_args(model)) == 0
    assert len(synced) == 2  # the frame, then its directory


def test_failed_build_leaves_previous_output(model, capsys, monkeypatch):
    before = snapshot(model["dir"])

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure in a kernel")

    monkeypatch.setattr(refframe.ops, "covariance", broken)
    expect_build_error(
        capsys, model, "failed while computing the covariance (torch backend): simulated failure"
    )
    assert snapshot(model["dir"]) == before


def test_new_output_keeps_the_mode_of_the_file_it_replaces(model):
    model["out"].chmod(0o640)
    assert main(build_args(model)) == 0
    assert (model["out"].stat().st_mode & 0o777) == 0o640
    fresh = model["dir"] / "fresh.safetensors"
    assert main(build_args(model, out=fresh)) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask
