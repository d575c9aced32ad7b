"""What the ranks of tests/test_distributed.py run: gloo process groups of real processes on this
machine, on loopback only (GLOO_SOCKET_IFNAME=lo, a file:// rendezvous in a new folder per group).
Functions are at module level, as the spawn start method needs."""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def launch(
    fn: Callable[..., Any], k: int, *args: Any, timeout: float = 180.0
) -> tuple[dict[int, Any], list[int]]:
    """Runs fn(rank, k, *args) on k ranks; returns {rank: ("ok", value) or ("error", (type, message))}
    for the ranks that reported, and every rank's exit code."""
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + str(Path(tmp) / "rendezvous")
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_rank_main, args=(fn, r, k, init, q, args)) for r in range(k)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < k and time.monotonic() < deadline:
            try:
                rank, status, value = q.get(timeout=0.5)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # a rank that died reports nothing
                continue
            results[rank] = (status, torch.load(io.BytesIO(value)) if status == "ok" else value)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        return results, [p.exitcode for p in procs]


def _rank_main(fn: Callable[..., Any], rank: int, k: int, init: str, q: Any, args: tuple) -> None:
    os.environ.update(LOOPBACK)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=k, timeout=timedelta(seconds=60))
    try:
        buf = io.BytesIO()
        torch.save(fn(rank, k, *args), buf)  # bytes: a tensor's shared memory would die with this process
        q.put((rank, "ok", buf.getvalue()))
    except Exception as exc:  # reported to the test, which checks the type and the message
        q.put((rank, "error", (type(exc).__name__, str(exc))))
    finally:
        dist.destroy_process_group()


def make_matrix(n: int = 9000, d: int = 48, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The W every rank derives the same way: far from zero, with a run of identical rows across a
    4,096-row boundary and zero rows at the end."""
    g = torch.Generator().manual_seed(11)
    W = (
        torch.randn(n, d, generator=g, dtype=torch.float64) * 0.02
        + torch.randn(d, generator=g, dtype=torch.float64) * 0.06
    )
    W[4000:4200] = W[3999]
    W[-200:] = 0
    return W.to(dtype)


IDS = torch.arange(5, 9000, 13)
IDS_B = torch.tensor([8999, 0, 4100, 4100, 17])


def share(W: torch.Tensor, rank: int, cuts: list[int]) -> tuple[torch.Tensor, int]:
    b = [0, *cuts, W.shape[0]]
    return W[b[rank] : b[rank + 1]], b[rank]


def frame_of_share(
    rank: int, k: int, cuts: list[int], dtype: torch.dtype, backend: str
) -> dict[str, torch.Tensor]:
    """covariance, gather_mean and build_frame of this rank's rows."""
    import refframe

    W = make_matrix(dtype=dtype)
    mine, _ = share(W, rank, cuts)
    group = dist.group.WORLD
    mean, cov = refframe.covariance(mine, backend=backend, group=group)
    frame = refframe.build_frame(mine, IDS, backend=backend, group=group)
    frames = refframe.build_frames(mine, {"a": IDS, "b": IDS_B}, backend=backend, group=group)
    return {
        "frames_centroids": torch.stack([frames["a"].centroid, frames["b"].centroid]),
        "frames_eigenvalues": frames["b"].eigenvalues,
        "mean": mean,
        "cov": cov,
        "centroid": refframe.gather_mean(mine, IDS, backend=backend, group=group),
        "eigenvalues": frame.eigenvalues,
        "eigenvectors": frame.eigenvectors,
        "frame_centroid": frame.centroid,
        "n_tokens": frame.n_tokens,
    }


def frame_of_padded_share(rank: int, k: int, pad: int) -> dict[str, torch.Tensor]:
    """The last rank's share carries `pad` padding rows (garbage) after its real rows: n_rows
    leaves them out, row_offset says where each rank's rows start."""
    import refframe

    W = make_matrix()
    step = -(-W.shape[0] // k)
    r0, r1 = rank * step, min(W.shape[0], (rank + 1) * step)
    mine = W[r0:r1]
    n_rows = None
    if rank == k - 1:
        mine = torch.cat([mine, torch.full((pad, W.shape[1]), 7.0, dtype=W.dtype)])
        n_rows = r1 - r0
    mean, cov = refframe.covariance(mine, group=dist.group.WORLD, row_offset=r0, n_rows=n_rows)
    return {"mean": mean, "cov": cov}


def frame_of_dtensor(rank: int, k: int) -> dict[str, torch.Tensor]:
    """build_frame of a DTensor sharded on rows (torch.chunk's split), as FSDP2 or a row-wise
    tensor-parallel embedding holds it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import refframe

    mesh = init_device_mesh("cpu", (k,))
    W = distribute_tensor(make_matrix(), mesh, [Shard(0)])
    frame = refframe.build_frame(W, IDS)
    return {"eigenvalues": frame.eigenvalues, "eigenvectors": frame.eigenvectors, "centroid": frame.centroid}


def frame_of_dtensor_2d(rank: int, k: int) -> dict[str, torch.Tensor]:
    """A 2 x 2 mesh, rows sharded along the first dimension and replicated along the second: each
    replica group builds the frame on its own, every rank gets the same."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import refframe

    mesh = init_device_mesh("cpu", (2, 2))
    W = distribute_tensor(make_matrix(), mesh, [Shard(0), Replicate()])
    frame = refframe.build_frame(W, IDS)
    return {"eigenvalues": frame.eigenvalues, "eigenvectors": frame.eigenvectors, "centroid": frame.centroid}


def dtensor_on_columns(rank: int, k: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import refframe

    mesh = init_device_mesh("cpu", (k,))
    refframe.build_frame(distribute_tensor(make_matrix(), mesh, [Shard(1)]), IDS)


def faulty_build(rank: int, k: int, fault: str) -> None:
    """A build where rank 1 has a bad input or dies mid-build (die), or rank 0's eigh fails."""
    import refframe
    from refframe import build, partial

    W = make_matrix(dtype=torch.float32)
    mine, _ = share(W, rank, [4500])
    ids = IDS
    if rank == 1 and fault == "float ids":
        ids = IDS.double()
    if fault == "clusters":  # the same ids, split into clusters differently
        clusters = (
            {"a": torch.tensor([1, 2]), "b": torch.tensor([5000])}
            if rank == 0
            else {"a": torch.tensor([1]), "b": torch.tensor([2, 5000])}
        )
        refframe.build_frames(mine, clusters, group=dist.group.WORLD)
    if fault == "offset":
        mine = mine[:0] if rank == 1 else W
        refframe.build_frame(mine, ids, group=dist.group.WORLD, row_offset=0 if rank == 0 else 10**6)
    if rank == 0 and fault == "eigh":
        build._eigh = lambda *a: (_ for _ in ()).throw(torch.linalg.LinAlgError("failed to converge"))
    if rank == 1 and fault == "nan":
        mine = mine.clone()
        mine[10, 3] = float("nan")
    if fault == "ids":
        ids = torch.tensor([1, 2, 9000])
    if rank == 1 and fault == "columns":
        mine = mine[:, :40]
    if rank == 1 and fault == "die":
        partial.native_partial = lambda *a: os._exit(3)
    refframe.build_frame(mine, ids, group=dist.group.WORLD)
