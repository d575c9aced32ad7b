"""pytest-benchmark cases: native against pure torch for each op and the whole frame build.

    pytest benchmarks/ --benchmark-group-by=param:shape        # small shape
    REFFRAME_BENCH_FULL=1 pytest benchmarks/ ...                # also the full Qwen3-4B shape

Each case is one implementation at one shape, so pytest-benchmark's comparison table shows the two
backends side by side. `refframe bench` prints the human-readable table with ratios and memory.
"""

from __future__ import annotations

import os

import pytest
import torch

import refframe
from refframe.synthetic import SyntheticSpec, make_synthetic

SHAPES = {"small": SyntheticSpec(n_tokens=16384, dim=512, cluster_size=256, rank=64, total_variance=0.224)}
if os.environ.get("REFFRAME_BENCH_FULL"):
    SHAPES["qwen3-4b"] = SyntheticSpec()
BACKENDS = ["native", "torch"] if refframe.native_available() else ["torch"]

_data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def data(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    if shape not in _data:
        _data[shape] = make_synthetic(SHAPES[shape])
    return _data[shape]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_covariance(benchmark, shape, backend):
    W, _ = data(shape)
    benchmark.group = f"covariance {shape}"
    benchmark.pedantic(refframe.covariance, args=(W,), kwargs={"backend": backend}, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gather_mean(benchmark, shape, backend):
    W, ids = data(shape)
    benchmark.group = f"gather_mean {shape}"
    benchmark(refframe.gather_mean, W, ids, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_build_frame(benchmark, shape, backend):
    W, ids = data(shape)
    benchmark.group = f"build_frame {shape}"
    benchmark.pedantic(
        refframe.build_frame, args=(W, ids), kwargs={"backend": backend, "device": "cpu"}, rounds=3, warmup_rounds=1
    )
