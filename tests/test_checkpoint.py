"""W straight from Hugging Face style checkpoints: single file, sharded, tied embeddings, --W-key,
and one-line errors for missing or malformed pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
import refframe.inputs as ck
from helpers import make_w, spy_opened_files
from refframe import CheckpointError, InputError, KeyNotFoundError
from refframe.cli import main
from refframe.inputs import load_checkpoint_w, locate

N, D = 800, 24
FRAME = "1.6a_cluster_reference_frame.safetensors"


def lm_head() -> torch.Tensor:
    return make_w(N, D, torch.bfloat16, seed=1, offset_sigmas=5.0)


def embed() -> torch.Tensor:
    return make_w(N, D, torch.bfloat16, seed=2)


def single(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "single") -> Path:
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text('{"tie_word_embeddings": false}')
    return d


def sharded(tmp_path: Path, shards: list[dict[str, torch.Tensor]], name: str = "sharded") -> Path:
    d = tmp_path / name
    d.mkdir()
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, d / fname)
        weight_map.update({k: fname for k in tensors})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return d


def layers() -> dict[str, torch.Tensor]:
    return {"model.layers.0.mlp.up_proj.weight": torch.randn(4 * D, D), "model.norm.weight": torch.ones(D)}


def test_single_file_prefers_lm_head(tmp_path):
    d = single(tmp_path, {"model.embed_tokens.weight": embed(), "lm_head.weight": lm_head(), **layers()})
    W, where = load_checkpoint_w(d)
    assert where.key == "lm_head.weight" and not where.tied and not where.sharded
    assert torch.equal(W, lm_head())
    W2, where2 = load_checkpoint_w(d, "model.embed_tokens.weight")
    assert torch.equal(W2, embed()) and where2.key == "model.embed_tokens.weight"


def test_tied_embeddings(tmp_path):
    d = single(tmp_path, {"model.embed_tokens.weight": embed(), **layers()})
    W, where = load_checkpoint_w(d)
    assert where.key == "model.embed_tokens.weight" and where.tied
    assert torch.equal(W, embed())


def test_prefixed_keys_of_multimodal_models(tmp_path):
    d = single(
        tmp_path, {"language_model.lm_head.weight": lm_head(), "vision.embed.weight": torch.zeros(3, 3)}
    )
    assert locate(d).key == "language_model.lm_head.weight"


def test_sharded_reads_only_the_shard_holding_the_matrix(tmp_path, monkeypatch):
    d = sharded(tmp_path, [{"model.embed_tokens.weight": embed(), **layers()}, {"lm_head.weight": lm_head()}])
    opened = spy_opened_files(monkeypatch)
    W, where = load_checkpoint_w(d)
    assert where.sharded and where.path.name == "model-00002-of-00002.safetensors"
    assert set(opened) == {"model-00002-of-00002.safetensors"}
    assert torch.equal(W, lm_head())
    W, where = load_checkpoint_w(d, "model.embed_tokens.weight")
    assert where.path.name == "model-00001-of-00002.safetensors" and torch.equal(W, embed())


def test_sharded_tied(tmp_path):
    d = sharded(tmp_path, [layers(), {"model.embed_tokens.weight": embed()}])
    W, where = load_checkpoint_w(d)
    assert where.tied and torch.equal(W, embed())


def test_hub_cache_snapshot_name(tmp_path):
    snap = tmp_path / "models--Qwen--Qwen3-4B" / "snapshots"
    snap.mkdir(parents=True)
    d = single(snap, {"lm_head.weight": lm_head()}, name="0123abcd")
    assert locate(d).model_name == "Qwen--Qwen3-4B"
    # the hub's models--ORG--NAME folder itself is not a checkpoint: the error names a snapshot
    with pytest.raises(CheckpointError, match="hub cache folder; give one of its snapshots, e.g. .*0123abcd"):
        locate(tmp_path / "models--Qwen--Qwen3-4B")


@pytest.mark.parametrize(
    "setup, cls, fragment",
    [
        ("missing-shard", CheckpointError, "model-00002-of-00002.safetensors: missing shard"),
        ("bad-json", CheckpointError, "not a valid checkpoint index (not JSON)"),
        ("no-weight-map", CheckpointError, 'no "weight_map"'),
        ("traversal", CheckpointError, "is not a file name in the checkpoint folder"),
        ("key-not-in-shard", KeyNotFoundError, "not found although model.safetensors.index.json puts it"),
        ("no-candidates", KeyNotFoundError, "neither lm_head.weight nor model.embed_tokens.weight"),
        ("w-key-missing", KeyNotFoundError, "key 'nope' not found"),
        ("empty-dir", CheckpointError, "no model.safetensors or model.safetensors.index.json"),
        ("pickle-only", CheckpointError, "only safetensors checkpoints are read"),
        ("not-a-dir", InputError, "not a directory"),
        ("missing-dir", InputError, "checkpoint folder does not exist"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, setup, cls, fragment):
    key = None
    if setup == "missing-shard":
        d = sharded(tmp_path, [layers(), {"lm_head.weight": lm_head()}])
        (d / "model-00002-of-00002.safetensors").unlink()
    elif setup == "bad-json":
        d = sharded(tmp_path, [{"lm_head.weight": lm_head()}])
        (d / "model.safetensors.index.json").write_text("{not json")
    elif setup == "no-weight-map":
        d = sharded(tmp_path, [{"lm_head.weight": lm_head()}])
        (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    elif setup == "traversal":
        d = sharded(tmp_path, [{"lm_head.weight": lm_head()}])
        (d / "model.safetensors.index.json").write_text(
            '{"weight_map": {"lm_head.weight": "../W.safetensors"}}'
        )
    elif setup == "key-not-in-shard":
        d = sharded(tmp_path, [layers(), {"lm_head.weight": lm_head()}])
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    elif setup == "no-candidates":
        d = single(tmp_path, layers())
    elif setup == "w-key-missing":
        d, key = single(tmp_path, {"lm_head.weight": lm_head()}), "nope"
    elif setup == "empty-dir":
        d = tmp_path / "empty"
        d.mkdir()
    elif setup == "pickle-only":
        d = tmp_path / "old"
        d.mkdir()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    elif setup == "not-a-dir":
        d = tmp_path / "file"
        d.write_text("x")
    else:
        d = tmp_path / "nowhere"
    with pytest.raises(cls, match=None) as info:
        locate(d, key)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(5)}, ids)
    argv = ["build", "--checkpoint", str(d), "--cluster", str(ids), "--out-dir", str(tmp_path / "out")]
    capsys.readouterr()
    assert main(argv + (["--W-key", key] if key else [])) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refframe: error: ") and fragment in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_cli_checkpoint_equals_w_file(tmp_path, capsys, layout):
    tensors = {"model.embed_tokens.weight": embed(), "lm_head.weight": lm_head(), **layers()}
    if layout == "single":
        d = single(tmp_path, tensors)
    else:
        d = sharded(tmp_path, [{k: v} for k, v in tensors.items()])
    save_file({"W": lm_head()}, tmp_path / "W.safetensors")
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(2, N, 9)}, ids)
    assert (
        main(["build", "--checkpoint", str(d), "--cluster", str(ids), "--out-dir", str(tmp_path / "out")])
        == 0
    )
    out = capsys.readouterr().out
    assert "(lm_head.weight)" in out
    ref = tmp_path / "ref.safetensors"
    assert (
        main(["build", "--W", str(tmp_path / "W.safetensors"), "--cluster", str(ids), "--out", str(ref)]) == 0
    )
    got, want = load_file(tmp_path / "out" / FRAME), load_file(ref)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    meta = refframe.load_frame(tmp_path / "out" / FRAME).metadata
    assert meta["model_name"] == d.name
    # verify against the checkpoint's matrix
    shard = ck.locate(d).path
    assert (
        main(["verify", str(tmp_path / "out" / FRAME), "--W", str(shard), "--W-key", "lm_head.weight"]) == 0
    )
    # or straight from the checkpoint folder, with the centroid too
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "out" / FRAME), "--checkpoint", str(d), "--cluster", str(ids)]) == 0
    out = capsys.readouterr().out
    assert "(lm_head.weight)" in out and "centroid" in out and "Verification passed" in out
    assert "is the matrix the frame was built from (content hash)" in out
    # a different W of the same shape is caught, and the recorded content hash says why
    other = single(tmp_path, {"lm_head.weight": make_w(N, lm_head().shape[1], torch.float32, seed=7)}, "other")
    assert main(["verify", str(tmp_path / "out" / FRAME), "--checkpoint", str(other)]) == 1
    assert "is not the matrix the frame was built from" in capsys.readouterr().err


def test_cli_checkpoint_needs_cluster_and_output(tmp_path, capsys):
    d = single(tmp_path, {"lm_head.weight": lm_head()})
    assert main(["build", "--checkpoint", str(d), "--out-dir", str(tmp_path / "o")]) == 1
    assert "a checkpoint holds no cluster ids; give --cluster FILE" in capsys.readouterr().err
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(5)}, ids)
    assert main(["build", "--checkpoint", str(d), "--cluster", str(ids)]) == 1
    assert "give --out-dir DIR (or --out FILE)" in capsys.readouterr().err
    assert main(["build", "--model-dir", str(d)]) == 1
    assert f"use --checkpoint {d}" in capsys.readouterr().err


def test_cli_tied_checkpoint_says_so(tmp_path, capsys):
    d = single(tmp_path, {"model.embed_tokens.weight": embed(), **layers()})
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(5)}, ids)
    assert (
        main(
            ["build", "--checkpoint", str(d), "--cluster", str(ids), "--out", str(tmp_path / "f.safetensors")]
        )
        == 0
    )
    assert "tied embeddings" in capsys.readouterr().out


def test_cli_verify_several_frames_against_one_w(tmp_path, capsys):
    d = single(tmp_path, {"lm_head.weight": lm_head()})
    clusters = tmp_path / "clusters.safetensors"
    save_file({"a": torch.arange(0, N, 5), "b": torch.arange(3, N, 17)}, clusters)
    out = tmp_path / "out"
    assert main(["build", "--checkpoint", str(d), "--cluster", str(clusters), "--out-dir", str(out)]) == 0
    frames = sorted(str(p) for p in out.rglob("*.safetensors"))
    assert len(frames) == 2
    for path, name in zip(frames, ("a", "b")):  # each file says where W and its cluster came from
        meta = refframe.load_frame(path).metadata
        assert meta["cluster"] == name
        assert meta["cluster_source"] == f"{clusters}:{name}"
        assert meta["w_source"] == f"{d / 'model.safetensors'}:lm_head.weight"
    capsys.readouterr()
    assert main(["verify", *frames, "--checkpoint", str(d)]) == 0
    text = capsys.readouterr().out
    assert text.count("Verifying ") == 2 and "Verification passed (2 files)" in text
    assert main(["verify", *frames, "--checkpoint", str(d), "--cluster", str(clusters)]) == 1
    assert "give one frame file with it" in capsys.readouterr().err
    assert main(["verify", frames[0], "--checkpoint", str(d), "--W", frames[1]]) == 1
    assert "give W once" in capsys.readouterr().err
