"""Sums, then finish: the covariance of a W whose rows are split into shares.

A share is one process's rows [offset, offset + n) of a whole of N rows (shares in order; uneven and
empty ones allowed). Each share gives partial sums; the shares' sums, combined in share order, give
every process the same finish, the same numbers one process would compute:

- native (the CPU kernels, csrc/cpu/center_syrk.cpp; on CUDA csrc/cuda/center_syrk.cu, with the
  CPU fp32 sets' plan, exact=False): column statistics (fp64 sums and sums of squares, largest
  |x|, sampled grids), runs of identical rows, then the fp64 triangle of the share's products
  around the centres the combined statistics fix; on the CPU, blocks and fp32 runs are aligned to
  the whole's rows, so rows are summed as one process sums them;
- torch (chunked.py): fp64 column sums, then the fp64 triangle of the share's rows around the exact
  mean.

The functions here take lists, one entry per share in share order: distributed.py gathers them
between processes, and the tests call them on shares of one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# How the native kernels select runs of identical rows (csrc/cpu/center_syrk.cpp: MIN_RUN,
# MIN_COUNT, MAX_ROWS): runs of 8 rows or more; of the rows they repeat, those with 32 rows in runs
# or more, at most 64, the ones with the most (ties: the first seen).
MIN_RUN, MIN_COUNT, MAX_ROWS = 8, 32, 64


@dataclass(frozen=True)
class Shares:
    """Where each share's rows sit in the whole: first rows and row counts, in share order."""

    offsets: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def of_counts(cls, counts: Sequence[int]) -> Shares:
        offsets, at = [], 0
        for n in counts:
            offsets.append(at)
            at += n
        return cls(tuple(offsets), tuple(int(n) for n in counts))


def add_in_order(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of the shares' tensors, added in share order (the same bits on every process)."""
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def combine_stats(stats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole's native statistics (4, d) from the shares': sums and sums of squares added in
    share order, the largest |x| and the finest grid exponent over the shares."""
    out = add_in_order([s[:2] for s in stats])
    amax = torch.stack([s[2] for s in stats]).amax(dim=0)
    lsb = torch.stack([s[3] for s in stats]).amin(dim=0)
    return torch.cat([out, amax[None], lsb[None]])


def _joined_runs(tables: Sequence[torch.Tensor], shares: Shares) -> list[list[int]]:
    """The whole's maximal runs [first, end, hash] of MIN_RUN rows or more: each share's runs in the
    whole's row numbers, a run at a share's last row joined with one at the next rows' first row
    when their rows' hashes agree."""
    runs: list[list[int]] = []
    for table, offset in zip(tables, shares.offsets):
        for begin, end, h in table.tolist():
            if begin == 0 and runs and runs[-1][1] == offset and runs[-1][2] == h:
                runs[-1][1] = end + offset
            else:
                runs.append([begin + offset, end + offset, h])
    return [r for r in runs if r[1] - r[0] >= MIN_RUN]


def select_runs(tables: Sequence[torch.Tensor], shares: Shares) -> list[torch.Tensor]:
    """Each share's rows of the runs the whole leaves out of the packs, as center_syrk_partial takes
    them: int64 (m, 3) of first row, end (the share's row numbers) and the index of the selected
    row, from the shares' center_row_runs tables. Rows are told apart by their hash; a share's
    kernel compares the bytes of its own rows, so a hash collision can only change which rows are
    selected, never the sums."""
    runs = _joined_runs(tables, shares)
    count: dict[int, int] = {}
    for begin, end, h in runs:  # dicts keep the order rows are first seen
        count[h] = count.get(h, 0) + end - begin
    seen = list(count)
    chosen = sorted((h for h in seen if count[h] >= MIN_COUNT), key=lambda h: -count[h])[:MAX_ROWS]
    index = {h: i for i, h in enumerate(sorted(chosen, key=seen.index))}
    out = []
    for offset, n in zip(shares.offsets, shares.counts):
        mine = [
            [max(b, offset) - offset, min(e, offset + n) - offset, index[h]]
            for b, e, h in runs
            if h in index and max(b, offset) < min(e, offset + n)
        ]
        out.append(torch.tensor(mine, dtype=torch.long).reshape(-1, 3))
    return out


def native_stats(W: torch.Tensor, offset: int, total: int, exact: bool) -> torch.Tensor:
    """A share's native column statistics, fp64 (4, d)."""
    return torch.ops.refframe.center_stats(W, offset, total, exact)


def native_runs(W: torch.Tensor) -> torch.Tensor:
    """A share's runs of identical rows, int64 (r, 3): first row, end, hash."""
    return torch.ops.refframe.center_row_runs(W)


def native_partial(
    W: torch.Tensor, stats: torch.Tensor, runs: torch.Tensor, offset: int, total: int, exact: bool
) -> torch.Tensor:
    """A share's fp64 packed upper triangle of products around the whole's plan."""
    return torch.ops.refframe.center_syrk_partial(W, stats, runs, offset, total, exact)


def native_finish(
    sums: torch.Tensor, stats: torch.Tensor, total: int, dtype: torch.dtype, exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole's fp64 mean and fp32 covariance from its combined statistics and triangle (on the
    CPU, wherever the shares' sums were computed)."""
    return torch.ops.refframe.center_syrk_finish(sums.cpu(), stats.cpu(), total, dtype, exact)


def native_covariance_of_shares(
    parts: Sequence[torch.Tensor], *, exact: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native sums-then-finish over shares held by one process (the steps distributed.py runs
    between processes): fp64 mean and fp32 covariance of their rows stacked in order."""
    shares = Shares.of_counts([p.shape[0] for p in parts])
    stats = combine_stats([native_stats(p, o, shares.total, exact) for p, o in zip(parts, shares.offsets)])
    runs = select_runs([native_runs(p) for p in parts], shares)
    sums = add_in_order(
        [native_partial(p, stats, r, o, shares.total, exact) for p, r, o in zip(parts, runs, shares.offsets)]
    )
    return native_finish(sums, stats, shares.total, parts[0].dtype, exact)
