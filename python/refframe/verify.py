"""Verification of a frame file: format, internal consistency and, given the source, the maths.

The maths is checked matrix-free against W: one streaming pass gives Wc^T (Wc P) / N in fp64 for a
few probe vectors P (the leading eigenvectors and fixed random directions), so no d x d covariance
is recomputed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .checks import check_ids, check_w, nonfinite_error
from .errors import FileFormatError, VerificationError
from .frame import (
    FRAME_KEYS,
    KEY_CENTROID,
    KEY_EIGENVALUES,
    KEY_EIGENVECTORS,
    METADATA_HASH,
    SIGN_CONVENTION,
    TENSOR_HASHES,
    hash_metadata,
    parse_tensor_hashes,
)
from .tensorfile import SafetensorsFile, hash_tensor

# Tolerances, relative to lambda_1 unless said otherwise. A correct fp32 frame sits orders of
# magnitude below them (residual ~5e-7, Rayleigh quotient ~1e-7, orthogonality ~1e-6).
TOL_ORTHO = 1e-4
TOL_DESCENDING = 1e-6
TOL_RESIDUAL = 5e-5
TOL_RAYLEIGH = 5e-6
TOL_PROBE = 5e-5
TOL_TRACE = 1e-4  # relative to the trace
TOL_CENTROID = 1e-5  # relative to ||centroid||
LEADING = 16
PROBES = 4


@dataclass
class VerifyResult:
    """What was checked and the worst error of each check."""

    d: int
    checks: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


def _fail(path: object, msg: str) -> VerificationError:
    return VerificationError(f"{path}: {msg}")


def column_mean64(W: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Exact-ish fp64 column mean of W, streamed in row chunks (no full copy)."""
    acc = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    for i in range(0, W.shape[0], chunk):
        acc += W[i : i + chunk].to(torch.float64).sum(dim=0)
    return acc / W.shape[0]


def covariance_apply(
    W: torch.Tensor, P: torch.Tensor, mean64: torch.Tensor, chunk: int = 8192
) -> tuple[torch.Tensor, float]:
    """Wc^T (Wc P) / N in fp64 for probe vectors P (d, m), and trace(Wc^T Wc) / N, in one pass."""
    P64 = P.to(W.device, torch.float64)
    out = torch.zeros_like(P64)
    trace = 0.0
    for i in range(0, W.shape[0], chunk):
        X = W[i : i + chunk].to(torch.float64) - mean64
        out += X.T @ (X @ P64)
        trace += float(X.pow(2).sum())
    return out / W.shape[0], trace / W.shape[0]


def check_frame_tensors(path: object, f: SafetensorsFile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = set(f.keys())
    missing = [k for k in FRAME_KEYS if k not in keys]
    if missing:
        raise _fail(path, f"missing key {missing[0]!r} (a frame holds {', '.join(FRAME_KEYS)})")
    extra = sorted(keys - set(FRAME_KEYS))
    if extra:
        raise _fail(path, f"unexpected key {extra[0]!r} (a frame holds exactly {', '.join(FRAME_KEYS)})")
    for k in FRAME_KEYS:
        dtype, _ = f.info(k)
        if dtype != torch.float32:
            raise _fail(path, f"{k} has dtype {str(dtype).removeprefix('torch.')}, expected float32")
    c_shape, l_shape, v_shape = (f.info(k)[1] for k in FRAME_KEYS)
    if len(l_shape) != 1 or l_shape[0] == 0:
        raise _fail(path, f"{KEY_EIGENVALUES} has shape {list(l_shape)}, expected (d,)")
    d = l_shape[0]
    if c_shape != (d,):
        raise _fail(path, f"{KEY_CENTROID} has shape {list(c_shape)}, expected ({d},)")
    if v_shape != (d, d):
        raise _fail(path, f"{KEY_EIGENVECTORS} has shape {list(v_shape)}, expected ({d}, {d})")
    end = max(f.entries[k][3] for k in FRAME_KEYS)
    if f.data_size > end:
        raise _fail(path, f"{f.data_size - end} unexpected byte(s) after the last tensor (appended data)")
    tensors = tuple(f.tensor(k) for k in FRAME_KEYS)
    for k, t in zip(FRAME_KEYS, tensors):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(x) for x in bad.nonzero()[0])
            raise _fail(path, f"{k} has {int(bad.sum())} non-finite value(s), first at {list(first)}")
    return tensors  # type: ignore[return-value]


