"""Figures of a frame: refframe.plot's three figures (axes, labels, titles, the cluster overlay, the
numbers drawn), and `refframe plot` (PNG files, spectrum only without W, the W check, bad input,
matplotlib missing)."""

from __future__ import annotations

import importlib.util
import io
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import refframe
from helpers import assert_one_line_error, built_model, cli, make_w
from refframe import DependencyError, InputError
from refframe.cli import main

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "plotting needs matplotlib: pip install 'refframe[plot]'"


@pytest.fixture(scope="module")
def toy():
    W = make_w(3000, 12, torch.float32, offset_sigmas=5.0)
    ids = torch.arange(0, 3000, 37)
    frame = refframe.build_frame(W, ids, backend="torch")
    frame.metadata.update(model_name="toy-model", cluster="animals")
    return W, ids, frame


def texts(fig) -> list[str]:
    """Every piece of text in the figure: titles, labels, tick labels, legends, annotations."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


# ---------------------------------------------------------------------------------------------
# refframe.plot


@needs_mpl
def test_spectrum_log_scale_labels_and_marks(toy):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from refframe import plot

    _, _, frame = toy
    pyplot_before = "matplotlib.pyplot" in sys.modules
    fig = plot.spectrum(frame)
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    ax, twin = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert ax.get_ylabel() == "eigenvalue (variance, W units²)"
    assert twin.get_ylabel() == "cumulative explained variance (%)"
    assert "PC number" in ax.get_xlabel()
    title = ax.get_title()
    assert "toy-model" in title and "cluster animals (82 tokens)" in title and "eigenvalue spectrum" in title
    line = ax.get_lines()[0]
    assert line.get_xdata().tolist() == list(range(1, 13))
    np.testing.assert_allclose(line.get_ydata(), frame.eigenvalues.double().numpy())
    cum = twin.get_lines()[0].get_ydata()
    assert cum[-1] == pytest.approx(100.0)
    # d = 12: the 10-PC mark, none at 100 (variance_report's rule: only counts below d)
    share = frame.variance_report().cumulative[10]
    assert f"10 PCs: {share:.1f} %" in texts(fig)
    assert not any(t.startswith("100 PCs") for t in texts(fig))
    assert legend_texts(ax) == ["eigenvalue", "cumulative explained variance"]
    if not pyplot_before:  # drawn without pyplot: the user's backend and figure list stay as they were
        assert "matplotlib.pyplot" not in sys.modules


def fake_frame(eigenvalues: list[float]) -> refframe.Frame:
    d = len(eigenvalues)
    return refframe.Frame(
        centroid=torch.zeros(d),
        eigenvalues=torch.tensor(eigenvalues),
        eigenvectors=torch.eye(d),
        mean=None,
        n_tokens=10,
        cluster_size=3,
    )


@needs_mpl
def test_spectrum_leaves_out_zero_and_negative_eigenvalues():
    from refframe import plot

    fig = plot.spectrum(fake_frame([3.0, 2.0, 1.0, 0.0, -1e-9]))
    ax = fig.axes[0]
    assert ax.get_lines()[0].get_xdata().tolist() == [1, 2, 3]
    assert "2 zero or negative eigenvalue(s): not drawn on the log scale" in texts(fig)
    assert "unnamed model, cluster of 3 tokens" in ax.get_title()
    fig = plot.spectrum(fake_frame([0.0, 0.0]))
    assert fig.axes[0].get_lines()[0].get_xdata().size == 0
    assert "no eigenvalue is positive: not drawn on the log scale" in texts(fig)
    plot.to_png(fig, dpi=30)  # still renders


@needs_mpl
def test_radial_profile_density_and_cluster(toy):
    from refframe import plot

    W, ids, frame = toy
    r = refframe.radii(W, frame).double().numpy()
    fig = plot.radial_profile(W, frame, ids, bins=50)
    ax, twin = fig.axes
    assert ax.get_xlabel() == "distance to centroid (W units)"
    assert ax.get_ylabel() == "density, all tokens (per W unit)"
    assert twin.get_ylabel() == "density, cluster tokens (per W unit)"
    assert "toy-model" in ax.get_title() and "animals" in ax.get_title() and "distances" in ax.get_title()
    # one filled histogram of every token, one step histogram of the cluster, each of area 1
    (all_patch,) = ax.patches
    (cluster_patch,) = twin.patches
    for patch in (all_patch, cluster_patch):
        xy = patch.get_xy()
        area = np.sum(np.diff(xy[:, 0]) * xy[:-1, 1] * (np.diff(xy[:, 0]) > 0))
        assert area == pytest.approx(1.0, rel=1e-6)
    # the rug: one tick per cluster token, at its distance
    (rug,) = [line for line in ax.get_lines() if line.get_marker() == "|"]
    np.testing.assert_allclose(rug.get_xdata(), r[ids.numpy()])
    assert legend_texts(ax) == [
        f"all 3,000 tokens (median {np.median(r):.3g})",
        f"cluster: 82 tokens (median {np.median(r[ids.numpy()]):.3g})",
    ]
    fig = plot.radial_profile(W, frame)  # no ids: the tokens only
    assert len(fig.axes) == 1 and len(fig.axes[0].patches) == 1 and not fig.axes[0].get_lines()


@needs_mpl
def test_planes_hexbin_cluster_overlay_and_labels(toy):
    from matplotlib.collections import PathCollection, PolyCollection

    from refframe import plot

    W, ids, frame = toy
    coords = refframe.project(W, frame, 3).numpy()
    fig = plot.planes(W, frame, ids)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 2 and len(colorbars) == 2
    assert all(cb.get_ylabel() == "tokens per hexagon (log scale)" for cb in colorbars)
    suptitle = fig.get_suptitle()
    assert "toy-model" in suptitle and "animals" in suptitle and "3,000 tokens" in suptitle
    for ax, (a, b) in zip(panels, [(1, 2), (1, 3)]):
        assert ax.get_xlabel() == f"PC{a} coordinate (W units)"
        assert ax.get_ylabel() == f"PC{b} coordinate (W units)"
        assert ax.get_title().startswith(f"PC{a} / PC{b} (")
        (hexbin,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert hexbin.get_array().sum() == 3000  # every token in some hexagon, log colours
        assert type(hexbin.norm).__name__ == "LogNorm"
        (overlay,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        np.testing.assert_allclose(overlay.get_offsets(), coords[ids.numpy()][:, [a - 1, b - 1]], rtol=1e-6)
        assert legend_texts(ax) == ["cluster: 82 tokens", "centroid"]
    fig = plot.planes(W, frame, axes=[(2, 3)])  # one plane, no cluster
    (ax,) = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert ax.get_xlabel() == "PC2 coordinate (W units)" and ax.get_ylabel() == "PC3 coordinate (W units)"
    assert not [c for c in ax.collections if isinstance(c, PathCollection)]


@needs_mpl
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, W, f, i: p.planes(W, f, axes=((1, 13),)), "axes must be pairs of PC numbers from 1 to d = 12"),
        (lambda p, W, f, i: p.planes(W, f, axes=((2, 2),)), "axes must be pairs of PC numbers"),
        (lambda p, W, f, i: p.planes(W, f, axes=()), "axes must be pairs of PC numbers"),
        (lambda p, W, f, i: p.planes(W, f, axes=3), "axes must be pairs of PC numbers"),
        (lambda p, W, f, i: p.planes(W, f, torch.tensor([3000])), "cluster_ids: 1 id(s) outside [0, 3000)"),
        (lambda p, W, f, i: p.planes(W[:, :5], f), "W has d = 5 columns, the frame has d = 12"),
        (lambda p, W, f, i: p.radial_profile(W, f, i, bins=0), "bins must be a positive integer"),
        (lambda p, W, f, i: p.radial_profile(W, "frame.safetensors"), "frame must be a refframe.Frame"),
        (lambda p, W, f, i: p.spectrum(W), "spectrum: frame must be a refframe.Frame"),
    ],
)
def test_bad_input_is_one_line(toy, call, message):
    from refframe import plot

    W, ids, frame = toy
    with pytest.raises(InputError) as info:
        call(plot, W, frame, ids)
    assert message in str(info.value) and "\n" not in str(info.value)


@needs_mpl
def test_planes_at_a_realistic_size():
    """150,000 tokens: hexbin keeps the figure light (a few seconds on a 2-core machine)."""
    from refframe import plot

    W = make_w(150_000, 64, torch.float32, seed=3)
    ids = torch.arange(0, 150_000, 68)
    frame = refframe.build_frame(W, ids, backend="torch")
    t0 = time.perf_counter()
    png = plot.to_png(plot.planes(W, frame, ids), dpi=100)
    elapsed = time.perf_counter() - t0
    assert png.startswith(PNG_SIGNATURE) and len(png) < 2_000_000
    assert elapsed < 30, f"planes took {elapsed:.1f} s"


def test_missing_matplotlib_is_one_clear_error(toy, monkeypatch):
    from refframe import plot

    W, ids, frame = toy
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now fails as if not installed
    for call in (lambda: plot.spectrum(frame), lambda: plot.radial_profile(W, frame), lambda: plot.planes(W, frame)):
        with pytest.raises(DependencyError) as info:
            call()
        assert str(info.value) == MISSING
    assert issubclass(DependencyError, refframe.RefframeError)


# ---------------------------------------------------------------------------------------------
# refframe plot


@pytest.fixture
def built(tmp_path):
    return built_model(tmp_path, 2000, 16, 9)


def read_png(path) -> np.ndarray:
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


@needs_mpl
def test_cli_plot_writes_three_pngs(built, tmp_path, capsys):
    out = tmp_path / "figures" / "new"  # created, parents too
    capsys.readouterr()
    rc = main(["plot", str(built["frame"]), "--model-dir", str(built["model"]), "--out-dir", str(out), "--dpi", "50"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert f"cluster: 223 tokens from {built['model'] / '1.4h_cluster_tokens.safetensors'}" in stdout
    for name in ("spectrum.png", "radial_profile.png", "planes.png"):
        assert f"✓ Wrote {out / name} (" in stdout
        image = read_png(out / name)
        assert image.ndim == 3 and image.shape[0] > 100
    assert read_png(out / "spectrum.png").shape[:2] == (250, 400)  # 8 x 5 inches at --dpi 50
    assert sorted(p.name for p in out.iterdir()) == ["planes.png", "radial_profile.png", "spectrum.png"]


@needs_mpl
def test_cli_plot_without_w_draws_the_spectrum_only(built, tmp_path, capsys):
    out = tmp_path / "figures"
    capsys.readouterr()
    rc = main(["plot", str(built["frame"]), "--out-dir", str(out), "--cluster", str(built["model"] / "1.4h_cluster_tokens.safetensors")])
    stdout, stderr = capsys.readouterr()
    assert rc == 0 and stderr == ""
    only = [line for line in stdout.splitlines() if line.startswith("no W given")]
    assert only == [
        "no W given: only the spectrum can be drawn (radial_profile.png and planes.png need W: --W FILE, "
        "--model-dir DIR or --checkpoint DIR); --cluster is not used without W"
    ]
    assert [p.name for p in out.iterdir()] == ["spectrum.png"]
    read_png(out / "spectrum.png")


@needs_mpl
def test_cli_plot_w_file_without_cluster_and_replacing_earlier_figures(built, tmp_path, capsys):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "planes.png").write_bytes(b"old")
    capsys.readouterr()
    rc = main(["plot", str(built["frame"]), "--W", str(built["model"] / "W.safetensors"), "--out-dir", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0 and "no cluster ids (--cluster FILE): the cluster is not marked" in stdout
    read_png(out / "planes.png")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@needs_mpl
def test_cli_plot_refuses_another_w_unless_allowed(built, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"W": make_w(2000, 16, torch.bfloat16, seed=9)}, other)
    out = tmp_path / "figures"
    args = ["plot", str(built["frame"]), "--W", str(other), "--out-dir", str(out)]
    rc, err = cli(capsys, *args)
    assert_one_line_error(rc, err, "is not the matrix", "pass --allow-other-w to plot it anyway")
    assert not out.exists()
    rc, err = cli(capsys, *args, "--allow-other-w")
    assert rc == 0 and err.startswith("refframe: warning: ") and "is not the matrix" in err
    assert sorted(p.name for p in out.iterdir()) == ["planes.png", "radial_profile.png", "spectrum.png"]


@needs_mpl
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dpi", "0"], "--dpi must be from 10 to 1200, got 0"),
        (["--W", "{model}/nope.safetensors"], "nope.safetensors: no such file"),
        (["--W", "{tmp}/narrow.safetensors"], "has d = 8 columns, the frame"),
        (["--W", "{model}/W.safetensors", "--checkpoint", "{model}"], "give W once"),
        (["--model-dir", "{model}", "--cluster", "{tmp}/bad_ids.safetensors"], "1 id(s) outside [0, 2000)"),
        (["--model-dir", "{model}", "--cluster-key", "nope"], "key 'nope' not found"),
        (["--out-dir", "{model}/W.safetensors"], "output directory is not a directory"),
    ],
)
def test_cli_plot_bad_input_is_one_line(built, tmp_path, capsys, extra, message):
    save_file({"W": make_w(50, 8, torch.float32)}, tmp_path / "narrow.safetensors")
    save_file({"cluster_token_ids": torch.tensor([1, 2000])}, tmp_path / "bad_ids.safetensors")
    args = [a.format(model=built["model"], tmp=tmp_path) for a in extra]
    if "--out-dir" not in args:
        args += ["--out-dir", str(tmp_path / "figures")]
    rc, err = cli(capsys, "plot", str(built["frame"]), *args)
    assert_one_line_error(rc, err, message)
    assert not (tmp_path / "figures").exists()


@needs_mpl
def test_cli_plot_checks_outputs_and_the_frame_first(built, tmp_path, capsys):
    out = tmp_path / "figures"
    (out / "spectrum.png").mkdir(parents=True)  # an output path that is a folder
    rc, err = cli(capsys, "plot", str(built["frame"]), "--out-dir", str(out))
    assert_one_line_error(rc, err, "spectrum.png: output path is a directory")
    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(built["frame"].read_bytes())
    raw[-3] ^= 1  # one bit of the eigenvectors
    damaged.write_bytes(bytes(raw))
    rc, err = cli(capsys, "plot", str(damaged), "--out-dir", str(tmp_path / "other"))
    assert_one_line_error(rc, err, "does not match the checksum")
    assert not (tmp_path / "other").exists()
    w_copy = tmp_path / "inputs" / "planes.png"  # W in a file an output would replace
    w_copy.parent.mkdir()
    w_copy.write_bytes((built["model"] / "W.safetensors").read_bytes())
    rc, err = cli(capsys, "plot", str(built["frame"]), "--W", str(w_copy), "--out-dir", str(w_copy.parent))
    assert_one_line_error(rc, err, "planes.png: output path is the input file")
    assert sorted(p.name for p in w_copy.parent.iterdir()) == ["planes.png"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["plot", str(built["frame"])])  # --out-dir is required
    assert info.value.code == 2 and "--out-dir" in capsys.readouterr().err


def test_cli_plot_without_matplotlib_is_one_line(built, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "figures"
    rc, err = cli(capsys, "plot", str(built["frame"]), "--model-dir", str(built["model"]), "--out-dir", str(out))
    assert_one_line_error(rc, err, MISSING)
    assert not out.exists()
