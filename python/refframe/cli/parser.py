"""The command line's parser: every command and option, and nothing that loads torch, so --help
answers at once. Each command names the module of refframe.cli that runs it (`command_module`)."""

from __future__ import annotations

import argparse
import os
import sys

from ..layout import BACKENDS, CLUSTER_FILENAME, EIGH_DTYPE_NAMES, MATRICES, W_FILENAME, __version__

BACKEND_HELP = "auto (native kernels where they run, else pure torch), native, or torch (the notebook's maths)"
MATRIX_HELP = (
    "which of a checkpoint's token matrices is W: unembedding (default; a model with tied embeddings "
    "stores only the embedding, which is then used) or embedding; --W-key overrides it"
)
MATRIX_NEEDS_CHECKPOINT = (
    "--matrix chooses between a checkpoint's unembedding and embedding: it needs --checkpoint DIR "
    "(the tensor of a W file is chosen with --W-key)"
)


def _add_source_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    many: dict = {"action": "extend", "nargs": "+"} if several else {}  # build: repeatable
    p.add_argument(
        "--model-dir", **many, help=f"folder in the seed's layout ({W_FILENAME}, {CLUSTER_FILENAME})"
    )
    p.add_argument("--W", dest="w", help="safetensors file holding W (overrides --model-dir)")
    p.add_argument("--cluster", **many, help="safetensors file holding the cluster token ids")
    p.add_argument("--W-key", dest="w_key", help="key of W in its file or checkpoint (default: W)")
    p.add_argument("--cluster-key", help="key of the ids in their file (default: cluster_token_ids)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line, like every other refframe error (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"refframe: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="refframe", description="Cluster-centric reference frames of token embedding matrices."
    )
    parser.add_argument("--version", action="version", version=f"refframe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [_add_build(sub), _add_verify(sub), _add_project(sub), _add_plot(sub), _add_demo(sub), _add_bench(sub)]
    for command in commands:  # also accepted after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    return parser


def _add_build(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("build", help="compute the PCA of W and the cluster centroid, save the frame")
    _add_source_args(b, several=True)
    b.add_argument(
        "--checkpoint",
        action="extend",
        nargs="+",
        help="Hugging Face safetensors checkpoint folder(s): W is the model's unembedding (lm_head.weight, "
        "embed_out.weight, ...; the embedding when tied), found from config.json or the key names; see --matrix, --W-key",
    )
    b.add_argument("--matrix", choices=MATRICES, help=MATRIX_HELP)
    b.add_argument("--out", help="output file (default: DIR/1.6a_cluster_reference_frame.safetensors)")
    b.add_argument(
        "--out-dir",
        help="output folder; several clusters: 1.6a_cluster_reference_frame.<cluster>.safetensors each; several models: OUT_DIR/<model name>/",
    )
    b.add_argument(
        "--cache-dir",
        help="PCA cache folder (default: $REFFRAME_CACHE_DIR, $XDG_CACHE_HOME/refframe or ~/.cache/refframe)",
    )
    b.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the PCA cache (also: REFFRAME_NO_CACHE=1)",
    )
    b.add_argument(
        "--no-fsync",
        action="store_true",
        help="do not wait for the frames (and PCA cache entries) to reach the disk; files are still replaced atomically, but a power cut soon after can lose them",
    )
    b.add_argument("--model-name", help="model name stored in the file's metadata (default: the folder name)")
    b.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        help="under torchrun (WORLD_SIZE > 1), each rank reads its share of W's rows: the "
        "torch.distributed backend (default: nccl on CUDA, else gloo)",
    )
    b.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="under torchrun, how long a rank waits for the others at any step before it gives up (default 600)",
    )
    b.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    b.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    b.add_argument(
        "--eigh-dtype",
        default="float32",
        choices=EIGH_DTYPE_NAMES,
        help="precision of the eigendecomposition (default float32, as the notebook; float64 makes small "
        "eigenvalues accurate relative to themselves)",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="skip the up-front memory check (also: REFFRAME_SKIP_MEMORY_CHECK=1)",
    )
    b.set_defaults(command_module="build")
    return b


def _add_verify(sub) -> argparse.ArgumentParser:
    v = sub.add_parser("verify", help="check a frame file (format, maths, and against its source if given)")
    v.add_argument("file", nargs="+", help="the frame file(s) to check")
    _add_source_args(v)
    v.add_argument(
        "--checkpoint", help="Hugging Face checkpoint folder to take W from (as build --checkpoint; --matrix or --W-key to choose)"
    )
    v.add_argument("--matrix", choices=MATRICES, help=MATRIX_HELP)
    v.set_defaults(command_module="verify")
    return v


