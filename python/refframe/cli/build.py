"""`refframe build`: one or several models, one or several clusters each, with the PCA cache.

Models: each --model-dir DIR (the seed layout), each --checkpoint DIR (a Hugging Face safetensors
checkpoint), or one --W FILE. Clusters: every --cluster FILE (default for a model folder: its
1.4h_cluster_tokens.safetensors); a file holding several 1-D integer tensors (and no
`cluster_token_ids`) gives one cluster per tensor, named by its key; otherwise a cluster is named by
its file's stem. Outputs:

- one model, one cluster: --out FILE, else OUT_DIR/1.6a_cluster_reference_frame.safetensors (OUT_DIR:
  --out-dir, else the model folder), as before;
- several clusters: OUT_DIR/1.6a_cluster_reference_frame.<cluster>.safetensors;
- several models: each model's own folder, or with --out-dir D, D/<model name>/.

Everything that can be checked before the work starts is checked first, for every model: the output
paths, W's file, key, shape and dtype, the ids, the backend and device; then each model is built
(memory check, hash, PCA or cache hit, centroids in one pass) and its frames are written.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._native import native_status
from ..atomic import check_output_path
from ..build import BuildResult, Options, build, frame_path, plan, save_frames
from ..cache import PCACache, cache_disabled_by_env
from ..checks import check_w
from ..errors import InputError
from ..frame import Frame
from ..inputs import (
    CheckpointMatrix,
    cluster_name,
    is_checkpoint_dir,
    load_w,
    locate,
    read_clusters,
    seed_paths,
)
from ..layout import CLUSTER_FILENAME, EIGH_DTYPE_NAMES, W_FILENAME, W_KEY, __version__
from ..progress import Progress
from ..tensorfile import SafetensorsFile
from .common import check_out_dir
from .console import say
from .parser import MATRIX_NEEDS_CHECKPOINT

EIGH_DTYPES = {name: getattr(torch, name) for name in EIGH_DTYPE_NAMES}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1024 / 1024:.1f} MB"


def report_frame(frame: Frame) -> None:
    """The seed's report: variance of the leading PCs, then the cluster centroid."""
    say("")
    for line in frame.variance_report().lines():
        say(line)
    c = frame.centroid
    say("")
    say(f"✓ Cluster centroid of {frame.cluster_size:,} tokens")
    say(f"  Norm: {float(torch.linalg.vector_norm(c)):.6f}")
    say(f"  First 10 components: {c[:10].numpy()}")

@dataclass
class Job:
    """One model to build."""

    name: str
    w_path: Path
    w_key: str | None
    cluster_files: list[Path]
    out: Path | None
    out_dir: Path | None
    create_out_dir: bool = False
    checkpoint: CheckpointMatrix | None = None
    # filled in by prepare()
    W: torch.Tensor | None = None
    w_name: str = ""
    key: str = ""
    clusters: dict[str, torch.Tensor] = field(default_factory=dict)
    cluster_sources: dict[str, str] = field(default_factory=dict)  # name -> "file:key"
    outputs: dict[str, Path] = field(default_factory=dict)
    t_load: float = 0.0

    @property
    def inputs(self) -> tuple[Path, ...]:
        return (self.w_path, *self.cluster_files)


def resolve_jobs(args: argparse.Namespace) -> list[Job]:
    """The models named on the command line, with their inputs and where their frames go."""
    model_dirs = [Path(d) for d in (args.model_dir or [])]
    ckpts = [Path(c) for c in (args.checkpoint or [])]
    clusters = [Path(c) for c in (args.cluster or [])]
    out = Path(args.out) if args.out else None
    out_dir = Path(args.out_dir) if args.out_dir else None
    n_models = len(model_dirs) + len(ckpts) + (1 if args.w and not model_dirs else 0)
    _check_model_options(args, model_dirs, ckpts, n_models, out, out_dir)
    several = n_models > 1
    jobs = [_model_dir_job(d, args, clusters, out, out_dir, several) for d in model_dirs]
    jobs += [_checkpoint_job(c, args, clusters, out, out_dir, several) for c in ckpts]
    if args.w and not model_dirs:
        jobs.append(_w_file_job(args, clusters, out, out_dir))
    if several and out_dir is not None:
        seen: dict[Path, str] = {}
        for j in jobs:
            assert j.out_dir is not None
            if j.out_dir in seen:
                raise InputError(
                    f"two models are both named {j.name!r}; with --out-dir each writes to DIR/<model name>/, "
                    "so build them in separate commands"
                )
            seen[j.out_dir] = j.name
    return jobs


