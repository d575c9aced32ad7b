"""Frames of a W whose rows are split between the processes of a torch.distributed group.

Each process holds its share of W's rows (shares in rank order; uneven and empty ones allowed; a
DTensor sharded on dim 0 as it is) and never sees the others': they exchange their input checks
first (one object each, so a bad input on one rank is an error on every rank before any long
work), then partial sums (partial.py), combined in rank order so that every rank gets the same
bits run after run: column statistics (a few d-vectors), the runs of identical rows, one fp64
triangle of d (d + 1) / 2 values. A lost peer or a collective that times out is a DistributedError
on the ranks that remain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import _native, backends, chunked, errors, partial
from .checks import check_w
from .errors import BackendError, DistributedError, InputError, NonFiniteError, RefframeError


@dataclass(frozen=True)
class Shard:
    """This process's share of the whole W: its rows (padding dropped), its group and every share's
    place (partial.Shares, in rank order)."""

    W: torch.Tensor
    group: Any
    rank: int
    size: int
    shares: partial.Shares
    backend: str  # "native" where every rank runs the native kernels on its share, else "torch"
    same_kernels: bool  # every rank runs the same CPU kernel set (the exact bf16 set may then run; never with CUDA shares)
    device: torch.device  # where the group's collectives take tensors (captured on the calling thread)

    @property
    def offset(self) -> int:
        return self.shares.offsets[self.rank]

    @property
    def total(self) -> int:
        return self.shares.total


# -- collectives, each failure one line -------------------------------------------------------------


def _lost(stage: str, rank: int, exc: BaseException) -> DistributedError:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return DistributedError(
        f"rank {dist.get_rank() if dist.is_initialized() else rank}: lost contact with the other ranks while {stage} (a rank failed or exited, or the "
        f"collective timed out): {first}"
    )


def _collective(stage: str, rank: int, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RefframeError:
        raise
    except (RuntimeError, ValueError, ConnectionError, OSError) as exc:
        raise _lost(stage, rank, exc) from exc


def _comm_device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the calling thread's current CUDA device for
    NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def use_device(shard: Shard) -> None:
    """Makes shard.device current in this thread (a worker thread starts on cuda:0), so that the
    collectives that pick the current CUDA device (all_gather_object) use the rank's own."""
    if shard.device.type == "cuda":
        torch.cuda.set_device(shard.device)


def gather_objects(shard_group: Any, rank: int, obj: object, stage: str) -> list[Any]:
    """Every rank's obj, in rank order (small picklable objects)."""
    out: list[Any] = [None] * dist.get_world_size(shard_group)
    _collective(stage, rank, lambda: dist.all_gather_object(out, obj, group=shard_group))
    return out


def gather_tensors(shard: Shard, t: torch.Tensor, stage: str) -> list[torch.Tensor]:
    """Every rank's t (same shape and dtype on every rank), on the CPU, in rank order."""
    src = t.to(shard.device).contiguous()
    out = [torch.empty_like(src) for _ in range(shard.size)]
    _collective(stage, shard.rank, lambda: dist.all_gather(out, src, group=shard.group))
    return [o.cpu() for o in out]


