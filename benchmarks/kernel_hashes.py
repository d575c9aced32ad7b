"""Hashes of every native kernel's outputs on a fixed set of awkward problems, per CPU kernel set.

A refactor of the kernels or the driver must leave these bits unchanged: run this before and after
and compare (`python benchmarks/kernel_hashes.py --json before.json`, then `--compare before.json`).
The bits are those of this CPU: another CPU (another set, another maker's vdpbf16ps) may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import xxhash

import refframe
from refframe import _C

SETS = ["portable", "avx2", "avx512", "avx512bf16", "amx"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def problems(small: bool):
    """(name, fp64 W) pairs: partial tiles, far-off columns, runs of identical rows, wide columns."""
    g = torch.Generator().manual_seed(7)
    n, d = (3001, 67) if small else (20011, 300)
    base = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.02
    yield "plain", base + torch.randn(d, generator=g, dtype=torch.float64) * 0.01
    far = base.clone()
    far[:, ::3] += 40 * 0.02
    far[:, 1::7] -= 700 * 0.02
    yield "far-off", far
    runs = base.clone()
    runs[100:140] = runs[99]
    runs[-300:] = 0.0
    yield "runs", runs
    moderate = base + 0.5 * 0.02 * torch.randn(d, generator=g, dtype=torch.float64).sign()
    yield "moderate-mean", moderate


def digest(*tensors: torch.Tensor) -> str:
    h = xxhash.xxh3_128()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run() -> dict[str, str]:
    out: dict[str, str] = {}
    for kset in SETS:
        os.environ["REFFRAME_CPU_KERNEL"] = kset
        if _C.cpu_kernel() != kset:
            continue
        for pname, X in problems(small=kset == "portable"):
            ids = torch.arange(0, X.shape[0], 3)
            offsets = torch.tensor([0, 1, ids.numel() // 2, ids.numel()])
            for dname, dtype in DTYPES.items():
                W = X.to(dtype)
                mean, cov = torch.ops.refframe.center_syrk(W)
                out[f"{kset}/{pname}/{dname}/center_syrk"] = digest(mean, cov)
                strided = torch.empty(W.shape[0], W.shape[1] + 5, dtype=dtype)[:, : W.shape[1]]
                strided.copy_(W)
                out[f"{kset}/{pname}/{dname}/center_syrk_strided"] = digest(*torch.ops.refframe.center_syrk(strided))
                out[f"{kset}/{pname}/{dname}/gather_mean"] = digest(torch.ops.refframe.gather_mean(W, ids))
                out[f"{kset}/{pname}/{dname}/segment_mean"] = digest(
                    torch.ops.refframe.segment_mean(W, ids, offsets)
                )
                if kset == "avx2":
                    f = refframe.build_frame(W, ids[:50])
                    out[f"frame/{pname}/{dname}"] = digest(f.centroid, f.eigenvalues, f.eigenvectors, f.mean)
    os.environ.pop("REFFRAME_CPU_KERNEL", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the hashes to this file")
    ap.add_argument("--compare", help="compare with hashes written earlier; exit 1 on any difference")
    args = ap.parse_args()
    hashes = run()
    print(f"{len(hashes)} outputs hashed; sets: {sorted({k.split('/')[0] for k in hashes} - {'frame'})}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(hashes, fh, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as fh:
            want = json.load(fh)
        common = sorted(set(want) & set(hashes))
        differ = [k for k in common if want[k] != hashes[k]]
        for k in differ:
            print(f"DIFFERS: {k}")
        print(f"{len(common)} compared, {len(differ)} differ")
        return 1 if differ or not common else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