def _check_model_options(
    args: argparse.Namespace,
    model_dirs: list[Path],
    ckpts: list[Path],
    n_models: int,
    out: Path | None,
    out_dir: Path | None,
) -> None:
    """The combinations of model and output options that cannot work, refused with their reason."""
    if args.w and ckpts:
        raise InputError("--W and --checkpoint both name W; give one of them")
    if args.matrix and not ckpts:
        raise InputError(MATRIX_NEEDS_CHECKPOINT)
    if args.w and len(model_dirs) > 1:
        raise InputError("--W replaces the W of one --model-dir; it cannot go with several")
    if n_models == 0:
        raise InputError("no input: give --model-dir DIR, --checkpoint DIR, or --W FILE (and --cluster FILE)")
    if n_models > 1 and out is not None:
        raise InputError(
            f"--out names one file, but {n_models} models are given: use --out-dir DIR (each model writes "
            "to DIR/<model name>/) or no --out (each model folder gets its frames)"
        )
    if n_models > 1 and args.model_name:
        raise InputError("--model-name names one model; with several, each is named after its folder")
    if out is not None and out_dir is not None:
        raise InputError("give --out FILE or --out-dir DIR, not both")


def _model_dir_job(
    d: Path, args: argparse.Namespace, clusters: list[Path], out: Path | None, out_dir: Path | None, several: bool
) -> Job:
    paths = seed_paths(d, args.w, None, None, args.model_name)
    if not args.w and not paths.w.exists() and is_checkpoint_dir(d):
        raise InputError(f"{d}: no {W_FILENAME}, but it holds a Hugging Face checkpoint: use --checkpoint {d}")
    return Job(
        name=paths.model_name,
        w_path=paths.w,
        w_key=args.w_key,
        cluster_files=clusters or [d / CLUSTER_FILENAME],
        out=out,
        out_dir=(out_dir / paths.model_name if several else out_dir) if out_dir else d,
        create_out_dir=out_dir is not None,
    )


def _checkpoint_job(
    c: Path, args: argparse.Namespace, clusters: list[Path], out: Path | None, out_dir: Path | None, several: bool
) -> Job:
    where = locate(c, args.w_key, args.matrix or "unembedding")
    if not clusters:
        raise InputError(f"{c}: a checkpoint holds no cluster ids; give --cluster FILE")
    if out is None and out_dir is None:
        raise InputError(
            f"{c}: give --out-dir DIR (or --out FILE) for the frames of a checkpoint; nothing is "
            "written into the checkpoint folder"
        )
    name = args.model_name or where.model_name
    return Job(
        name=name,
        w_path=where.path,
        w_key=where.key,
        cluster_files=clusters,
        out=out,
        out_dir=(out_dir / cluster_name(name) if several else out_dir) if out_dir else None,
        create_out_dir=True,
        checkpoint=where,
    )


def _w_file_job(args: argparse.Namespace, clusters: list[Path], out: Path | None, out_dir: Path | None) -> Job:
    paths = seed_paths(None, args.w, None, None, args.model_name)
    if not clusters:
        raise InputError("no cluster ids: give --cluster FILE (or --model-dir DIR)")
    if out is None and out_dir is None:
        raise InputError("no output path: give --out FILE or --out-dir DIR (or --model-dir DIR)")
    return Job(
        name=paths.model_name,
        w_path=paths.w,
        w_key=args.w_key,
        cluster_files=clusters,
        out=out,
        out_dir=out_dir,
        create_out_dir=True,
    )


def prepare(job: Job, args: argparse.Namespace) -> None:
    """Open and check everything of one model; raises before any work starts."""
    if job.out is not None:
        check_output_path(job.out, inputs=job.inputs)
    elif job.out_dir is not None:
        check_out_dir(job.out_dir, job.create_out_dir)
    t0 = time.perf_counter()
    if job.checkpoint is not None:
        job.W, job.key = SafetensorsFile(job.w_path).tensor(job.checkpoint.key), job.checkpoint.key
    else:
        job.W, job.key = load_w(job.w_path, job.w_key)
    job.w_name = f"{job.w_path}:{job.key}"
    check_w(job.W, job.w_name)
    job.clusters, job.cluster_sources = read_clusters(job.cluster_files, args.cluster_key, int(job.W.shape[0]))
    several = len(job.clusters) > 1
    if several and job.out is not None:
        raise InputError(
            f"--out names one file, but there are {len(job.clusters)} clusters ({', '.join(job.clusters)}): "
            "give --out-dir DIR; each frame goes to DIR/1.6a_cluster_reference_frame.<cluster>.safetensors"
        )
    if job.out is not None:
        job.outputs = {next(iter(job.clusters)): job.out}
    else:
        if job.out_dir is None:
            raise InputError("no output path: give --out FILE or --out-dir DIR (or --model-dir DIR)")
        job.outputs = {k: frame_path(job.out_dir, k if several else None) for k in job.clusters}
        if job.out_dir.is_dir():
            for p in job.outputs.values():
                check_output_path(p, inputs=job.inputs)
    plan(job.W, args.backend, args.device, job.w_name)
    job.t_load = time.perf_counter() - t0


