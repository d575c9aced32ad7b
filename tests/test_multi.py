"""Many clusters from one PCA (one segment-mean call), several models in one command, file naming,
the zero-copy frame writer and the progress display."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
import refframe.build as multi
from helpers import DTYPES, make_w, needs_native
from refframe import ops
from refframe.cli import main
from refframe.progress import Progress
from refframe.tensorfile import save_tensors

N, D = 1200, 32
FRAME = "1.6a_cluster_reference_frame.safetensors"


def clusters() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "one": torch.tensor([17]),
        "small": torch.tensor([3, 4, 5, 900]),
        "random": torch.randperm(N, generator=g)[:300],
        "all": torch.arange(N),
        "dups": torch.tensor([7, 7, 8]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_segment_centroids_equal_per_cluster_gather(dtype, backend):
    W = make_w(N, D, dtype, offset_sigmas=20.0)
    cs = list(clusters().values())
    got = multi.segment_centroids(W, cs, backend=backend)
    assert got.shape == (len(cs), D) and got.dtype == torch.float32
    for i, ids in enumerate(cs):
        assert torch.equal(got[i], ops.gather_mean(W, ids, backend=backend))
    ref = multi.segment_centroids(W, cs, backend="torch")  # reference.segment_mean
    want = torch.stack([W.double()[ids].mean(0) for ids in cs])
    assert (got.double() - want).abs().max() < 1e-6
    assert (ref.double() - want).abs().max() < 1e-5


def test_segment_centroids_one_call(monkeypatch):
    W = make_w(N, D, torch.float32)
    calls = []
    real = ops.segment_mean
    monkeypatch.setattr(ops, "segment_mean", lambda *a, **k: calls.append(a[2].tolist()) or real(*a, **k))
    multi.segment_centroids(W, [torch.arange(3), torch.arange(5), torch.tensor([1])])
    assert calls == [[0, 3, 8, 9]]


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_build_frames_equal_single_builds(backend):
    W = make_w(N, D, torch.bfloat16, offset_sigmas=10.0)
    with pytest.warns(refframe.RefframeWarning, match="cluster 'dups': 1 duplicate"):
        frames = refframe.build_frames(W, clusters(), backend=backend, device="cpu", use_cache=False)
    assert list(frames) == list(clusters())
    for name, ids in clusters().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", refframe.RefframeWarning)  # duplicate ids, reported above
            one = refframe.build_frame(W, ids, backend=backend, device="cpu")
        f = frames[name]
        assert torch.equal(f.centroid, one.centroid), name
        assert torch.equal(f.eigenvalues, one.eigenvalues)
        assert torch.equal(f.eigenvectors, one.eigenvectors)
        assert f.cluster_size == ids.numel() and f.metadata["pca_cache"] == "off"


def test_build_frames_list_and_single_ids():
    W = make_w(N, D, torch.float32)
    frames = refframe.build_frames(W, [torch.arange(4), torch.arange(9)], use_cache=False)
    assert list(frames) == ["0", "1"]
    with pytest.raises(refframe.ClusterIdsError, match="cluster '1'"):
        refframe.build_frames(W, [torch.arange(4), torch.tensor([N])], use_cache=False)


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "Model-A"
    d.mkdir()
    save_file({"W": make_w(N, D, torch.bfloat16, offset_sigmas=10.0)}, d / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(5, N, 17)}, d / "1.4h_cluster_tokens.safetensors")
    return d


def ids_file(path: Path, **tensors: torch.Tensor) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def single_build(model: Path, ids: torch.Tensor, out: Path) -> dict[str, torch.Tensor]:
    p = ids_file(out.with_suffix(".ids.safetensors"), cluster_token_ids=ids)
    assert main(["build", "--W", str(model / "W.safetensors"), "--cluster", str(p), "--out", str(out)]) == 0
    return load_file(out)


def test_cli_several_cluster_files(model, tmp_path, capsys):
    a = ids_file(tmp_path / "animals.safetensors", cluster_token_ids=torch.arange(0, 100))
    b = ids_file(tmp_path / "colours.safetensors", ids=torch.tensor([5, 50, 500], dtype=torch.int32))
    out = tmp_path / "frames"
    assert main(["build", "--model-dir", str(model), "--cluster", str(a), str(b), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 clusters" in text and "✓ Cluster animals" in text and "✓ Cluster colours" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "1.6a_cluster_reference_frame.animals.safetensors",
        "1.6a_cluster_reference_frame.colours.safetensors",
    ]
    for name, ids in (("animals", torch.arange(0, 100)), ("colours", torch.tensor([5, 50, 500]))):
        got = load_file(out / f"1.6a_cluster_reference_frame.{name}.safetensors")
        want = single_build(model, ids, tmp_path / f"single-{name}.safetensors")
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
        f = out / f"1.6a_cluster_reference_frame.{name}.safetensors"
        src = a if name == "animals" else b
        assert main(["verify", str(f), "--W", str(model / "W.safetensors"), "--cluster", str(src)]) == 0
        assert refframe.load_frame(f).metadata["model_name"] == "Model-A"


def test_cli_one_file_with_named_clusters_defaults_to_model_dir(model, tmp_path, capsys):
    many = ids_file(
        model / "1.4h_cluster_tokens.safetensors",
        animals=torch.arange(10),
        colours=torch.arange(20, 40),
        **{"odd name/1": torch.tensor([1, 3])},
    )
    assert main(["build", "--model-dir", str(model)]) == 0
    names = sorted(p.name for p in model.glob("1.6a_*"))
    assert names == [
        "1.6a_cluster_reference_frame.animals.safetensors",
        "1.6a_cluster_reference_frame.colours.safetensors",
        "1.6a_cluster_reference_frame.odd_name_1.safetensors",
    ]
    got = load_file(model / "1.6a_cluster_reference_frame.colours.safetensors")
    want = single_build(model, torch.arange(20, 40), tmp_path / "c.safetensors")
    assert torch.equal(got["cluster_centroid"], want["cluster_centroid"])
    # --cluster-key picks one tensor of each file: back to one cluster and the seed's file name
    assert main(["build", "--model-dir", str(model), "--cluster", str(many), "--cluster-key", "animals"]) == 0
    assert (model / FRAME).exists()


def test_cli_multi_cluster_errors(model, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = ids_file(tmp_path / "x" / "same.safetensors", ids=torch.arange(3))
    b = ids_file(tmp_path / "y" / "same.safetensors", ids=torch.arange(4))
    capsys.readouterr()
    assert main(["build", "--model-dir", str(model), "--cluster", str(a), str(b)]) == 1
    assert "two clusters are named 'same'" in capsys.readouterr().err
    c = ids_file(tmp_path / "c.safetensors", ids=torch.arange(3))
    assert (
        main(
            [
                "build",
                "--model-dir",
                str(model),
                "--cluster",
                str(a),
                str(c),
                "--out",
                str(tmp_path / "f.safetensors"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "--out names one file, but there are 2 clusters" in err and "--out-dir" in err
    assert main(["build", "--W", str(model / "W.safetensors"), "--cluster", str(a), str(c)]) == 1
    assert "no output path" in capsys.readouterr().err


def test_cli_several_models(model, tmp_path, capsys):
    other = tmp_path / "Model-B"
    other.mkdir()
    save_file({"W": make_w(N + 10, D, torch.float32, seed=9)}, other / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(0, N, 3)}, other / "1.4h_cluster_tokens.safetensors")
    assert main(["build", "--model-dir", str(model), str(other)]) == 0
    text = capsys.readouterr().out
    assert "== Model 1/2: Model-A ==" in text and "== Model 2/2: Model-B ==" in text
    a, b = load_file(model / FRAME), load_file(other / FRAME)
    assert not torch.equal(a["W_eigenvalues"], b["W_eigenvalues"])
    out = tmp_path / "all"
    assert main(["build", "--model-dir", str(model), "--model-dir", str(other), "--out-dir", str(out)]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors")) == [
        f"Model-A/{FRAME}",
        f"Model-B/{FRAME}",
    ]
    for name, ref in (("Model-A", a), ("Model-B", b)):
        got = load_file(out / name / FRAME)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    capsys.readouterr()
    assert (
        main(["build", "--model-dir", str(model), str(other), "--out", str(tmp_path / "f.safetensors")]) == 1
    )
    assert "--out names one file, but 2 models are given" in capsys.readouterr().err
    assert main(["build", "--model-dir", str(model), str(model), "--out-dir", str(out)]) == 1
    assert "two models are both named 'Model-A'" in capsys.readouterr().err
    assert main(["build", "--model-dir", str(model), str(model)]) == 1
    assert "same file" in capsys.readouterr().err


def test_several_models_checked_before_any_work(model, tmp_path, capsys, monkeypatch):
    broken = tmp_path / "Broken"
    broken.mkdir()
    save_file({"W": make_w(50, D, torch.float32)}, broken / "W.safetensors")
    save_file({"cluster_token_ids": torch.tensor([49, 50])}, broken / "1.4h_cluster_tokens.safetensors")

    def no_work(*a, **k):
        raise AssertionError("no model may be built while another one's input is bad")

    monkeypatch.setattr(ops, "covariance", no_work)
    assert main(["build", "--model-dir", str(model), str(broken)]) == 1
    assert "1 id(s) outside [0, 50)" in capsys.readouterr().err
    assert not (model / FRAME).exists()


# ---------------------------------------------------------------------------------------------
# writer and progress


def test_nocopy_writer_matches_safetensors(tmp_path):
    t = {
        "b": torch.randn(5, 3),
        "a": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(4, 4).to(torch.bfloat16).T,  # non-contiguous
        "e": torch.zeros(0),
    }
    p = tmp_path / "x.safetensors"
    save_tensors(p, t, {"k": "v"})
    got = load_file(p)
    assert sorted(got) == sorted(t)
    for k in t:
        assert torch.equal(got[k], t[k].contiguous()), k
    f = refframe.tensorfile.SafetensorsFile(p)
    assert f.metadata == {"k": "v"} and f.data_offset % 8 == 0


def test_progress_quiet_when_not_a_terminal(model, tmp_path, capsys):
    assert not Progress().enabled  # pytest's captured stdout is not a terminal
    assert main(["build", "--model-dir", str(model)]) == 0
    assert "\r" not in capsys.readouterr().out


def test_progress_draws_and_erases(monkeypatch):
    buf = io.StringIO()
    p = Progress(buf, enable=True, interval=0.01)
    state = {"x": "covariance"}
    with p.stage(lambda: state["x"]) as st:
        st.update(50, 100)
        state["x"] = "eigendecomposition"
        time.sleep(0.05)
    text = buf.getvalue()
    assert "covariance" in text and "50.0%" in text and "eigendecomposition" in text
    assert text.endswith("\r")  # the line is erased at the end
    monkeypatch.setenv("REFFRAME_PROGRESS", "0")
    assert not Progress(io.StringIO()).enabled
    monkeypatch.setenv("REFFRAME_PROGRESS", "1")
    assert Progress(io.StringIO()).enabled


def test_progress_follows_frame_writes(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REFFRAME_PROGRESS", "1")
    files = [str(ids_file(tmp_path / f"c{k}.safetensors", cluster_token_ids=torch.arange(k, N, 9))) for k in range(5)]
    assert main(["build", "--model-dir", str(model), "--cluster", *files, "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "writing 5 frames (" in out and "100.0%" in out
    assert len(list((tmp_path / "o").iterdir())) == 5


def test_progress_bar_from_a_poll():
    buf = io.StringIO()
    p = Progress(buf, enable=True, interval=0.01)
    state = {"p": (30, 60)}
    with p.stage("covariance", lambda: state["p"]):
        time.sleep(0.05)
        state["p"] = None  # the native call ended: back to a spinner
        time.sleep(0.05)
    lines = [x for x in buf.getvalue().split("\r") if x.strip()]
    assert "  covariance [############............]  50.0%" in "\n".join(lines)
    assert "%" not in lines[-1] and "covariance" in lines[-1]  # spinner again


def test_frame_path_naming(tmp_path):
    assert multi.frame_path(tmp_path, None) == tmp_path / FRAME
    assert (
        multi.frame_path(tmp_path, "animals") == tmp_path / "1.6a_cluster_reference_frame.animals.safetensors"
    )
    from refframe.inputs import cluster_name

    assert cluster_name("a b/c") == "a_b_c" and cluster_name("..") == "cluster"
