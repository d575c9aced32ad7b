"""The pure-torch covariance, in row chunks and fp64 sums, through torch's BLAS.

    mean64 = column_sums(W) / n              # pass 1: fp64 column sums
    tri = gram_partial(W, mean64)            # pass 2: sum of (x - c)(x - c)^T, packed upper triangle
    mean, cov = finish(tri, mean64, n)       # S / n, rounded once to fp32, both halves

W is never copied whole: each chunk of rows is converted and centred on the fly (exactly converted
to fp64, one fp64 subtraction) and its Gram matrix is added into an fp64 accumulator, one column
panel at a time (Xc[:, :j1]^T @ Xc[:, j0:j1]), so only the blocks of the upper triangle are
multiplied. On a device without fp64 (MPS) a chunk is centred and multiplied in fp32 there and each
panel's product is added into an fp64 accumulator on the CPU.

column_sums and gram_partial are sums over rows: for W split by rows, the pieces' sums (taken around
the same centre) add up to the whole's, within fp64 rounding, which is what a sharded build needs.
The same input gives the same bits (the chunk and panel boundaries depend only on W's shape).
"""

from __future__ import annotations

import torch

from .checks import check_w
from .errors import InputError
from .interrupt import cancel_requested

# Measured on a 2-core AMD EPYC (Zen 4) with MKL's dgemm at d = 1,024 and 2,560: panels of 384
# columns ran the triangle 1.2-1.5x faster than the full Gram (1.7x the triangle's flops at d = 2,560),
# and 256, 320, 448, 512 or 640 columns were slower. Chunks of 512 to 8,192 rows ran within the
# machine's noise of each other (a few %); 200 rows were slower.
PANEL_COLUMNS = 384
# Rows per chunk: about this many bytes of converted, centred rows (1,024 rows at d = 2,560).
CHUNK_BYTES = 20 << 20