def sum_in_rank_order(shard: Shard, t: torch.Tensor, stage: str) -> torch.Tensor:
    """The ranks' 1-D tensors t added in rank order, on every rank: each rank adds one slice of all
    the ranks' tensors (all_to_all), then the slices are gathered. Costs two messages the size of t,
    however many ranks; every rank gets the same bits, run after run."""
    k = shard.size
    if k == 1:
        return t.clone()
    dev = shard.device
    step = -(-t.numel() // k)
    send = torch.zeros(step * k, dtype=t.dtype, device=dev)
    send[: t.numel()] = t.to(dev)
    recv = torch.empty_like(send)
    _collective(stage, shard.rank, lambda: dist.all_to_all_single(recv, send, group=shard.group))
    mine = partial.add_in_order(list(recv.view(k, step)))
    slices = [torch.empty_like(mine) for _ in range(k)]
    _collective(stage, shard.rank, lambda: dist.all_gather(slices, mine, group=shard.group))
    return torch.cat(slices)[: t.numel()].cpu()


def broadcast(shard: Shard, t: torch.Tensor, stage: str) -> torch.Tensor:
    """Rank 0's t (every rank passes a tensor of the same shape and dtype), on the CPU."""
    buf = t.to(shard.device).contiguous()
    src = dist.get_global_rank(shard.group, 0) if shard.group is not None else 0
    _collective(stage, shard.rank, lambda: dist.broadcast(buf, src=src, group=shard.group))
    return buf.cpu()


# -- the shards -------------------------------------------------------------------------------------


def _local_of_dtensor(W: Any, op: str) -> tuple[torch.Tensor, Any]:
    """The local rows of a DTensor sharded on dim 0 and the group along that mesh dimension; the
    mesh's other dimensions must replicate it (each replica group builds the same frame)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard

    placements = list(W.placements)
    sharded = [
        i for i, p in enumerate(placements) if isinstance(p, DShard) and type(p) is DShard and p.dim == 0
    ]
    others = [p for i, p in enumerate(placements) if i not in sharded]
    if len(sharded) != 1 or not all(isinstance(p, Replicate) for p in others):
        raise InputError(
            f"{op}: a DTensor W must be sharded on dim 0 (rows) along one mesh dimension and replicated "
            f"along the others, got placements {tuple(placements)}"
        )
    return W.to_local(), W.device_mesh.get_group(sharded[0])


def _is_dtensor(W: object) -> bool:
    if type(W).__name__ != "DTensor":  # torch.distributed.tensor takes half a second to import
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(W, DTensor)


def digest(values: tuple) -> str:
    """A digest of tensors and strings (cluster names, ids, offsets), so that ranks can check they
    were given the same ones."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu").contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def _local_backend(W: torch.Tensor, backend: str) -> str:
    """The backend this rank's share takes: native where the library has partial-sum kernels for
    W's device (CPU; CUDA) and covariance(W, backend) would run natively, else torch."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(W.device.type, "")
    has = bool(key) and torch._C._dispatch_has_kernel_for_dispatch_key("refframe::center_syrk_partial", key)
    if not has:
        if backend == "native":
            raise BackendError(
                f"backend 'native' has no partial-sum kernels for {W.device.type} shards; use backend 'torch'"
            )
        return "torch"
    return "native" if backends.covariance_runs_native(W, backend) else "torch"


def _local_report(
    W: torch.Tensor, n_rows: int | None, op: str, backend: str, checks: Callable[[], tuple] | None
) -> dict[str, Any]:
    """What a rank tells the others before any work: its rows, d, dtype, backend, kernel set, a
    digest of what every rank must hold the same of, and any error (checks(): the caller's own
    checks of its other inputs, run here so that their error reaches every rank; it returns what
    must be the same on every rank)."""
    report: dict[str, Any] = {"error": None, "rank": dist.get_rank()}
    try:
        report["same"] = digest(checks() if checks is not None else ())
        check_w(W, min_rows=0, op=op)
        n = W.shape[0] if n_rows is None else int(n_rows)
        if not 0 <= n <= W.shape[0]:
            raise InputError(f"{op}: n_rows must be between 0 and W's {W.shape[0]} rows, got {n_rows}")
        report.update(n=n, d=int(W.shape[1]), dtype=str(W.dtype).removeprefix("torch."))
        report.update(
            backend=_local_backend(W, backend), kernel=_native.cpu_kernel() if W.device.type == "cpu" else ""
        )
    except RefframeError as exc:
        report["error"] = (type(exc).__name__, str(exc))
    except Exception as exc:  # any failure must reach the other ranks, or they would wait for this one
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        report["error"] = ("InputError", text if text.startswith(f"{op}:") else f"{op}: {text}")
    return report


def _check_reports(reports: list[dict[str, Any]], offsets: list[int | None], op: str) -> partial.Shares:
    """The shares from every rank's report, or the same one-line InputError on every rank."""
    for rep in reports:
        if rep["error"] is not None:
            kind, message = rep["error"]
            raise getattr(errors, kind, InputError)(f"rank {rep['rank']}: {message}")
    for key, what in (
        ("d", "W's number of columns"),
        ("dtype", "W's dtype"),
        ("same", "the cluster ids (or names, or offsets)"),
    ):
        values = [rep.get(key) for rep in reports]
        if len(set(values)) > 1:
            shown = (
                ", ".join(f"rank {rep['rank']}: {v}" for rep, v in zip(reports, values))
                if key != "same"
                else "they are not all equal"
            )
            raise InputError(f"{op}: {what} differs between ranks: {shown}")
    counts = [rep["n"] for rep in reports]
    if all(o is None for o in offsets):
        shares = partial.Shares.of_counts(counts)
    elif any(o is None for o in offsets):
        raise InputError(f"{op}: row_offset must be given on every rank or on none")
    else:
        shares = partial.Shares(tuple(int(o) for o in offsets), tuple(counts))
        for rep, o in zip(reports, shares.offsets):
            if not 0 <= o <= shares.total:
                raise InputError(
                    f"{op}: rank {rep['rank']}'s row_offset {o} lies outside the whole's {shares.total} rows"
                )
        order = sorted(range(len(counts)), key=lambda r: shares.offsets[r])
        at = 0
        for r in order:
            if counts[r] and shares.offsets[r] != at:
                raise InputError(
                    f"{op}: the ranks' rows must tile 0..N without gaps or overlaps; rank {r} starts at row "
                    f"{shares.offsets[r]}, expected {at}"
                )
            at += counts[r]
        if [r for r in order if counts[r]] != [r for r in range(len(counts)) if counts[r]]:
            raise InputError(f"{op}: the ranks' rows must be in rank order (rank r before rank r + 1)")
    if shares.total < 1:
        raise InputError(f"{op}: W has no rows on any rank")
    return shares


