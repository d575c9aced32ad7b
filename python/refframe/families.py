"""Which tensor of a Hugging Face checkpoint is W: the model families in use, each with the keys of
its unembedding and of its embedding, and the choice between them.

The family comes from config.json when there is one (its model_type, else its architectures, else
the model_type of its text_config, as multimodal models have), else from the key names (the family
with the most of its keys present; suffix matches, e.g. language_model.lm_head.weight, only when no
key matches exactly). W is the family's unembedding unless `matrix="embedding"`; when the checkpoint
holds no unembedding, the embedding stands in (tied embeddings), except for an encoder whose
config.json says the two are untied. An explicit key overrides all of this.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError, KeyNotFoundError
from .layout import MATRICES
from .tensorfile import key_list, short_repr


@dataclass(frozen=True)
class Family:
    """A layout of checkpoint keys. Keys are listed most usual first; save_pretrained writes them
    with the model class's prefix (transformer., model., bert., ...) or, from a bare base model,
    without it."""

    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    unembedding: tuple[str, ...]  # keys of the unembedding (the LM head), (vocab, hidden)
    embedding: tuple[str, ...]  # keys of the input embedding, (vocab, hidden)
    tied: bool  # tied by default, when config.json does not say
    kind: str = "decoder"  # "decoder", "encoder-decoder" or "encoder"


LM_HEAD = "lm_head.weight"
EMBED_TOKENS = "model.embed_tokens.weight"
_LLAMA_EMBED = (EMBED_TOKENS, "embed_tokens.weight")

# In order: with equally many keys present, the earlier family is taken.
FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite", "starcoder2"),
        (LM_HEAD,),
        _LLAMA_EMBED,
        tied=False,
    ),
    Family("gemma", ("gemma", "gemma2", "gemma3_text"), (LM_HEAD,), _LLAMA_EMBED, tied=True),
    Family("gpt2", ("gpt2",), (LM_HEAD,), ("transformer.wte.weight", "wte.weight"), tied=True),
    Family(
        "gpt_neox", ("gpt_neox",), ("embed_out.weight",), ("gpt_neox.embed_in.weight", "embed_in.weight"), tied=False
    ),
    Family(
        "opt", ("opt",), (LM_HEAD,), ("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight"), tied=True
    ),
    Family(  # phi-1.5 / phi-2 as first published: transformer.embd.wte, lm_head.linear
        "phi",
        ("phi", "phi3", "phi-msft"),
        (LM_HEAD, "lm_head.linear.weight"),
        (EMBED_TOKENS, "transformer.embd.wte.weight"),
        tied=False,
    ),
    Family(  # AI2's own layout (hf_olmo): model.transformer.wte, ff_out when untied; later OLMo: Llama's
        "olmo",
        ("olmo", "olmo2", "olmoe", "hf_olmo"),
        (LM_HEAD, "model.transformer.ff_out.weight"),
        (EMBED_TOKENS, "model.transformer.wte.weight"),
        tied=False,
    ),
    Family(
        "t5",
        ("t5", "mt5", "umt5"),
        (LM_HEAD,),
        ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
        tied=True,
        kind="encoder-decoder",
    ),
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "deberta", "deberta-v2"),
        ("cls.predictions.decoder.weight", "lm_head.decoder.weight"),  # masked-LM heads, when saved
        (
            "bert.embeddings.word_embeddings.weight",
            "roberta.embeddings.word_embeddings.weight",
            "embeddings.word_embeddings.weight",
        ),
        tied=True,
        kind="encoder",
    ),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


@dataclass(frozen=True)
class Choice:
    """The key taken, whether the embedding stands in for the unembedding, and why (for the report)."""

    key: str
    tied: bool
    family: str  # "" when the key was given
    reason: str


@dataclass(frozen=True)
class _Found:
    family: Family
    label: str  # e.g. "gpt2 checkpoint (config.json model_type)"
    tied: bool | None  # what config.json says; None: it does not
    tie_flag: str  # the config entry that says it, e.g. "tie_word_embeddings"


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def _type_of_architecture(arch: str) -> str | None:
    """The longest known model_type an architecture's class name starts with (GPT2LMHeadModel: gpt2)."""
    hits = [t for t in _BY_TYPE if _norm(arch).startswith(_norm(t))]
    return max(hits, key=len) if hits else None


def _tie_of(config: dict) -> tuple[bool | None, str]:
    sections = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    for section in sections:
        for flag in ("tie_word_embeddings", "weight_tying"):  # weight_tying: AI2's OLMo configs
            if isinstance(section.get(flag), bool):
                return section[flag], flag
    return None, ""


def _family_from_config(config: dict) -> tuple[Family, str] | None:
    mt = config.get("model_type")
    if isinstance(mt, str) and mt in _BY_TYPE:
        return _BY_TYPE[mt], f"{mt} checkpoint (config.json model_type)"
    archs = config.get("architectures")
    for arch in archs if isinstance(archs, list) else []:
        if isinstance(arch, str) and (t := _type_of_architecture(arch)) is not None:
            return _BY_TYPE[t], f"{t} checkpoint (config.json architectures: {short_repr(arch, 40)})"
    text = config.get("text_config")
    mt = text.get("model_type") if isinstance(text, dict) else None
    if isinstance(mt, str) and mt in _BY_TYPE:
        return _BY_TYPE[mt], f"{mt} language model (config.json text_config)"
    return None


