"""Figures of a frame, for a notebook or a file: matplotlib Figures, drawn without pyplot.

    from refframe import plot
    plot.spectrum(frame)                            # eigenvalues (log) and cumulative variance (%)
    plot.radial_profile(W, frame, cluster_ids=ids)  # density of every token's distance to the centroid
    plot.planes(W, frame, cluster_ids=ids)          # token density in the PC1/PC2 and PC1/PC3 planes
    png = plot.to_png(fig, dpi=150)                 # the PNG's bytes

Each function returns a `matplotlib.figure.Figure` on an Agg canvas: nothing touches pyplot or the
current backend, so it works headless and a notebook shows the returned figure as it is. Distances
and coordinates come from refframe.radii / refframe.project, so W is read in place (bf16, fp16 or
fp32, memory-mapped). Titles name the model (frame.metadata["model_name"]) and the cluster
(frame.metadata["cluster"], else its size). matplotlib is an optional dependency (refframe[plot]);
without it every function raises DependencyError.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checks import check_ids
from .errors import DependencyError, InputError
from .frame import Frame
from .projection import _check_frame, project, radii

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MISSING = "plotting needs matplotlib: pip install 'refframe[plot]'"
ALL_COLOUR = "#1f77b4"
CLUSTER_COLOUR = "#d62728"
CUMULATIVE_COLOUR = "#ff7f0e"


def new_figure(figsize: tuple[float, float]) -> Figure:
    """An empty Figure on an Agg canvas (constrained layout); DependencyError without matplotlib."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError(MISSING) from None
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def require_matplotlib() -> None:
    """Raise DependencyError now if matplotlib is missing (the CLI asks before any work)."""
    new_figure((1.0, 1.0))


def to_png(fig: Figure, dpi: int = 150) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _model(frame: Frame) -> str:
    return frame.metadata.get("model_name") or "unnamed model"


def _cluster(frame: Frame) -> str:
    name, size = frame.metadata.get("cluster"), frame.cluster_size
    if name:
        return f"cluster {name} ({size:,} tokens)" if size else f"cluster {name}"
    return f"cluster of {size:,} tokens" if size else "cluster"


def _title(frame: Frame, what: str) -> str:
    """Two lines: the model and the cluster, then what the figure shows."""
    return f"{_model(frame)}, {_cluster(frame)}\n{what}"


def _percent(frame: Frame) -> np.ndarray:
    """Each PC's share of the total variance, in %, as Frame.variance_report counts it."""
    ev = frame.eigenvalues.detach().to("cpu", torch.float64).numpy()
    total = float(ev.sum())
    return ev / total * 100.0 if total > 0 else np.zeros_like(ev)


def spectrum(frame: Frame, *, marks: Sequence[int] = (10, 100), figsize: tuple[float, float] = (8.0, 5.0)) -> Figure:
    """The eigenvalues against their PC number on log-log axes (zero and negative eigenvalues are
    left out, and counted in a note), with the cumulative share of the variance (%) on a second
    axis and a mark at each of `marks` PCs below d."""
    fig = new_figure(figsize)
    _check_frame(None, frame, "spectrum")
    ev = frame.eigenvalues.detach().to("cpu", torch.float64).numpy()
    d = ev.size
    pc = np.arange(1, d + 1)
    ax = fig.add_subplot()
    positive = ev > 0
    line = ax.plot(pc[positive], ev[positive], color=ALL_COLOUR, lw=1.6, label="eigenvalue")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, max(d, 2) * 1.25)
    ax.set_xlabel("principal component (PC number, log scale)")
    ax.set_ylabel("eigenvalue (variance, W units²)", color=ALL_COLOUR)
    ax.grid(True, which="major", alpha=0.3)
    skipped = int((~positive).sum())
    if skipped == d:
        ax.set_ylim(0.1, 10.0)  # nothing to scale the log axis to
    if skipped:
        what = "no eigenvalue is positive" if skipped == d else f"{skipped:,} zero or negative eigenvalue(s)"
        ax.text(0.02, 0.03, f"{what}: not drawn on the log scale", transform=ax.transAxes, fontsize="small")
    cum = np.cumsum(_percent(frame))
    twin = ax.twinx()
    line += twin.plot(pc, cum, color=CUMULATIVE_COLOUR, lw=1.6, label="cumulative explained variance")
    twin.set_ylim(0, 102)
    twin.set_ylabel("cumulative explained variance (%)", color=CUMULATIVE_COLOUR)
    for k, share in frame.variance_report(top=0, cumulative=tuple(marks)).cumulative.items():
        ax.axvline(k, color="grey", ls=":", lw=1)
        twin.plot([k], [share], "o", color=CUMULATIVE_COLOUR, ms=5)
        twin.annotate(
            f"{k} PCs: {share:.1f} %", (k, share), xytext=(6, -12), textcoords="offset points", fontsize="small"
        )
    ax.legend(handles=line, loc="upper center", fontsize="small")
    ax.set_title(_title(frame, f"eigenvalue spectrum of W (d = {d:,}, N = {frame.n_tokens:,})"))
    return fig


def _cluster_ids(cluster_ids: object, W: torch.Tensor) -> np.ndarray | None:
    if cluster_ids is None:
        return None
    return check_ids(cluster_ids, int(W.shape[0]), "cluster_ids").to("cpu").numpy()