def chunk_rows(d: int) -> int:
    """Rows of W converted at a time for d columns (about CHUNK_BYTES of fp64, at least 64 rows)."""
    return max(64, CHUNK_BYTES // (8 * max(1, d)))


def _work_dtype(device: torch.device) -> torch.dtype:
    """The dtype chunks are centred and multiplied in: fp64, or fp32 on MPS (no fp64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _row_chunks(W: torch.Tensor):
    """(first row, rows) of W, a chunk at a time, in row order; stops with "covariance: cancelled"
    before a chunk when the computation was interrupted (interrupt.cancel_requested)."""
    step = chunk_rows(W.shape[1])
    for r0 in range(0, W.shape[0], step):
        if cancel_requested():
            raise RuntimeError("covariance: cancelled")
        yield r0, W[r0 : r0 + step]


def column_sums(W: torch.Tensor) -> torch.Tensor:
    """Column sums of W (N, d) as fp64 (d,) on the CPU; zeros for N = 0.

    W is read a chunk of rows at a time and stays in its dtype: each chunk is converted to fp64
    (exactly, for bf16, fp16, fp32) and its columns summed there by a BLAS matrix-vector product, on
    W's device (on MPS, which has no fp64, each chunk is moved to the CPU first)."""
    check_w(W, min_rows=0, op="column_sums")
    dev = W.device if W.device.type != "mps" else torch.device("cpu")
    n, d = W.shape
    acc = torch.zeros(d, dtype=torch.float64, device=dev)
    buf = torch.empty((min(chunk_rows(d), n), d), dtype=torch.float64, device=dev)
    ones = torch.ones(buf.shape[0], dtype=torch.float64, device=dev)
    for _, rows in _row_chunks(W):
        X = buf[: rows.shape[0]].copy_(rows)
        acc.addmv_(X.T, ones[: rows.shape[0]])
    return acc.to("cpu")


def _panels(d: int):
    """Column panels [j0, j1) of PANEL_COLUMNS (the last may be narrower)."""
    for j0 in range(0, d, PANEL_COLUMNS):
        yield j0, min(d, j0 + PANEL_COLUMNS)


def _add_panels(acc: torch.Tensor, Xc: torch.Tensor) -> None:
    """acc[:j1, j0:j1] += Xc[:, :j1]^T @ Xc[:, j0:j1] for every column panel: every block of the
    upper triangle (and the lower halves of the diagonal blocks) of Xc^T Xc. In place through BLAS
    where acc is on Xc's device in Xc's dtype; else each product is moved and added into acc."""
    in_place = acc.device == Xc.device and acc.dtype == Xc.dtype
    for j0, j1 in _panels(Xc.shape[1]):
        block = acc[:j1, j0:j1]
        if in_place:
            block.addmm_(Xc[:, :j1].T, Xc[:, j0:j1])
        else:
            block += (Xc[:, :j1].T @ Xc[:, j0:j1]).to(acc.device, acc.dtype)


def gram_partial(W: torch.Tensor, center64: torch.Tensor) -> torch.Tensor:
    """Sum over W's rows x of (x - c)(x - c)^T, unnormalised, as the packed upper triangle in fp64
    on the CPU: shape (d (d + 1) / 2,), row-major order of the upper triangle ((0, 0), (0, 1), ...,
    (0, d - 1), (1, 1), ...); see unpack_upper. Zeros for a W with no rows.

    center64: the centre c, (d,), fp64 (usually the whole matrix's mean, column_sums(W) / N).
    Each chunk of rows is converted and centred in fp64 on W's device (fp32 on MPS) and multiplied
    panel by panel; the sums are fp64."""
    check_w(W, min_rows=0, op="gram_partial")
    d = W.shape[1]
    if not isinstance(center64, torch.Tensor) or tuple(center64.shape) != (d,):
        got = tuple(center64.shape) if isinstance(center64, torch.Tensor) else type(center64).__name__
        raise InputError(f"gram_partial: center64 must be a tensor of shape ({d},) (W's columns), got {got}")
    work = _work_dtype(W.device)
    c = center64.to(W.device, torch.float64).to(work)
    acc = torch.zeros((d, d), dtype=torch.float64, device=W.device if work == torch.float64 else "cpu")
    buf = torch.empty((min(chunk_rows(d), W.shape[0]), d), dtype=work, device=W.device)
    for _, rows in _row_chunks(W):
        Xc = buf[: rows.shape[0]].copy_(rows).sub_(c)  # each value converted exactly, one subtraction
        _add_panels(acc, Xc)
    del buf
    return pack_upper(acc).to("cpu")


def _row_offsets(d: int):
    """(row i, where row i's part of the upper triangle starts in the packed vector)."""
    offset = 0
    for i in range(d):
        yield i, offset
        offset += d - i


def pack_upper(full: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square (d, d) tensor, packed row by row into
    (d (d + 1) / 2,): full[0, 0], full[0, 1], ..., full[0, d - 1], full[1, 1], ..."""
    if full.dim() != 2 or full.shape[0] != full.shape[1]:
        raise InputError(f"pack_upper: expected a square (d, d) tensor, got shape {tuple(full.shape)}")
    d = full.shape[0]
    tri = torch.empty(d * (d + 1) // 2, dtype=full.dtype, device=full.device)
    for i, o in _row_offsets(d):
        tri[o : o + d - i] = full[i, i:]
    return tri


def unpack_upper(tri: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric (d, d) tensor whose upper triangle is the packed `tri` (pack_upper's order),
    in tri's dtype and on its device; the lower triangle mirrors it."""
    if tri.dim() != 1 or tri.numel() != d * (d + 1) // 2:
        raise InputError(
            f"unpack_upper: expected a packed triangle of {d * (d + 1) // 2} values for d = {d}, got shape {tuple(tri.shape)}"
        )
    full = torch.empty((d, d), dtype=tri.dtype, device=tri.device)
    for i, o in _row_offsets(d):
        full[i, i:] = tri[o : o + d - i]
        full[i:, i] = tri[o : o + d - i]
    return full


def finish(tri: torch.Tensor, mean64: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) as fp32 (d,) and fp32 (d, d), symmetric, on the CPU, from the packed fp64
    sums `tri` of (x - mean)(x - mean)^T over n rows (gram_partial around the exact fp64 mean):
    tri / n in fp64, rounded once to fp32. The centre is the fp64 mean itself, so there is no
    rank-one correction to make."""
    d = mean64.shape[0] if mean64.dim() == 1 else -1
    if d < 0 or tri.dim() != 1 or tri.numel() != d * (d + 1) // 2:
        raise InputError(
            f"finish: expected mean64 (d,) and a packed triangle of d (d + 1) / 2 values, got shapes "
            f"{tuple(mean64.shape)} and {tuple(tri.shape)}"
        )
    if n < 1:
        raise InputError(f"finish: a covariance needs at least one row, got n = {n}")
    cov32 = (tri.to("cpu", torch.float64) / n).to(torch.float32)
    return mean64.to("cpu", torch.float32), unpack_upper(cov32, d)


def covariance(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean (fp32, (d,)) and population covariance Wc^T Wc / N (fp32, (d, d)) of W (N >= 1
    rows), on W's device: column_sums, gram_partial around the fp64 mean, finish."""
    check_w(W, min_rows=1, op="covariance")
    n = int(W.shape[0])
    mean64 = column_sums(W) / n
    mean, cov = finish(gram_partial(W, mean64), mean64, n)
    return mean.to(W.device), cov.to(W.device)