def verify_frame(
    path: str | os.PathLike[str],
    W: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    *,
    seed: int = 0,
    w_name: str = "W",
    ids_name: str = "cluster ids",
    w_content_hash: str | None = None,
) -> VerifyResult:
    """Check a frame file; raise VerificationError with a one-line reason on the first failure.

    Always: exactly the seed's keys, float32, shapes (d,), (d,), (d, d), all finite, eigenvalues
    descending and non-negative, eigenvectors orthonormal. With W: the eigenpairs satisfy
    Wc^T Wc v / N = lambda v (leading pairs, Rayleigh quotients, random probes, trace). With ids:
    the centroid equals the mean of W[ids]. Last, the checksums of the tensors recorded in the
    metadata (`tensor_hashes`), so any damage after writing is caught even without W; the checksum
    of the metadata itself (`metadata_hash`) is checked first.

    A frame file that is not well-formed safetensors (truncated, corrupted header) raises
    VerificationError; a missing or unreadable one raises InputError. A malformed W or ids raise
    InputError / ClusterIdsError / NonFiniteError, named by w_name / ids_name.
    """
    try:
        f = SafetensorsFile(path)
    except FileFormatError as exc:
        raise VerificationError(str(exc)) from None
    centroid, evals, evecs = check_frame_tensors(path, f)
    d = evals.shape[0]
    res = VerifyResult(d=d)
    res.checks.append(f"keys, dtypes and shapes: {', '.join(FRAME_KEYS)} float32, d = {d}")
    _check_metadata_hash(path, f, res)  # first: the checks below read the metadata
    lam = _check_eigenvalues(path, evals, res)
    V = _check_eigenvectors(path, f, evecs, res)
    if W is not None:
        _check_against_w(path, f, W, lam, V, res, seed, w_name, w_content_hash)
    if ids is not None:
        if W is None:
            raise VerificationError(f"{path}: checking the centroid needs W as well as the cluster ids")
        _check_centroid(path, centroid, W, ids, res, ids_name)
    _check_tensor_hashes(path, f, (centroid, evals, evecs), res)
    return res


def _check_metadata_hash(path: object, f: SafetensorsFile, res: VerifyResult) -> None:
    recorded = f.metadata.get(METADATA_HASH)
    if recorded is None:  # a file written before metadata_hash existed
        return
    if hash_metadata(f.metadata) != recorded:
        raise _fail(
            path,
            "the metadata does not match the checksum recorded when the file was written "
            f"(an entry was edited, added or removed since; {METADATA_HASH!r} covers all the others)",
        )
    res.checks.append("metadata checksum matches the one recorded at write time")


def _check_eigenvalues(path: object, evals: torch.Tensor, res: VerifyResult) -> torch.Tensor:
    """Not all zero, descending, non-negative (to tolerances relative to the largest); as fp64."""
    lam = evals.to(torch.float64)
    d = lam.shape[0]
    scale = float(lam.abs().max())
    if scale == 0.0:
        raise _fail(path, "all eigenvalues are zero")
    rises = lam[1:] - lam[:-1]
    worst = int(torch.argmax(rises)) if d > 1 else 0
    if d > 1 and float(rises[worst]) > TOL_DESCENDING * scale:
        raise _fail(
            path,
            f"eigenvalues not in descending order: W_eigenvalues[{worst + 1}] = {float(lam[worst + 1]):.6g} "
            f"> W_eigenvalues[{worst}] = {float(lam[worst]):.6g}",
        )
    if float(lam.min()) < -TOL_RAYLEIGH * scale:
        raise _fail(
            path,
            f"negative eigenvalue {float(lam.min()):.6g} (a covariance is positive semidefinite)",
        )
    res.checks.append("eigenvalues finite, descending, non-negative")
    return lam


