"""Errors, the CLI: a usage error, an unexpected exception or a folder that cannot be made ends in one
line and no traceback; --debug shows the exception; the error classes' hierarchy.

The other test_errors_*.py files cover inputs, outputs, interrupts, backends, verify and safety."""

from __future__ import annotations

import pytest

import refframe
from helpers import assert_one_line_error, build_args, cli
from refframe import (
    BackendError,
    ClusterIdsError,
    FileFormatError,
    InputError,
    KeyNotFoundError,
    NonFiniteError,
    NumericalError,
    OutputError,
    RefframeError,
    ResourceError,
    VerificationError,
)
from refframe.cli import main


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", "--no-such-option"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("refframe: error: unrecognized arguments: --no-such-option") and "\n" not in err


def test_unexpected_exception_is_one_line_and_debug_shows_it(model, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(refframe.tensorfile, "hash_tensor", bug)
    rc, err = cli(capsys, *build_args(model))
    assert_one_line_error(rc, err, "unexpected ZeroDivisionError: division by zero", "--debug")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", *build_args(model)])


def test_demo_folder_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, err = cli(capsys, "demo", "--small", "--dir", str(blocker))
    assert_one_line_error(rc, err, "cannot create the demo folder (Not a directory)")


def test_debug_reraises_refframe_errors(model):
    with pytest.raises(InputError, match="no such file"):
        main(["--debug", *build_args(model, w=model["dir"] / "none.safetensors")])


def test_error_classes():
    for cls in (InputError, ClusterIdsError, KeyNotFoundError, NonFiniteError, FileFormatError):
        assert issubclass(cls, InputError) and issubclass(cls, RefframeError)
    assert issubclass(OutputError, ResourceError)
    for cls in (ResourceError, BackendError, VerificationError, NumericalError):
        assert issubclass(cls, RefframeError)
