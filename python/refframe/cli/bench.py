"""`refframe bench`: native against pure torch (and numpy, scikit-learn), repeated builds, or a
sharded covariance."""

from __future__ import annotations

import argparse

from ..bench import distributed, kernels, repeated


def run(args: argparse.Namespace) -> int:
    if args.distributed is not None:
        flags = [*(["--small"] if args.small else []), *(["--json"] if args.json else [])]
        return distributed.main(["--ranks", str(args.distributed), "--reps", str(args.reps), *flags])
    if args.repeated:
        return repeated.main([*(["--small"] if args.small else []), *(["--json"] if args.json else [])])
    return kernels.main(args)
