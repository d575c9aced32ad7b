"""Plain helpers the test files import (`from helpers import ...`); the fixtures are in conftest.py.

- matrices with awkward statistics and their float64 references (make_w, cov64, rel_fro, ...);
- the dtypes and CPU kernel sets tests run over, and the mark for tests that need the native library;
- for the tests/test_errors_*.py files: the shape of the `model` fixture's W, and the checks that a
  failing command prints one line and leaves everything on disk as it was.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import refframe
from refframe.cli import main

REPO = Path(__file__).resolve().parents[1]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

needs_native = pytest.mark.skipif(not refframe.native_available(), reason="native library not built")

KERNEL_SETS = ["portable", "avx2", "avx512", "avx512bf16", "amx"]


# ---------------------------------------------------------------------------------------------
# matrices and float64 references


def make_w(n: int, d: int, dtype: torch.dtype, *, seed: int = 0, offset_sigmas: float = 0.0) -> torch.Tensor:
    """A correlated random W; with offset_sigmas, three columns have a mean that many sigmas from 0."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(d, 8))
    W = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.02
    W += (
        (torch.randn(n, k, generator=g, dtype=torch.float64) * 0.03)
        @ torch.randn(k, d, generator=g, dtype=torch.float64)
        / k**0.5
    )
    W += torch.randn(d, generator=g, dtype=torch.float64) * 0.01
    if offset_sigmas:
        W[:, : min(3, d)] += offset_sigmas * 0.02
    return W.to(dtype)


def make_far_off_w(n: int, d: int, dtype: torch.dtype, sigmas: float) -> torch.Tensor:
    """make_w with every other column moved `sigmas` of its sd off zero (every third of them below)."""
    X = make_w(n, d, torch.float64, seed=int(sigmas))
    moved = X[:, ::2]
    sign = torch.where(torch.arange(moved.shape[1]) % 3 == 0, -1.0, 1.0).to(torch.float64)
    X[:, ::2] = moved + sigmas * moved.std(0) * sign
    return X.to(dtype)


def make_subnormal_fp16_w(n: int, d: int, *, seed: int = 0) -> torch.Tensor:
    """fp16 W whose values are all subnormal (k 2^-24, k ~ 100-300): each column 5-15 sd off zero on
    the subnormal grid, with correlated columns."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    Z = Z @ (torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64))
    k = 100 + 200 * torch.rand(d, generator=g, dtype=torch.float64) + 20 * Z / Z.std(0)
    return (k.round().clamp(1, 1023) * 2.0**-24).to(torch.float16)


def cov64(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (fp64) mean and population covariance of the values W holds."""
    X = W.to(torch.float64)
    mu = X.mean(dim=0)
    Xc = X - mu
    return mu, Xc.T @ Xc / X.shape[0]


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    den = float(ref.norm())
    num = float((a.to(torch.float64) - ref).norm())
    return num / den if den > 0 else num


# ---------------------------------------------------------------------------------------------
# the error tests: one line on stderr, nothing on disk changed

# The `model` fixture's W (conftest.py) is N x D float32.
N, D = 300, 16


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones too) -> sha256 of its bytes."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process; return its exit status and its single stderr line."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1, err
    assert err.startswith("refframe: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)


def build_args(m: dict[str, Path], w: Path | None = None, ids: Path | None = None, out: Path | None = None):
    return [
        "build",
        "--W",
        str(w or m["W"]),
        "--cluster",
        str(ids or m["ids"]),
        "--out",
        str(out or m["out"]),
        "--backend",
        "torch",
        "--device",
        "cpu",
    ]


def expect_build_error(capsys, m, *fragments, w=None, ids=None, out=None, extra=()) -> str:
    """A failing build prints one line with `fragments` and changes nothing on disk."""
    before = snapshot(m["dir"])
    rc, err = cli(capsys, *build_args(m, w, ids, out), *extra)
    assert_one_line_error(rc, err, *fragments)
    assert snapshot(m["dir"]) == before
    assert temp_files(m["dir"]) == []
    return err


def built_model(tmp_path: Path, n: int, d: int, step: int) -> dict:
    """A model folder in the seed layout (bf16 W with columns 5 sd off zero, every step-th token in
    the cluster) and its frame built by `refframe build`: {W, ids, model, frame}."""
    from safetensors.torch import save_file

    W = make_w(n, d, torch.bfloat16, offset_sigmas=5.0)
    ids = torch.arange(0, n, step)
    model = tmp_path / "model"
    model.mkdir()
    save_file({"W": W}, model / "W.safetensors")
    save_file({"cluster_token_ids": ids}, model / "1.4h_cluster_tokens.safetensors")
    assert main(["build", "--model-dir", str(model), "--no-cache"]) == 0
    return {"W": W, "ids": ids, "model": model, "frame": model / "1.6a_cluster_reference_frame.safetensors"}


def spy_opened_files(monkeypatch) -> list[str]:
    """The names of the safetensors files refframe opens from now on (SafetensorsFile is spied on)."""
    import refframe.tensorfile as tensorfile

    opened: list[str] = []
    real = tensorfile.SafetensorsFile.__init__

    def spy(self, path):
        opened.append(Path(path).name)
        real(self, path)

    monkeypatch.setattr(tensorfile.SafetensorsFile, "__init__", spy)
    return opened