def shard_of(
    W: Any,
    group: Any = None,
    *,
    row_offset: int | None = None,
    n_rows: int | None = None,
    op: str = "covariance",
    backend: str = "auto",
    checks: Callable[[], tuple] | None = None,
) -> Shard | None:
    """This rank's Shard of W, after every rank has checked its input and seen the others' (None: W
    is a plain tensor and no group was given, a single-process call). A DTensor W gives its own
    group. checks(): the caller's checks of its other inputs, whose error becomes every rank's; it
    returns what every rank must hold the same of (cluster names, ids, offsets)."""
    if _is_dtensor(W):
        if group is not None:
            raise InputError(f"{op}: a DTensor W carries its own process group; do not pass group=")
        W, group = _local_of_dtensor(W, op)
    elif group is None:
        if row_offset is not None or n_rows is not None:
            raise InputError(f"{op}: row_offset and n_rows describe a share of W and need a group")
        return None
    if not dist.is_initialized():
        raise InputError(f"{op}: a group was given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    report = _local_report(W, n_rows, op, backend, checks)
    gathered = gather_objects(group, rank, (report, row_offset), f"checking the inputs of {op}")
    reports = [g[0] for g in gathered]
    shares = _check_reports(reports, [g[1] for g in gathered], op)
    agreed = "native" if all(r["backend"] == "native" for r in reports) else "torch"
    same_kernels = len({r["kernel"] for r in reports}) == 1 and reports[0]["kernel"] != ""  # CUDA shares: ""
    mine = W[: shares.counts[rank]]
    return Shard(mine, group, rank, len(gathered), shares, agreed, same_kernels, _comm_device(group))


# -- the ops ------------------------------------------------------------------------------------------


def _raise_nonfinite(shard: Shard, op: str) -> None:
    """The ranks' NaN/Inf counts and first rows, as one NonFiniteError on every rank."""
    from .checks import find_nonfinite

    count, first = find_nonfinite(shard.W)
    found = gather_objects(
        shard.group, shard.rank, (count, first + shard.offset if first >= 0 else -1), "checking W"
    )
    total = sum(c for c, _ in found)
    rows = [f for c, f in found if c]
    raise NonFiniteError(
        f"{op}: {total} NaN/Inf value(s) in W, first in row {min(rows)}; fix or drop those rows"
    )


def covariance(
    shard: Shard, op: str = "covariance", release: Callable[[], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 mean and fp32 covariance of the whole W, the same on every rank: the CPU kernels'
    partial sums where every rank runs them (shard.backend "native"), else chunked fp64 sums.
    release(): called once this rank's rows are summed, before the exchange of the sums."""
    release = release or (lambda: None)
    use_device(shard)
    W = shard.W
    if shard.backend == "native":
        exact = shard.same_kernels
        mine = partial.native_stats(W, shard.offset, shard.total, exact)
        stats = partial.combine_stats(gather_tensors(shard, mine, "combining the column statistics"))
        if not bool(torch.isfinite(stats[:2]).all()):
            _raise_nonfinite(shard, op)
        tables = gather_objects(
            shard.group, shard.rank, partial.native_runs(W).cpu(), "agreeing on runs of identical rows"
        )
        runs = partial.select_runs(tables, shard.shares)[shard.rank]
        sums = partial.native_partial(W, stats, runs, shard.offset, shard.total, exact)
        release()
        sums = sum_in_rank_order(shard, sums, "adding the covariance's partial sums")
        return partial.native_finish(sums, stats, shard.total, W.dtype, exact)
    col = sum_in_rank_order(shard, chunked.column_sums(W), "combining the column sums")
    if not bool(torch.isfinite(col).all()):
        _raise_nonfinite(shard, op)
    mean64 = col / shard.total
    sums = chunked.gram_partial(W, mean64)
    release()
    sums = sum_in_rank_order(shard, sums, "adding the covariance's partial sums")
    mean, cov = chunked.finish(sums, mean64, shard.total)
    return mean64, cov


def segment_mean(shard: Shard, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Means of K segments of global row ids as fp32 (K, d) on every rank: each rank adds its rows
    in fp64, the sums and counts are added in rank order, then divided."""
    ids = ids.to("cpu", torch.int64)
    seg = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff().to("cpu"))
    lo, hi = shard.offset, shard.offset + shard.W.shape[0]
    mine = (ids >= lo) & (ids < hi)
    local = shard.W[(ids[mine] - lo).to(shard.W.device)].to("cpu", torch.float64)
    sums = torch.zeros(offsets.numel() - 1, shard.W.shape[1], dtype=torch.float64)
    sums.index_add_(0, seg[mine], local)
    sums = sum_in_rank_order(shard, sums.reshape(-1), "adding the centroids' partial sums")
    counts = offsets.diff().to(torch.float64)[:, None]
    return (sums.view(-1, shard.W.shape[1]) / counts).to(torch.float32)
