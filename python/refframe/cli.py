"""The `refframe` command: build, verify, demo, bench."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import InputError, OutputError, RefframeError, RefframeWarning
from .names import CLUSTER_FILENAME, DEFAULT_FILENAME, EIGH_DTYPE_NAMES, W_FILENAME

# Everything that loads torch is imported inside the commands, after the arguments are parsed:
# --help answers at once, and Ctrl-C while torch loads is reported like any other interrupt.


def say(*args: object) -> None:
    print(*args, flush=True)


BACKEND_HELP = "auto (native kernels where they run, else pure torch), native, or torch (the notebook's maths)"


def _add_source_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    many: dict = {"action": "extend", "nargs": "+"} if several else {}  # build: repeatable
    p.add_argument(
        "--model-dir", **many, help=f"folder in the seed's layout ({W_FILENAME}, {CLUSTER_FILENAME})"
    )
    p.add_argument("--W", dest="w", help="safetensors file holding W (overrides --model-dir)")
    p.add_argument("--cluster", **many, help="safetensors file holding the cluster token ids")
    p.add_argument("--W-key", dest="w_key", help="key of W in its file (default: W)")
    p.add_argument("--cluster-key", help="key of the ids in their file (default: cluster_token_ids)")


def cmd_build(args: argparse.Namespace) -> int:
    from .buildcmd import cmd_build as build_models

    return build_models(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint_w
    from .io import hash_tensor
    from .sources import load_ids, load_w, seed_paths
    from .verify import verify_frame

    files = [Path(f) for f in args.file]
    if args.checkpoint and (args.model_dir or args.w):
        raise InputError("give W once: --checkpoint DIR, --model-dir DIR or --W FILE")
    if args.cluster and not (args.model_dir or args.w or args.checkpoint):
        raise InputError(
            "checking the centroid against --cluster needs W too: give --W FILE, --model-dir DIR or --checkpoint DIR"
        )
    if args.cluster and len(files) > 1:
        raise InputError(
            "--cluster checks one frame's centroid: give one frame file with it (several files are checked "
            "against W only)"
        )
    W = ids = None
    w_name, ids_name, against = "W", "cluster ids", ""
    ids_path: Path | None = None
    if args.checkpoint:
        W, where = load_checkpoint_w(args.checkpoint, args.w_key)
        w_name, against = f"{where.path}:{where.key}", f"{where.path} ({where.key})"
        ids_path = Path(args.cluster) if args.cluster else None
    elif args.model_dir or args.w:
        paths = seed_paths(args.model_dir, args.w, args.cluster, out=files[0])
        W, wk = load_w(paths.w, args.w_key)
        w_name, against = f"{paths.w}:{wk}", str(paths.w)
        # A model folder's cluster file belongs to its one default frame, not to several frames.
        ids_path = paths.cluster if len(files) == 1 else None
    if ids_path is not None:
        ids, ck = load_ids(ids_path, args.cluster_key)
        ids_name = f"{ids_path}:{ck}"
    w_hash = hash_tensor(W) if W is not None and len(files) > 1 else None  # once for all the files
    for path in files:
        say(f"Verifying {path}" + (f" against {against}" if against else ""))
        res = verify_frame(path, W, ids, w_name=w_name, ids_name=ids_name, w_content_hash=w_hash)
        for line in res.checks:
            say(f"  ✓ {line}")
    say("✓ Verification passed" + (f" ({len(files)} files)" if len(files) > 1 else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .buildcmd import cmd_build as build_models
    from .io import save_tensors
    from .ops import native_status
    from .synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec.small() if args.small else SyntheticSpec(seed=args.seed)
    if args.small:
        spec = SyntheticSpec(**{**spec.__dict__, "seed": args.seed})
    name = f"synthetic-{spec.n_tokens}x{spec.dim}-seed{spec.seed}"
    model_dir = Path(args.dir) / name
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{model_dir}: cannot create the demo folder ({exc.strerror or exc})") from None
    say(f"refframe {__version__}: {native_status()}")
    w_path, ids_path = model_dir / W_FILENAME, model_dir / CLUSTER_FILENAME
    if w_path.exists() and ids_path.exists():
        say(f"Reusing synthetic W and cluster in {model_dir}")
    else:
        say(
            f"Generating a synthetic W ({spec.n_tokens:,} x {spec.dim:,}, bf16) with a planted cluster of "
            f"{spec.cluster_size:,} tokens in {model_dir} ..."
        )
        t0 = time.perf_counter()
        W, ids = make_synthetic(spec)
        save_tensors(w_path, {"W": W}, {"generator": "refframe.synthetic", "spec": repr(spec)})
        save_tensors(ids_path, {"cluster_token_ids": ids})
        del W
        say(f"  done in {time.perf_counter() - t0:.1f} s")
    say("")
    # --no-cache: the demo shows the whole build, not a PCA read back from an earlier demo's cache.
    build = ["build", "--model-dir", str(model_dir), "--backend", args.backend, "--device", args.device, "--no-cache"]
    build_models(build_parser().parse_args(build))
    say("")
    cmd_verify(build_parser().parse_args(["verify", str(model_dir / DEFAULT_FILENAME), "--model-dir", str(model_dir)]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


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

    b = sub.add_parser("build", help="compute the PCA of W and the cluster centroid, save the frame")
    _add_source_args(b, several=True)
    b.add_argument(
        "--checkpoint",
        action="extend",
        nargs="+",
        help="Hugging Face safetensors checkpoint folder(s): W is lm_head.weight, else model.embed_tokens.weight (tied), or --W-key",
    )
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
    b.add_argument("--backend", default="auto", choices=["auto", "native", "torch"], help=BACKEND_HELP)
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
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="check a frame file (format, maths, and against its source if given)")
    v.add_argument("file", nargs="+", help="the frame file(s) to check")
    _add_source_args(v)
    v.add_argument(
        "--checkpoint", help="Hugging Face checkpoint folder to take W from (as build --checkpoint; --W-key to choose)"
    )
    v.set_defaults(func=cmd_verify)

    dm = sub.add_parser("demo", help="build and verify a frame of a synthetic W of Qwen3-4B's shape")
    dm.add_argument("--small", action="store_true", help="a small W (8192 x 256) that runs in seconds")
    dm.add_argument("--dir", default="refframe-demo", help="where the synthetic model folder goes")
    dm.add_argument("--seed", type=int, default=0, help="seed of the synthetic W and cluster (default 0)")
    dm.add_argument("--backend", default="auto", choices=["auto", "native", "torch"], help=BACKEND_HELP)
    dm.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, mps")
    dm.set_defaults(func=cmd_demo)

    bn = sub.add_parser("bench", help="time native against pure torch, side by side")
    bn.add_argument("--small", action="store_true", help="a small shape instead of Qwen3-4B's")
    bn.add_argument("--reps", type=int, default=3, help="timed runs of each stage per backend (default 3)")
    bn.add_argument("--json", action="store_true", help="machine-readable output")
    bn.add_argument(
        "--repeated",
        action="store_true",
        help="repeated builds instead: PCA cache hit vs miss, K = 1/16/64 clusters, hashing GB/s",
    )
    bn.set_defaults(func=cmd_bench)
    for command in (b, v, dm, bn):  # also accepted after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    return parser


# Options that name files or folders: a leading ~ is expanded, as a shell would outside quotes.
PATH_OPTIONS = ("model_dir", "w", "cluster", "checkpoint", "out", "out_dir", "cache_dir", "file", "dir")


def expand_user_paths(args: argparse.Namespace) -> argparse.Namespace:
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])
    return args


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so the same clean-up runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _install_signal_handlers() -> dict[int, object]:
    """SIGTERM (and SIGHUP, unless ignored as under nohup) interrupt like Ctrl-C: the build stops,
    its temporary file is removed, the previous output stays as it was. Returns the handlers
    replaced, for main() to put back."""
    old: dict[int, object] = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if name == "SIGHUP" and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            old[sig] = signal.signal(sig, _raise_interrupt)
        except (ValueError, OSError):  # not the main thread
            pass
    return old


def _outputs_state(args: argparse.Namespace, exc: BaseException) -> str:
    """What an interrupted command left on disk: the outputs of finished models, plus any files of
    a batch that was already renamed into place when the interrupt was delivered."""
    planned = int(getattr(args, "outputs_planned", 1))
    written = int(getattr(args, "outputs_written", 0)) + int(getattr(exc, "refframe_files_written", 0))
    if written == 0:
        return "the output file was left as it was" if planned <= 1 else "the output files were left as they were"
    if written >= planned:
        return "the output file had already been written" if planned == 1 else "every output file had already been written"
    return f"{written} of {planned} output files had already been written, the others were left as they were"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _one_line(text: object) -> str:
    """Messages are one line by construction; this guards against a newline in a file name."""
    return " ".join(str(text).splitlines()).strip()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, RefframeWarning):
        print(f"refframe: warning: {_one_line(message)}", file=sys.stderr, flush=True)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), file=sys.stderr, end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure prints one line `refframe: error: ...` and returns
    non-zero (1 for an error, 2 for a usage error, 128 + the signal number when interrupted).
    --debug re-raises instead, with the traceback."""
    args = expand_user_paths(build_parser().parse_args(argv))
    old_handlers = _install_signal_handlers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RefframeWarning)
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except RefframeError as exc:
        if args.debug:
            raise
        print(f"refframe: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        signum = int(getattr(exc, "signum", signal.SIGINT))
        print(f"refframe: interrupted ({_signal_name(signum)}); {_outputs_state(args, exc)}", file=sys.stderr)
        return 128 + signum
    except MemoryError:
        if args.debug:
            raise
        print("refframe: error: out of memory (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, or a failure refframe does not know yet: still one line
        if args.debug:
            raise
        lines = str(exc).strip().splitlines()
        print(
            f"refframe: error: unexpected {type(exc).__name__}: {lines[0] if lines else ''} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        for sig, handler in old_handlers.items():
            try:
                signal.signal(sig, handler)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass


def entry() -> None:
    """The `refframe` command. After an interrupt the process ends at once, without the interpreter's
    shutdown: a native computation may still run in a worker thread (LAPACK cannot be stopped), and
    a second signal (`timeout` signals the process and then its group) would otherwise land in the
    shutdown. Outputs are complete or untouched either way, and temporary files are already gone."""
    try:
        code = main()
    except KeyboardInterrupt as exc:  # --debug re-raises it, or a second signal came meanwhile
        traceback.print_exc()
        code = 128 + int(getattr(exc, "signum", signal.SIGINT))
    frame = sys.modules.get("refframe.frame")
    if code >= 128 or (frame is not None and frame.compute_running()):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