def _family_from_keys(keys: list[str]) -> Family | None:
    """The family with the most of its keys present: exact keys first, else keys ending in them."""
    have = set(keys)
    exact = {f.name: sum(n in have for n in f.unembedding + f.embedding) for f in FAMILIES}
    ending = {
        f.name: sum(any(k.endswith("." + n) for k in keys) for n in f.unembedding + f.embedding) for f in FAMILIES
    }
    for score in (exact, ending):
        best = max(FAMILIES, key=lambda f: score[f.name])  # the first of the best
        if score[best.name]:
            return best
    return None


def _find(keys: list[str], names: tuple[str, ...], family: Family, where: str) -> str | None:
    """The first of `names` present, else the unique key ending in one (a prefixed layout)."""
    have = set(keys)
    for name in names:
        if name in have:
            return name
    for name in names:
        ends = [k for k in keys if k.endswith("." + name)]
        if len(ends) == 1:
            return ends[0]
        if len(ends) > 1:
            raise KeyNotFoundError(
                f"{where}: no {family.unembedding[0]} or {family.embedding[0]}, and several keys end in "
                f"{name}: {key_list(ends)}; choose one with --W-key"
            )
    return None


def _unknown_layout(keys: list[str], config: dict | None, where: str) -> KeyNotFoundError:
    mt = config.get("model_type") if config else None
    note = f" (config.json model_type {short_repr(mt, 40)} is not a family refframe knows)" if mt else ""
    hints = [
        k for k in keys if any(s in k for s in ("lm_head", "embed", "embd", "wte", "shared", "ff_out", "output"))
    ]
    return KeyNotFoundError(
        f"{where}: neither {LM_HEAD} nor {EMBED_TOKENS} (tied embeddings) found, nor the matrices of another "
        f"known family{note}; choose the matrix with --W-key (candidates: {key_list(hints or keys, limit=8)})"
    )


def _identify(keys: list[str], config: dict | None, where: str) -> _Found:
    tied, flag = _tie_of(config) if config else (None, "")
    by_config = _family_from_config(config) if config else None
    if by_config is not None:
        return _Found(by_config[0], by_config[1], tied, flag)
    family = _family_from_keys(keys)
    if family is None:
        raise _unknown_layout(keys, config, where)
    return _Found(family, f"{family.name} layout (from the key names)", tied, flag)


def _stand_in(found: _Found, key: str, where: str) -> Choice:
    """The embedding as the unembedding, of a checkpoint that holds no unembedding."""
    fam, head = found.family, found.family.unembedding[0]
    if found.tied is False and fam.kind != "decoder":
        raise KeyNotFoundError(
            f"{where}: {found.label}: config.json says {found.tie_flag}: false, and there is no unembedding "
            f"({' or '.join(fam.unembedding)}); take the embedding {key} with --matrix embedding, or choose "
            "with --W-key"
        )
    if fam.kind == "encoder":
        why = "tied embeddings: an encoder's only token matrix is its embedding"
    elif found.tied or (found.tied is None and fam.tied):
        why = "tied embeddings: the unembedding is the embedding"
    else:
        why = f"tied embeddings: the checkpoint has no {head}"
        if found.tied is False:
            why += f" (although config.json says {found.tie_flag}: false)"
    return Choice(key, True, fam.name, f"{found.label}, {why}")


def choose_key(keys: list[str], config: dict | None, key: str | None, matrix: str, where: str) -> Choice:
    """The tensor that is W among `keys` (a checkpoint's, `where` names it in messages): `key` if
    given, else the family's unembedding or, with matrix="embedding", its embedding."""
    if matrix not in MATRICES:
        raise InputError(f"matrix must be one of {', '.join(MATRICES)}, got {short_repr(matrix)}")
    if key is not None:
        if key not in set(keys):
            raise KeyNotFoundError(f"{where}: key {short_repr(key)} not found (keys present: {key_list(keys)})")
        return Choice(key, False, "", "chosen with --W-key")
    found = _identify(keys, config, where)
    fam = found.family
    if matrix == "embedding":
        emb = _find(keys, fam.embedding, fam, where)
        if emb is None:
            raise KeyNotFoundError(
                f"{where}: {found.label}: no embedding ({', '.join(fam.embedding)}); choose the matrix with "
                f"--W-key (keys present: {key_list(keys, limit=8)})"
            )
        return Choice(emb, False, fam.name, f"{found.label}, the embedding (--matrix embedding)")
    head = _find(keys, fam.unembedding, fam, where)
    if head is not None:
        return Choice(head, False, fam.name, f"{found.label}, the unembedding")
    emb = _find(keys, fam.embedding, fam, where)
    if emb is None:  # only a family named by config.json can miss both: one found from keys has a key
        raise KeyNotFoundError(
            f"{where}: {found.label}, but none of its matrices ({', '.join(fam.unembedding + fam.embedding)}) "
            f"found; choose the matrix with --W-key (keys present: {key_list(keys, limit=8)})"
        )
    return _stand_in(found, emb, where)
