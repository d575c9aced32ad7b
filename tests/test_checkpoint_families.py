"""W found without --W-key in the checkpoints of each model family: the unembedding by default, the
embedding with --matrix embedding, the family from config.json or from the key names, with and
without the prefix save_pretrained writes, and the report saying which key and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import refframe
from helpers import assert_one_line_error, cli, make_w, spy_opened_files
from refframe import InputError, KeyNotFoundError, RefframeWarning
from refframe.families import FAMILIES
from refframe.inputs import load_checkpoint_w, locate

N, D = 96, 12
UNEMBEDDING = make_w(N, D, torch.float32, seed=11, offset_sigmas=4.0)
EMBEDDING = make_w(N, D, torch.float32, seed=12)


def checkpoint(
    tmp_path: Path,
    unembedding: str | None,
    embedding: str | None,
    config: dict | None = None,
    other: tuple[str, ...] = ("layers.0.mlp.weight",),
    shards: int = 1,
    name: str = "ck",
) -> Path:
    """A tiny checkpoint in a family's key layout: the two matrices (either may be absent) and a few
    other tensors, in one model.safetensors or `shards` files with model.safetensors.index.json."""
    d = tmp_path / name
    d.mkdir()
    tensors = {k: torch.randn(2 * D, D) for k in other}
    if unembedding:
        tensors[unembedding] = UNEMBEDDING
    if embedding:
        tensors[embedding] = EMBEDDING
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, d / "model.safetensors")
        return d
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


# (case, unembedding key, embedding key, config.json, other keys, the report's reason for the unembedding)
CASES = [
    ("llama", "lm_head.weight", "model.embed_tokens.weight", {"model_type": "llama", "tie_word_embeddings": False},
     ("model.layers.0.mlp.up_proj.weight",), "llama checkpoint (config.json model_type), the unembedding"),
    ("mistral-no-config", "lm_head.weight", "model.embed_tokens.weight", None,
     ("model.layers.0.mlp.up_proj.weight",), "llama layout (from the key names), the unembedding"),
    ("qwen3-tied", None, "model.embed_tokens.weight", {"model_type": "qwen3", "tie_word_embeddings": True},
     ("model.norm.weight",), "qwen3 checkpoint (config.json model_type), tied embeddings: the unembedding is the embedding"),
    ("gemma", None, "model.embed_tokens.weight", {"model_type": "gemma2"},
     ("model.norm.weight",), "gemma2 checkpoint (config.json model_type), tied embeddings: the unembedding is the embedding"),
    ("llama-base-no-prefix", None, "embed_tokens.weight", None,
     ("layers.0.mlp.up_proj.weight",), "llama layout (from the key names), tied embeddings: the checkpoint has no lm_head.weight"),
    ("gpt2", None, "transformer.wte.weight", {"model_type": "gpt2"},
     ("transformer.h.0.attn.c_attn.weight", "transformer.wpe.weight"),
     "gpt2 checkpoint (config.json model_type), tied embeddings: the unembedding is the embedding"),
    ("gpt2-no-prefix", None, "wte.weight", None, ("h.0.attn.c_attn.weight", "wpe.weight"),
     "gpt2 layout (from the key names), tied embeddings: the unembedding is the embedding"),
    ("gpt2-architectures", None, "transformer.wte.weight", {"architectures": ["GPT2LMHeadModel"]},
     ("transformer.wpe.weight",),
     "gpt2 checkpoint (config.json architectures: 'GPT2LMHeadModel'), tied embeddings: the unembedding is the embedding"),
    ("pythia", "embed_out.weight", "gpt_neox.embed_in.weight", {"model_type": "gpt_neox", "tie_word_embeddings": False},
     ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight",), "gpt_neox checkpoint (config.json model_type), the unembedding"),
    ("pythia-no-config", "embed_out.weight", "gpt_neox.embed_in.weight", None,
     ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight",), "gpt_neox layout (from the key names), the unembedding"),
    ("opt", "lm_head.weight", "model.decoder.embed_tokens.weight", {"model_type": "opt"},
     ("model.decoder.layers.0.fc1.weight",), "opt checkpoint (config.json model_type), the unembedding"),
    ("opt-tied-no-prefix", None, "decoder.embed_tokens.weight", None,
     ("decoder.layers.0.fc1.weight", "decoder.embed_positions.weight"),
     "opt layout (from the key names), tied embeddings: the unembedding is the embedding"),
    ("phi", "lm_head.weight", "model.embed_tokens.weight", {"model_type": "phi"},
     ("model.layers.0.mlp.fc1.weight",), "phi checkpoint (config.json model_type), the unembedding"),
    ("phi-msft", "lm_head.linear.weight", "transformer.embd.wte.weight", {"model_type": "phi-msft"},
     ("transformer.h.0.mlp.fc1.weight",), "phi-msft checkpoint (config.json model_type), the unembedding"),
    ("phi-old-no-config", "lm_head.linear.weight", "transformer.embd.wte.weight", None,
     ("transformer.h.0.mlp.fc1.weight",), "phi layout (from the key names), the unembedding"),
    ("olmo-ai2-untied", "model.transformer.ff_out.weight", "model.transformer.wte.weight",
     {"model_type": "hf_olmo", "weight_tying": False}, ("model.transformer.blocks.0.ff_proj.weight",),
     "hf_olmo checkpoint (config.json model_type), the unembedding"),
    ("olmo-ai2-tied", None, "model.transformer.wte.weight", {"model_type": "hf_olmo", "weight_tying": True},
     ("model.transformer.blocks.0.ff_proj.weight",),
     "hf_olmo checkpoint (config.json model_type), tied embeddings: the unembedding is the embedding"),
    ("olmo-no-config", "model.transformer.ff_out.weight", "model.transformer.wte.weight", None,
     ("model.transformer.blocks.0.ff_proj.weight",), "olmo layout (from the key names), the unembedding"),
    ("olmo2-llama-layout", "lm_head.weight", "model.embed_tokens.weight", {"model_type": "olmo2"},
     ("model.layers.0.mlp.up_proj.weight",), "olmo2 checkpoint (config.json model_type), the unembedding"),
    ("t5-tied", None, "shared.weight", {"model_type": "t5"},
     ("encoder.block.0.layer.0.SelfAttention.q.weight",),
     "t5 checkpoint (config.json model_type), tied embeddings: the unembedding is the embedding"),
    ("flan-t5-untied", "lm_head.weight", "shared.weight", {"model_type": "t5", "tie_word_embeddings": False},
     ("encoder.block.0.layer.0.SelfAttention.q.weight",), "t5 checkpoint (config.json model_type), the unembedding"),
    ("t5-encoder-no-config", None, "encoder.embed_tokens.weight", None,
     ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"),
     "t5 layout (from the key names), tied embeddings: the unembedding is the embedding"),
    ("bert", None, "bert.embeddings.word_embeddings.weight", {"model_type": "bert"},
     ("bert.encoder.layer.0.output.dense.weight",),
     "bert checkpoint (config.json model_type), tied embeddings: an encoder's only token matrix is its embedding"),
    ("bert-no-prefix", None, "embeddings.word_embeddings.weight", None, ("encoder.layer.0.output.dense.weight",),
     "bert layout (from the key names), tied embeddings: an encoder's only token matrix is its embedding"),
    ("roberta", None, "roberta.embeddings.word_embeddings.weight", None,
     ("roberta.encoder.layer.0.output.dense.weight",),
     "bert layout (from the key names), tied embeddings: an encoder's only token matrix is its embedding"),
    ("electra", None, "electra.embeddings.word_embeddings.weight", {"model_type": "electra"},
     ("electra.encoder.layer.0.output.dense.weight",),
     "electra checkpoint (config.json model_type), tied embeddings: an encoder's only token matrix is its embedding"),
    ("multimodal-text-config", "language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
     {"model_type": "llava", "text_config": {"model_type": "llama"}}, ("vision_tower.patch_embed.weight",),
     "llama language model (config.json text_config), the unembedding"),
]


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("case, head, embed, config, other, reason", CASES, ids=[c[0] for c in CASES])
def test_family_keys_found(tmp_path, case, head, embed, config, other, reason, shards):
    d = checkpoint(tmp_path, head, embed, config, other, shards=shards)
    W, where = load_checkpoint_w(d)
    assert where.key == (head or embed)
    assert where.tied == (head is None)
    assert where.reason == reason
    assert where.sharded == (shards > 1)
    assert torch.equal(W, UNEMBEDDING if head else EMBEDDING)
    W, where = load_checkpoint_w(d, matrix="embedding")
    assert where.key == embed and not where.tied and torch.equal(W, EMBEDDING)
    assert where.reason == reason.split(", ")[0] + ", the embedding (--matrix embedding)"
    # --W-key overrides the choice
    W, where = load_checkpoint_w(d, other[0], matrix="embedding")
    assert where.key == other[0] and where.reason == "chosen with --W-key" and where.family == ""


def test_every_family_has_a_case():
    def family_of(word: str) -> str | None:  # a reason starts with a model_type or a family's name
        return next((f.name for f in FAMILIES if word == f.name or word in f.model_types), None)

    assert {family_of(c[5].split(" ")[0]) for c in CASES} == {f.name for f in FAMILIES}


def test_sharded_family_reads_only_the_shard_holding_the_matrix(tmp_path, monkeypatch):
    d = checkpoint(
        tmp_path, "embed_out.weight", "gpt_neox.embed_in.weight", None, ("gpt_neox.final_layer_norm.weight",), shards=3
    )
    opened = spy_opened_files(monkeypatch)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    for matrix, key in (("unembedding", "embed_out.weight"), ("embedding", "gpt_neox.embed_in.weight")):
        opened.clear()
        _, where = load_checkpoint_w(d, matrix=matrix)
        assert where.key == key and where.path.name == index[key]
        assert set(opened) == {index[key]}  # the header of that one shard only


def test_untied_encoder_has_no_unembedding(tmp_path):
    # a T5 encoder saved from an untied model (flan-t5's T5EncoderModel): the embedding is not the unembedding
    config = {"model_type": "t5", "tie_word_embeddings": False}
    d = checkpoint(tmp_path, None, "shared.weight", config, ("encoder.embed_tokens.weight",))
    with pytest.raises(KeyNotFoundError) as info:
        locate(d)
    msg = str(info.value)
    assert "config.json says tie_word_embeddings: false, and there is no unembedding (lm_head.weight)" in msg
    assert "--matrix embedding" in msg and "\n" not in msg
    assert locate(d, matrix="embedding").key == "shared.weight"
    d = checkpoint(tmp_path, None, "bert.embeddings.word_embeddings.weight", {"model_type": "bert",
                   "tie_word_embeddings": False}, name="bert")
    with pytest.raises(KeyNotFoundError, match="no unembedding"):
        locate(d)


def test_untied_decoder_without_head_keeps_the_embedding(tmp_path):
    # as before the families: a decoder saved without its head gives its embedding, and says so
    d = checkpoint(tmp_path, None, "model.embed_tokens.weight", {"model_type": "llama", "tie_word_embeddings": False})
    where = locate(d)
    assert where.key == "model.embed_tokens.weight" and where.tied
    assert where.reason == (
        "llama checkpoint (config.json model_type), tied embeddings: the checkpoint has no lm_head.weight "
        "(although config.json says tie_word_embeddings: false)"
    )


def test_unknown_layout_is_one_line_listing_the_keys(tmp_path, capsys):
    d = checkpoint(tmp_path, None, "transformer.word_embeddings.weight", {"model_type": "bloom"}, ("h.0.mlp.weight",))
    with pytest.raises(KeyNotFoundError) as info:
        locate(d)
    msg = str(info.value)
    assert "neither lm_head.weight nor model.embed_tokens.weight" in msg
    assert "config.json model_type 'bloom' is not a family refframe knows" in msg
    assert "--W-key (candidates: transformer.word_embeddings.weight)" in msg and "\n" not in msg
    assert locate(d, "transformer.word_embeddings.weight").key == "transformer.word_embeddings.weight"
    # a family named by config.json whose keys are all missing
    d = checkpoint(tmp_path, None, None, {"model_type": "gpt2"}, ("foo.weight", "bar.weight"), name="empty")
    with pytest.raises(KeyNotFoundError, match=r"gpt2 checkpoint \(config.json model_type\), but none of its "
                       r"matrices \(lm_head.weight, transformer.wte.weight, wte.weight\) found; choose the matrix "
                       r"with --W-key \(keys present: bar.weight, foo.weight\)"):
        locate(d)


def test_no_embedding_and_bad_matrix(tmp_path):
    d = checkpoint(tmp_path, "lm_head.weight", None, {"model_type": "qwen2"})
    with pytest.raises(KeyNotFoundError, match=r"qwen2 checkpoint \(config.json model_type\): no embedding "
                       r"\(model.embed_tokens.weight, embed_tokens.weight\)"):
        locate(d, matrix="embedding")
    with pytest.raises(InputError, match="matrix must be one of unembedding, embedding, got 'head'"):
        load_checkpoint_w(d, matrix="head")


def test_unreadable_config_is_ignored_with_a_warning(tmp_path):
    d = checkpoint(tmp_path, None, "transformer.wte.weight", None, ("transformer.wpe.weight",))
    (d / "config.json").write_text("{not json")
    with pytest.warns(RefframeWarning, match="config.json: not valid JSON; it is ignored"):
        where = locate(d)
    assert where.key == "transformer.wte.weight" and where.reason.startswith("gpt2 layout (from the key names)")


def test_cli_build_gpt2_reports_key_and_reason(tmp_path, capsys):
    d = checkpoint(tmp_path, None, "transformer.wte.weight", {"model_type": "gpt2"}, ("transformer.wpe.weight",))
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(1, N, 7)}, ids)
    out = tmp_path / "frame.safetensors"
    capsys.readouterr()
    assert refframe.cli.main(["build", "--checkpoint", str(d), "--cluster", str(ids), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        f"Loaded W: ({N}, {D}) float32 from {d / 'model.safetensors'} (transformer.wte.weight): gpt2 checkpoint "
        "(config.json model_type), tied embeddings: the unembedding is the embedding\n"
    ) in text
    assert refframe.load_frame(out).metadata["w_source"] == f"{d / 'model.safetensors'}:transformer.wte.weight"


def test_cli_build_and_verify_pythia_embedding(tmp_path, capsys):
    d = checkpoint(
        tmp_path, "embed_out.weight", "gpt_neox.embed_in.weight", {"model_type": "gpt_neox"},
        ("gpt_neox.final_layer_norm.weight",), shards=2,
    )
    ids = tmp_path / "ids.safetensors"
    save_file({"cluster_token_ids": torch.arange(0, N, 5)}, ids)
    out = tmp_path / "out"
    main = refframe.cli.main
    capsys.readouterr()
    argv = ["build", "--checkpoint", str(d), "--cluster", str(ids), "--out-dir", str(out), "--matrix", "embedding"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(gpt_neox.embed_in.weight): gpt_neox checkpoint (config.json model_type), the embedding (--matrix embedding)" in text
    frame = out / "1.6a_cluster_reference_frame.safetensors"
    reference = refframe.build_frame(EMBEDDING, torch.arange(0, N, 5))
    assert torch.allclose(refframe.load_frame(frame).centroid, reference.centroid)
    assert main(["verify", str(frame), "--checkpoint", str(d), "--matrix", "embedding", "--cluster", str(ids)]) == 0
    assert "Verification passed" in capsys.readouterr().out
    # the unembedding (the default) is another matrix: verify says so
    assert main(["verify", str(frame), "--checkpoint", str(d)]) == 1
    assert "is not the matrix the frame was built from" in capsys.readouterr().err
    # --W-key overrides --matrix
    assert main(["verify", str(frame), "--checkpoint", str(d), "--matrix", "unembedding", "--W-key",
                 "gpt_neox.embed_in.weight"]) == 0


def test_cli_matrix_needs_a_checkpoint(tmp_path, capsys, model):
    for argv in (
        ["build", "--W", str(model["W"]), "--cluster", str(model["ids"]), "--out", str(tmp_path / "f.safetensors")],
        ["verify", str(model["out"]), "--W", str(model["W"])],
    ):
        rc, err = cli(capsys, *argv, "--matrix", "embedding")
        assert_one_line_error(rc, err, "--matrix chooses between a checkpoint's unembedding and embedding: it needs "
                              "--checkpoint DIR")
    with pytest.raises(SystemExit) as exc:
        refframe.cli.main(["build", "--checkpoint", str(tmp_path), "--matrix", "head"])
    assert exc.value.code == 2 and "invalid choice: 'head'" in capsys.readouterr().err