def _check_eigenvectors(path: object, f: SafetensorsFile, evecs: torch.Tensor, res: VerifyResult) -> torch.Tensor:
    """Orthonormal, and signed as the file's metadata says (when it names the convention); as fp64."""
    V = evecs.to(torch.float64)
    ortho = float((V.T @ V - torch.eye(V.shape[0], dtype=torch.float64)).abs().max())
    res.stats["orthonormality"] = ortho
    if not ortho <= TOL_ORTHO:
        raise _fail(path, f"eigenvectors are not orthonormal: max |V^T V - I| = {ortho:.3g} > {TOL_ORTHO:g}")
    res.checks.append(f"eigenvectors orthonormal (max |V^T V - I| = {ortho:.2e})")
    if f.metadata.get("eigenvector_signs") == SIGN_CONVENTION:
        idx = evecs.abs().argmax(dim=0)
        lead = evecs.gather(0, idx.unsqueeze(0)).squeeze(0)
        neg = (lead < 0).nonzero()
        if neg.numel():
            i = int(neg[0, 0])
            raise _fail(
                path,
                f"eigenvector {i} breaks the file's sign convention (its largest-magnitude component "
                f"W_eigenvectors[{int(idx[i])}, {i}] = {float(lead[i]):.6g} is negative)",
            )
        res.checks.append("eigenvector signs follow the convention")
    return V


def _check_against_w(
    path: object,
    f: SafetensorsFile,
    W: torch.Tensor,
    lam: torch.Tensor,
    V: torch.Tensor,
    res: VerifyResult,
    seed: int,
    w_name: str,
    w_content_hash: str | None,
) -> None:
    """W's shape against the frame's, its content hash against w_hash, then the eigenpairs."""
    check_w(W, w_name)
    d = lam.shape[0]
    if W.shape[1] != d:
        raise _fail(path, f"{w_name} has d = {W.shape[1]} columns, the frame has d = {d}")
    n_meta = f.metadata.get("n_tokens", "")
    if n_meta.isascii() and n_meta.isdigit() and int(n_meta) != W.shape[0]:
        raise _fail(path, f"{w_name} has N = {W.shape[0]} rows, the frame was built from N = {n_meta}")
    recorded = f.metadata.get("w_hash", "")
    same_w = None if not recorded else (w_content_hash or hash_tensor(W)) == recorded
    if same_w:
        res.checks.append(f"{w_name} is the matrix the frame was built from (content hash)")
    elif same_w is None:
        res.checks.append(
            f"the frame records no w_hash (W was not hashed, e.g. built from in-memory shards): "
            f"{w_name} is checked against the maths only"
        )
    try:
        _check_maths(path, W, lam, V, float(lam.abs().max()), res, seed, w_name)
    except VerificationError as exc:
        if same_w is False:  # the likely reason, said with the failure
            raise VerificationError(
                f"{exc}; note: {w_name} is not the matrix the frame was built from (its content hash "
                "differs from the one recorded at build time)"
            ) from None
        raise


def _check_centroid(
    path: object, centroid: torch.Tensor, W: torch.Tensor, ids: torch.Tensor, res: VerifyResult, ids_name: str
) -> None:
    ids64 = check_ids(ids, W.shape[0], ids_name, warn_duplicates=True).to("cpu")
    c64 = W[ids64.to(W.device)].to(torch.float64).mean(dim=0).cpu()
    err = float((centroid.to(torch.float64) - c64).norm() / max(float(c64.norm()), 1e-300))
    res.stats["centroid"] = err
    if not err <= TOL_CENTROID:
        raise _fail(
            path,
            f"{KEY_CENTROID} differs from the mean of W[ids] over {ids64.numel()} ids "
            f"(relative error {err:.3g} > {TOL_CENTROID:g})",
        )
    res.checks.append(f"centroid = mean of W[ids] over {ids64.numel()} ids (relative error {err:.2e})")


