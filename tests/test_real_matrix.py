"""The native covariance and a whole frame build on a real trained token embedding matrix.

The matrix: `embedding.weight` of `wordllama/weights/l2_supercat_256.safetensors` in the wordllama
wheel on PyPI (32,000 x 256 fp16, a 256-dimensional embedding of Llama 2's vocabulary trained from
several language models' token embeddings). Install it without its dependencies to run these
tests (CI does): `pip install --no-deps wordllama==0.4.0.post1`. Otherwise they are skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import DTYPES, cov64, needs_native, rel_fro

pytestmark = needs_native


def _weights_file() -> Path | None:
    # Located without importing the package (its own dependencies need not be installed).
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / "l2_supercat_256.safetensors"
        if path.is_file():
            return path
    return None


WEIGHTS = _weights_file()
needs_matrix = pytest.mark.skipif(
    WEIGHTS is None, reason="real matrix not installed: pip install --no-deps wordllama==0.4.0.post1"
)


@pytest.fixture(scope="module")
def real_w() -> torch.Tensor:
    from safetensors.torch import load_file

    W = load_file(str(WEIGHTS))["embedding.weight"]
    assert W.shape == (32000, 256) and W.dtype == torch.float16
    return W


@needs_matrix
@pytest.mark.parametrize("dtype", DTYPES)
def test_covariance_of_a_real_embedding(real_w, kernel, dtype):
    """Measured: 2.8-3.3e-8 on every set and dtype (the seed's fp32 path: 1.9-2.0e-7)."""
    W = real_w.to(dtype)
    _, c64 = cov64(W)
    _, cov = torch.ops.refframe.center_syrk(W)
    assert torch.equal(cov, cov.T)
    assert rel_fro(cov, c64) < 5e-8


@needs_matrix
@pytest.mark.parametrize("tail", ["zeros", "one row"])
def test_covariance_of_a_real_embedding_with_a_padded_vocabulary(real_w, kernel, tail):
    """768 padding rows at the end (zeros, or one token's row repeated): 3.1-3.2e-8, where one row
    repeated gave 4.7e-8 before runs of identical rows were taken out of the fp32 sums."""
    pad = torch.zeros(768, 256, dtype=real_w.dtype) if tail == "zeros" else real_w[5].expand(768, 256)
    for dtype in (torch.float16, torch.bfloat16):
        W = torch.cat([real_w, pad]).to(dtype)
        _, c64 = cov64(W)
        _, cov = torch.ops.refframe.center_syrk(W)
        assert rel_fro(cov, c64) < 4e-8, dtype


@needs_matrix
@pytest.mark.parametrize("dtype", DTYPES)
def test_project_and_radii_of_a_real_embedding(real_w, kernel, dtype):
    """Coordinates on the real matrix's own principal axes (rows lie largely along the leading
    ones), centered on a cluster's centroid: every coordinate within 1e-6 of its row's distance
    from the centroid against float64, every radius within 2e-7 relative."""
    W = real_w.to(dtype)
    _, c64 = cov64(W)
    V = torch.linalg.eigh(c64)[1].flip(1).float()
    center = W[3::61].double().mean(0).float()
    X = W.double() - center.double()
    radius = X.norm(dim=1)
    for k in (3, 64, 256):
        got = torch.ops.refframe.project(W, center, V[:, :k], None)
        err = (got.double() - X @ V[:, :k].double()).abs().amax(dim=1) / radius
        assert float(err.max()) < 1e-6, k
    radii = torch.ops.refframe.radii(W, center, None)
    assert float(((radii.double() - radius).abs() / radius).max()) < 2e-7


@needs_matrix
def test_frame_of_a_real_embedding_verifies(real_w, tmp_path):
    import refframe

    ids = torch.arange(3, 32000, 61)
    frame = refframe.build_frame(real_w, ids, backend="native")
    path = tmp_path / "frame.safetensors"
    refframe.save_frame(frame, path, model_name="wordllama-l2_supercat_256")
    refframe.verify_frame(path, real_w, ids)
    # Gauge-free checks against float64: eigenvalues and residuals at fp32 eigh's level.
    mu64, c64 = cov64(real_w)
    lam64 = torch.linalg.eigvalsh(c64).flip(0)
    lam = frame.eigenvalues.double()
    V = frame.eigenvectors.double()
    assert float((lam - lam64).abs().max()) < 1e-6 * float(lam64[0])
    assert float((c64 @ V - V * lam).norm(dim=0).max()) < 3e-6 * float(lam64[0])
    centroid64 = real_w[ids].double().mean(0)
    assert float((frame.centroid.double() - centroid64).norm() / centroid64.norm()) < 1e-7
    assert float((frame.mean.double() - mu64).abs().max()) < 1e-7 * float(mu64.abs().max())
