"""`refframe build` under torchrun: W's rows shared between the ranks.

torchrun sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1, `refframe build`
(or `python -m refframe build`) joins the group (--dist-backend, --dist-timeout) and every rank
opens and checks the same inputs; the ranks tell each other what they found before any work, so a
bad input on one rank is the same one-line error on all of them. Each rank memory-maps W and reads
only its rows (torch.chunk's split of W's rows, in rank order); rank 0 hashes W's file for the
frames' w_hash (streaming it, its pages let go as it goes), prints the report and writes the frames
atomically; the others wait for its word and end with its status. No PCA cache.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import distributed, tensorfile
from .._native import native_status
from ..build import Options, build_sharded, resolve_device
from ..errors import DistributedError, InputError, OutputError, RefframeError
from ..layout import EIGH_DTYPE_NAMES, __version__
from ..progress import QUIET, Progress
from ..resources import peak_rss_bytes
from .build import Job, _report_frames, _report_inputs, _report_saved, _save, prepare, resolve_jobs
from .console import say

EIGH_DTYPES = {name: getattr(torch, name) for name in EIGH_DTYPE_NAMES}


def _device(args: argparse.Namespace) -> torch.device:
    """Where this rank's rows are summed: --device as a single build resolves it (build.resolve_device),
    a CUDA device being this rank's own GPU (LOCAL_RANK)."""
    dev = resolve_device(args.device, args.backend)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dev.type == "cuda" else dev


def _backend(args: argparse.Namespace) -> str:
    if args.dist_backend:
        return args.dist_backend
    return "nccl" if _device(args).type == "cuda" else "gloo"


def run(args: argparse.Namespace) -> int:
    """`refframe build` on every rank of a torchrun job."""
    if args.dist_timeout <= 0:
        raise InputError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    backend = _backend(args)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=args.dist_timeout))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"cannot join the torchrun group ({backend}): {str(exc).splitlines()[0]}"
        ) from None
    try:
        return _run(args, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def _agree(rank: int, problem: str | None, stage: str) -> None:
    """Every rank's problem (None: none), exchanged: the first one is raised on every rank."""
    problems = distributed.gather_objects(None, rank, problem, stage)
    found = [(r, p) for r, p in enumerate(problems) if p is not None]
    if found:
        r, p = found[0]
        raise InputError(
            p if all(q == p for _, q in found) and len(found) == len(problems) else f"rank {r}: {p}"
        )


def _run(args: argparse.Namespace, rank: int, size: int) -> int:
    problem, jobs = None, []
    try:
        jobs = resolve_jobs(args)
        for job in jobs:
            prepare(job, args)
        outs = [str(p) for j in jobs for p in j.outputs.values()]
        if len(set(outs)) != len(outs):
            raise InputError(
                "two frames would be written to the same file; give each model its own --out-dir"
            )
    except RefframeError as exc:
        problem = str(exc)
    _agree(rank, problem, "checking the inputs")
    args.outputs_planned, args.outputs_written = sum(len(j.outputs) for j in jobs), 0
    if rank == 0:
        say(f"refframe {__version__}: {native_status()}; {size} ranks ({dist.get_backend()})")
    for i, job in enumerate(jobs, 1):
        if len(jobs) > 1 and rank == 0:
            say("")
            say(f"== Model {i}/{len(jobs)}: {job.name} ==")
        _run_job(job, args, rank, size)
        args.outputs_written += len(job.outputs)
        job.W = None
    return 0


def _run_job(job: Job, args: argparse.Namespace, rank: int, size: int) -> None:
    """One model: this rank's rows, the sharded build, rank 0's report and files, then its word."""
    W = job.W
    assert W is not None
    n = W.shape[0]
    step = -(-n // size)
    r0, r1 = min(n, rank * step), min(n, (rank + 1) * step)
    mine = W[r0:r1]
    dev = _device(args)
    if dev.type == "cuda":  # this rank's rows on its GPU; the file's pages can go at once
        mine, host = mine.to(dev), mine
        tensorfile.release_pages(host)
    progress = Progress() if rank == 0 else QUIET
    if rank == 0:
        _report_inputs(job, W)

    def same() -> tuple:
        return tuple(x for k, v in job.clusters.items() for x in (k, v))

    shard = distributed.shard_of(
        mine, dist.group.WORLD, row_offset=r0, op=job.w_name, backend=args.backend, checks=same
    )
    options = Options(args.backend, args.device, EIGH_DTYPES[args.eigh_dtype], args.force)
    res = build_sharded(
        shard,
        job.clusters,
        options,
        name=job.w_name,
        release=lambda: tensorfile.release_pages(mine),
        progress=progress,
        log=say if rank == 0 else None,
    )
    t_hash = 0.0
    if rank == 0:  # the whole file's hash, as one process records it; its pages let go as it goes
        t0 = time.perf_counter()
        with progress.stage("hashing W"):
            res.w_hash = tensorfile.hash_tensor(W, drop_pages=True)
        t_hash = time.perf_counter() - t0
    problem = None
    if rank == 0:
        for cname, fr in res.frames.items():
            fr.metadata.update(w_hash=res.w_hash, pca_cache="off", w_source=job.w_name, cluster=cname)
            fr.metadata["cluster_source"] = job.cluster_sources.get(cname, "")
        _report_frames(res.frames)
        try:
            t0 = time.perf_counter()
            _report_saved(_save(job, res, args, progress))
            stages = {"load": job.t_load, "hash": t_hash, **res.timings, "save": time.perf_counter() - t0}
            say(
                "Stage times: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
                + f"; total {sum(stages.values()):.2f} s"
            )
        except RefframeError as exc:
            problem = str(exc)
    words = distributed.gather_objects(None, rank, (problem, peak_rss_bytes()), "writing the frames")
    if words[0][0] is not None:
        raise OutputError(words[0][0] if rank == 0 else f"rank 0 could not write the frames: {words[0][0]}")
    if rank == 0:
        say("Peak memory per rank: " + ", ".join(f"{peak / 1e9:.2f}" for _, peak in words) + " GB")