def _check_tensor_hashes(
    path: object, f: SafetensorsFile, tensors: tuple[torch.Tensor, ...], res: VerifyResult
) -> None:
    """The tensors against the checksums recorded at write time (files without them: skipped)."""
    recorded = f.metadata.get(TENSOR_HASHES)
    if recorded is None:
        return
    hashes = parse_tensor_hashes(recorded)
    if hashes is None or set(hashes) != set(FRAME_KEYS):
        raise _fail(path, f"metadata {TENSOR_HASHES!r} is malformed (expected key=xxh3_128:... for each tensor)")
    for k, t in zip(FRAME_KEYS, tensors):
        if hash_tensor(t) != hashes[k]:
            raise _fail(
                path,
                f"{k} does not match the checksum recorded when the file was written "
                "(changed or damaged since)",
            )
    res.checks.append("tensor checksums match the ones recorded at write time")


def _check_maths(
    path: object,
    W: torch.Tensor,
    lam: torch.Tensor,
    V: torch.Tensor,
    scale: float,
    res: VerifyResult,
    seed: int,
    w_name: str = "W",
) -> None:
    d = lam.shape[0]
    k = min(LEADING, d)
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(d, PROBES, generator=gen, dtype=torch.float64)
    R /= R.norm(dim=0, keepdim=True)
    P = torch.cat([V[:, :k], R], dim=1)

    mean64 = column_mean64(W)
    if not bool(torch.isfinite(mean64).all()):
        raise nonfinite_error(W, w_name)
    CP, trace = covariance_apply(W, P, mean64)
    CP = CP.cpu()
    if not (bool(torch.isfinite(CP).all()) and trace == trace and abs(trace) != float("inf")):
        raise nonfinite_error(W, w_name)

    CV = CP[:, :k]
    residual = (CV - V[:, :k] * lam[:k]).norm(dim=0) / scale
    worst = int(torch.argmax(residual))
    res.stats["residual"] = float(residual[worst])
    if not float(residual[worst]) <= TOL_RESIDUAL:
        raise _fail(
            path,
            f"eigenpair {worst} does not satisfy C v = lambda v: ||C v - lambda v|| / lambda_1 = "
            f"{float(residual[worst]):.3g} > {TOL_RESIDUAL:g}",
        )
    rq = (V[:, :k] * CV).sum(dim=0)
    rq_err = (rq - lam[:k]).abs() / scale
    worst = int(torch.argmax(rq_err))
    res.stats["rayleigh"] = float(rq_err[worst])
    if not float(rq_err[worst]) <= TOL_RAYLEIGH:
        raise _fail(
            path,
            f"W_eigenvalues[{worst}] = {float(lam[worst]):.6g} but v^T C v = {float(rq[worst]):.6g} "
            f"(error {float(rq_err[worst]):.3g} lambda_1)",
        )
    res.checks.append(
        f"leading {k} eigenpairs satisfy C v = lambda v (max residual {res.stats['residual']:.2e} lambda_1)"
    )

    recon = V @ (lam.unsqueeze(1) * (V.T @ R))
    probe = float((CP[:, k:] - recon).norm(dim=0).max()) / scale
    res.stats["probe"] = probe
    if not probe <= TOL_PROBE:
        raise _fail(
            path,
            f"V diag(lambda) V^T differs from the covariance of W along random directions ({probe:.3g} lambda_1)",
        )
    trace_err = abs(float(lam.sum()) - trace) / max(trace, 1e-300)
    res.stats["trace"] = trace_err
    if not trace_err <= TOL_TRACE:
        raise _fail(
            path,
            f"sum of eigenvalues {float(lam.sum()):.6g} differs from the total variance of W {trace:.6g}",
        )
    res.checks.append(f"random probes and trace agree (probe {probe:.2e} lambda_1, trace {trace_err:.2e})")