def _add_project(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("project", help="coordinates of tokens in a frame and their distances to its centroid")
    p.add_argument("frame", help="the frame file")
    p.add_argument("--W", dest="w", help="safetensors file holding W")
    p.add_argument("--model-dir", help=f"folder in the seed's layout (its {W_FILENAME})")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint folder to take W from (as build --checkpoint)")
    p.add_argument("--W-key", dest="w_key", help="key of W in its file (default: W, or the checkpoint's unembedding)")
    p.add_argument("--matrix", choices=MATRICES, help=MATRIX_HELP)
    p.add_argument("--k", type=int, help="number of axes (default: all d)")
    p.add_argument("--ids", help="safetensors file of token ids to project (default: every token)")
    p.add_argument("--ids-key", help="key of the ids in their file (default: cluster_token_ids, or its only 1-D integer tensor)")
    p.add_argument("--out", required=True, help="output safetensors file: coords (n, k), radius (n,), ids (n,)")
    p.add_argument(
        "--allow-other-w",
        action="store_true",
        help="project a W other than the one the frame was built from (its w_hash differs) with a warning",
    )
    p.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    p.set_defaults(command_module="project")
    return p


def _add_plot(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plot", help="PNG figures of a frame: eigenvalue spectrum, distances to the centroid, principal planes"
    )
    p.add_argument("frame", help="the frame file")
    p.add_argument("--W", dest="w", help="safetensors file holding W (without W only the spectrum is drawn)")
    p.add_argument("--model-dir", help=f"folder in the seed's layout (its {W_FILENAME} and {CLUSTER_FILENAME})")
    p.add_argument("--checkpoint", help="Hugging Face checkpoint folder to take W from (as build --checkpoint)")
    p.add_argument("--W-key", dest="w_key", help="key of W in its file (default: W, or the checkpoint's unembedding)")
    p.add_argument("--matrix", choices=MATRICES, help=MATRIX_HELP)
    p.add_argument(
        "--cluster", help=f"safetensors file of the cluster's token ids, marked on the figures (default with --model-dir DIR: DIR/{CLUSTER_FILENAME})"
    )
    p.add_argument("--cluster-key", help="key of the ids in their file (default: cluster_token_ids)")
    p.add_argument(
        "--out-dir", required=True, help="folder for spectrum.png, radial_profile.png and planes.png (created if missing)"
    )
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNG files (default 150)")
    p.add_argument(
        "--allow-other-w",
        action="store_true",
        help="plot a W other than the one the frame was built from (its w_hash differs) with a warning",
    )
    p.set_defaults(command_module="plot")
    return p


def _add_demo(sub) -> argparse.ArgumentParser:
    dm = sub.add_parser("demo", help="build and verify a frame of a synthetic W of Qwen3-4B's shape")
    dm.add_argument("--small", action="store_true", help="a small W (8192 x 256) that runs in seconds")
    dm.add_argument("--dir", default="refframe-demo", help="where the synthetic model folder goes")
    dm.add_argument("--seed", type=int, default=0, help="seed of the synthetic W and cluster (default 0)")
    dm.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    dm.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    dm.set_defaults(command_module="demo")
    return dm


def _add_bench(sub) -> argparse.ArgumentParser:
    bn = sub.add_parser("bench", help="time native against pure torch, side by side")
    bn.add_argument("--small", action="store_true", help="a small shape instead of Qwen3-4B's")
    bn.add_argument("--reps", type=int, default=3, help="timed runs of each stage per backend (default 3)")
    bn.add_argument("--json", action="store_true", help="machine-readable output")
    bn.add_argument(
        "--repeated",
        action="store_true",
        help="repeated builds instead: PCA cache hit vs miss, K = 1/16/64 clusters, hashing GB/s",
    )
    bn.add_argument(
        "--distributed",
        type=int,
        metavar="K",
        help="a sharded covariance instead: K ranks x 1 thread (gloo, loopback) against 1 process x K threads",
    )
    bn.set_defaults(command_module="bench")
    return bn


# Options that name files or folders: a leading ~ is expanded, as a shell would outside quotes.
PATH_OPTIONS = ("model_dir", "w", "cluster", "checkpoint", "out", "out_dir", "cache_dir", "file", "dir", "frame", "ids")


def expand_user_paths(args: argparse.Namespace) -> argparse.Namespace:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
    return args