def run_job(job: Job, args: argparse.Namespace, cache: PCACache | None, progress: Progress) -> dict:
    """Build and save one model's frames; print the report and the stage times."""
    W = job.W
    assert W is not None
    _report_inputs(job, W)
    options = Options(args.backend, args.device, EIGH_DTYPES[args.eigh_dtype], args.force)
    res = build(
        W,
        job.clusters,
        options,
        name=job.w_name,
        cache=cache,
        source=(job.w_path, job.key),
        progress=progress,
        log=say,
    )
    for cname, fr in res.frames.items():  # provenance, in each file's metadata
        fr.metadata.update(w_source=job.w_name, cluster=cname, cluster_source=job.cluster_sources.get(cname, ""))
    _report_frames(res.frames)
    t0 = time.perf_counter()
    paths = _save(job, res, args, progress)
    stages = {"load": job.t_load, **res.timings, "save": time.perf_counter() - t0}
    _report_saved(paths)
    say(
        "Stage times: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
        + f"; total {sum(stages.values()):.2f} s"
        + (f" (PCA cache {res.cache})" if res.cache != "off" else "")
    )
    return stages


def _report_inputs(job: Job, W: torch.Tensor) -> None:
    n, d = W.shape
    dtype = str(W.dtype).removeprefix("torch.")
    src = f"{job.w_path}" + (f" ({job.key})" if job.checkpoint is not None or job.key != W_KEY else "")
    if job.checkpoint is not None and job.checkpoint.reason:
        src += f": {job.checkpoint.reason}"  # which family, and why this matrix
    say(f"Loaded W: {tuple(W.shape)} {dtype} from {src}")
    sizes = [int(v.numel()) for v in job.clusters.values()]
    if len(sizes) == 1:
        say(f"  {n:,} tokens in {d:,} dimensions; {sizes[0]:,} cluster token{'s' if sizes[0] != 1 else ''}")
    else:
        say(
            f"  {n:,} tokens in {d:,} dimensions; {len(sizes)} clusters of {min(sizes):,} to {max(sizes):,} tokens"
        )


def _report_frames(frames: dict[str, Frame]) -> None:
    if len(frames) == 1:
        report_frame(next(iter(frames.values())))
        return
    say("")
    for line in next(iter(frames.values())).variance_report().lines():
        say(line)
    say("")
    for cname, fr in frames.items():
        norm = float(torch.linalg.vector_norm(fr.centroid))
        say(f"✓ Cluster {cname}: centroid of {fr.cluster_size:,} tokens, norm {norm:.6f}")


def _save(job: Job, res: BuildResult, args: argparse.Namespace, progress: Progress) -> list[Path]:
    """Write the model's frames, all or none, with a progress display."""
    frames = res.frames
    if job.out_dir is not None and job.out is None:
        job.out_dir.mkdir(parents=True, exist_ok=True)
    nbytes = sum(4 * (fr.eigenvectors.numel() + fr.eigenvalues.numel() + fr.centroid.numel()) for fr in frames.values())
    label = f"writing {len(frames)} frame{'s' if len(frames) > 1 else ''} ({_mb(nbytes)})"
    assert job.W is not None
    with progress.stage(label) as st:
        return save_frames(
            [(frames[k], job.outputs[k]) for k in frames],
            model_name=job.name,
            source_dtype=str(job.W.dtype).removeprefix("torch."),
            w_hash=res.w_hash,
            inputs=job.inputs,
            durable=not args.no_fsync,
            progress=st.update if len(frames) > 1 else None,
        )


def _report_saved(paths: list[Path]) -> None:
    say("")
    if len(paths) == 1:
        say(f"✓ Saved to {paths[0]}")
        say(f"  Size: {_mb(paths[0].stat().st_size)}")
        return
    say(f"✓ Saved {len(paths)} frames ({_mb(sum(p.stat().st_size for p in paths))}) to {paths[0].parent}:")
    for p in paths:
        say(f"  {p.name}")


def run(args: argparse.Namespace) -> int:
    """`refframe build`: check every model's inputs and outputs first, then build each in turn."""
    jobs = resolve_jobs(args)
    for job in jobs:
        prepare(job, args)
    outs = [p for j in jobs for p in j.outputs.values()]
    if len({str(p.resolve()) if p.parent.exists() else str(p) for p in outs}) != len(outs):
        raise InputError("two frames would be written to the same file; give each model its own --out-dir")
    use_cache = not (args.no_cache or (cache_disabled_by_env() and not args.cache_dir))
    cache = PCACache(args.cache_dir, durable=not args.no_fsync) if use_cache else None
    progress = Progress()
    args.outputs_planned, args.outputs_written = len(outs), 0  # for the message of an interrupt
    say(f"refframe {__version__}: {native_status()}")
    for i, job in enumerate(jobs, 1):
        if len(jobs) > 1:
            say("")
            say(f"== Model {i}/{len(jobs)}: {job.name} ==")
        run_job(job, args, cache, progress)
        args.outputs_written += len(job.outputs)
        job.W = None  # unmap this model's W before the next one
    return 0