def radial_profile(
    W: torch.Tensor,
    frame: Frame,
    cluster_ids: object = None,
    *,
    bins: int = 200,
    backend: str = "auto",
    figsize: tuple[float, float] = (8.0, 5.0),
) -> Figure:
    """The density of every token's full-dimensional distance to the centroid (refframe.radii), a
    histogram normalised to area 1; the cluster's tokens (cluster_ids) get their own normalised
    histogram on a second axis and a rug of ticks along the bottom."""
    fig = new_figure(figsize)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise InputError(f"radial_profile: bins must be a positive integer, got {bins!r}")
    r = radii(W, frame, backend=backend).to("cpu", torch.float64).numpy()
    ids = _cluster_ids(cluster_ids, W)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(r, bins=bins)
    handles = ax.hist(
        r, bins=edges, density=True, histtype="stepfilled", color=ALL_COLOUR, alpha=0.55,
        label=f"all {r.size:,} tokens (median {np.median(r):.3g})",
    )[2]
    ax.set_xlabel("distance to centroid (W units)")
    ax.set_ylabel("density, all tokens (per W unit)", color=ALL_COLOUR)
    ax.set_xlim(0, edges[-1] * 1.02 if edges[-1] > 0 else 1)
    handles = list(handles)
    if ids is not None:
        rc = r[ids]
        twin = ax.twinx()
        cbins = np.histogram_bin_edges(rc, bins=int(min(bins, max(10, np.sqrt(rc.size)))))
        handles += twin.hist(
            rc, bins=cbins, density=True, histtype="step", lw=1.8, color=CLUSTER_COLOUR,
            label=f"cluster: {rc.size:,} tokens (median {np.median(rc):.3g})",
        )[2]
        twin.set_ylabel("density, cluster tokens (per W unit)", color=CLUSTER_COLOUR)
        twin.set_ylim(bottom=0)
        ax.plot(rc, np.full(rc.size, 0.015), ls="none", marker="|", ms=9, color=CLUSTER_COLOUR, alpha=0.35,
                transform=ax.get_xaxis_transform(), label="_cluster rug")
    ax.legend(handles=handles, loc="upper right", fontsize="small")
    ax.set_title(_title(frame, "distances of the tokens to the centroid"))
    return fig


def _check_axes(axes: object, d: int) -> list[tuple[int, int]]:
    """The PC pairs to draw, each two different PC numbers from 1 to d."""
    bad = InputError(f"planes: axes must be pairs of PC numbers from 1 to d = {d}, e.g. ((1, 2), (1, 3)); got {axes!r}")
    try:
        pairs = [tuple(p) for p in axes]  # type: ignore[union-attr]
    except TypeError:
        raise bad from None
    for p in pairs:
        ok = len(p) == 2 and all(isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= d for a in p)
        if not ok or p[0] == p[1]:
            raise bad
    if not pairs:
        raise bad
    return pairs  # type: ignore[return-value]


def planes(
    W: torch.Tensor,
    frame: Frame,
    cluster_ids: object = None,
    axes: Sequence[tuple[int, int]] = ((1, 2), (1, 3)),
    *,
    gridsize: int = 120,
    backend: str = "auto",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """The tokens' density in the frame's principal planes (coordinates around the centroid from
    refframe.project): one hexbin panel per pair of PC numbers in `axes`, log counts with a
    colourbar, the cluster's tokens (cluster_ids) overlaid as small markers, the centroid as a +."""
    _check_frame(None, frame, "planes")
    pairs = _check_axes(axes, frame.dim)
    fig = new_figure(figsize or (6.4 * len(pairs), 5.4))
    coords = project(W, frame, max(max(p) for p in pairs), backend=backend).to("cpu").numpy()
    ids = _cluster_ids(cluster_ids, W)
    pct = _percent(frame)
    for i, (a, b) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), i + 1)
        x, y = coords[:, a - 1], coords[:, b - 1]
        hb = ax.hexbin(x, y, gridsize=gridsize, bins="log", mincnt=1, cmap="viridis", linewidths=0.2)
        fig.colorbar(hb, ax=ax, label="tokens per hexagon (log scale)")
        if ids is not None:
            ax.scatter(x[ids], y[ids], s=5, c=CLUSTER_COLOUR, marker="o", linewidths=0, alpha=0.6,
                       label=f"cluster: {ids.size:,} tokens")
        ax.plot([0], [0], ls="none", marker="+", ms=12, mew=2, color="black", label="centroid")
        ax.set_xlabel(f"PC{a} coordinate (W units)")
        ax.set_ylabel(f"PC{b} coordinate (W units)")
        ax.set_title(f"PC{a} / PC{b} ({pct[a - 1]:.2f} % / {pct[b - 1]:.2f} % of the variance)", fontsize="medium")
        legend = ax.legend(loc="upper right", fontsize="small")
        if ids is not None:  # the cluster's dots, readable in the legend
            handles = getattr(legend, "legend_handles", None) or legend.legendHandles  # the latter: matplotlib < 3.7
            handles[0].set_sizes([30])
    fig.suptitle(_title(frame, f"{coords.shape[0]:,} tokens in the frame's principal planes"))
    return fig
