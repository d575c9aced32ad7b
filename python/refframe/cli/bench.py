"""`refframe bench`: native against pure torch (and numpy, scikit-learn), or repeated builds."""

from __future__ import annotations

import argparse

from ..bench import kernels, repeated


def run(args: argparse.Namespace) -> int:
    if args.repeated:
        return repeated.main([*(["--small"] if args.small else []), *(["--json"] if args.json else [])])
    return kernels.main(args)
