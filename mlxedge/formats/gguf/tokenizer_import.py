"""Rebuild Hugging Face tokenizer files from the vocabulary a GGUF file carries.

A GGUF file stores its tokenizer as metadata (token strings, merges or scores, token types and a
pre-tokenizer name). llama.cpp turns that into a tokenizer at load time; this module turns it into
the `tokenizer.json` + side files that `transformers` and `mlx_lm` read, aiming for the same token
ids llama.cpp would produce.

Two vocabulary kinds are handled:
- "gpt2": byte-level BPE. The split regexes and flags come from the `tokenizer.ggml.pre` name, as
  llama.cpp's `src/llama-vocab.cpp` maps them (the table in pretokenizers.py, shared with export).
- "llama": SentencePiece-style BPE with byte fallback; merges are derived from token scores the way
  llama.cpp's SPM tokenizer ranks them (the merged piece with the highest score wins).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import gguf
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.pretokenizers import PRE_TOKENIZERS, PreTokenizer

logger = logging.getLogger(__name__)


# GGUF metadata keys of the tokenizer, as gguf-py names them (`tokenizer.ggml.*`).
TokenizerKeys = gguf.Keys.Tokenizer


# llama.cpp's token types (enum llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SPM_SPACE = "\u2581"  # SentencePiece's visible space


def tokenizer_files_from_gguf(metadata: Mapping[str, Any]) -> dict[str, bytes]:
    """Build the Hugging Face tokenizer files described by a GGUF file's metadata.

    Args:
        metadata: GGUF metadata as plain Python values by key (strings, numbers, bools, lists),
            e.g. `{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [...], ...}`.

    Returns:
        File name -> bytes for tokenizer.json, tokenizer_config.json, special_tokens_map.json and
        generation_config.json. The same metadata always gives the same bytes.

    Raises:
        MlxedgeError: the vocabulary type or pre-tokenizer is not supported, or a required key is
            missing or inconsistent.
    """
    vocab_type = _required(metadata, TokenizerKeys.MODEL)
    tokens = list(_required(metadata, TokenizerKeys.LIST))
    token_types = list(metadata.get(TokenizerKeys.TOKEN_TYPE) or [TOKEN_TYPE_NORMAL] * len(tokens))
    if len(token_types) < len(tokens):
        raise MlxedgeError(
            f"metadata key {TokenizerKeys.TOKEN_TYPE} has {len(token_types)} entries "
            f"for {len(tokens)} tokens"
        )
    _check_unique(tokens)

    if vocab_type == "gpt2":
        pre_name = metadata.get(TokenizerKeys.PRE)
        if pre_name is None:
            # llama.cpp silently falls back to its "default" splitter here; say so.
            logger.warning(
                "GGUF has no %s; using llama.cpp's 'default' splitter", TokenizerKeys.PRE
            )
            pre_name = "default"
        pre = _pre_tokenizer(pre_name)
        merges = list(_required(metadata, TokenizerKeys.MERGES))
        tokenizer = _build(_byte_level_bpe, tokens, merges, pre)
        default_add_bos = pre.add_bos
    elif vocab_type == "llama":
        scores = list(_required(metadata, TokenizerKeys.SCORES))
        add_prefix = bool(metadata.get(TokenizerKeys.ADD_PREFIX, True))
        unk_id = int(metadata.get(TokenizerKeys.UNK_ID, 0))
        if not 0 <= unk_id < len(tokens):
            raise MlxedgeError(f"{TokenizerKeys.UNK_ID} = {unk_id} is outside the vocabulary")
        unk = tokens[unk_id]
        tokenizer = _build(_sentencepiece_bpe, tokens, scores, token_types, add_prefix, unk)
        default_add_bos = True
    else:
        raise MlxedgeError(
            f"vocabulary type {vocab_type!r} ({TokenizerKeys.MODEL}) is not supported yet; "
            "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)"
        )

    _add_special_tokens(tokenizer, tokens, token_types)
    special = _special_tokens(metadata, tokens)
    add_bos = bool(metadata.get(TokenizerKeys.ADD_BOS, default_add_bos))
    add_eos = bool(metadata.get(TokenizerKeys.ADD_EOS, False))
    tokenizer.post_processor = _post_processor(vocab_type, special, add_bos, add_eos)

    config: dict[str, Any] = {
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        # Spaces before punctuation are real text here; removing them breaks decode(encode(s)).
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": text for role, (text, _) in special.items()},
    }
    arch = metadata.get("general.architecture")
    if (context := metadata.get(f"{arch}.context_length")) is not None:
        config["model_max_length"] = int(context)
    if (template := metadata.get(TokenizerKeys.CHAT_TEMPLATE)) is not None:
        config["chat_template"] = template

    special_map = {f"{role}_token": text for role, (text, _) in special.items()}
    generation = {
        f"{role}_token_id": tid for role, (_, tid) in special.items() if role in ("bos", "eos")
    }

    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
        "generation_config.json": _json_bytes(generation),
    }


def _build(make: Callable[..., Tokenizer], *args: Any) -> Tokenizer:
    """Run a tokenizer constructor; tokenizers reports bad vocabularies as bare Exceptions."""
    try:
        return make(*args)
    except MlxedgeError:
        raise
    except Exception as err:
        raise MlxedgeError(f"the vocabulary cannot be built into a tokenizer: {err}") from err


def _pre_tokenizer(name: str) -> PreTokenizer:
    pre = PRE_TOKENIZERS.get(name)
    if pre is None or pre.unsupported is not None:
        why = "llama.cpp does not know it" if pre is None else pre.unsupported
        supported = sorted(n for n, p in PRE_TOKENIZERS.items() if p.unsupported is None)
        raise MlxedgeError(
            f"pre-tokenizer {name!r} ({TokenizerKeys.PRE}) is not supported yet: {why}; "
            "supported: " + ", ".join(supported)
        )
    return pre


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata.get(key)
    if value is None:
        raise MlxedgeError(f"missing metadata key {key}")
    return value


def _check_unique(tokens: list[str]) -> None:
    # A vocabulary maps text to one id; llama.cpp refuses duplicates too.
    if len(set(tokens)) != len(tokens):
        seen: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if tok in seen:
                raise MlxedgeError(f"duplicate token {tok!r} at ids {seen[tok]} and {i}")
            seen[tok] = i


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: PreTokenizer) -> Tokenizer:
    """Byte-level BPE with llama.cpp's split regexes in front of the byte-to-unicode mapping."""
    pairs = []
    for i, merge in enumerate(merges):
        # Split at the first space after position 0, as llama.cpp does, so a merge whose left
        # part is itself a space-like symbol stays intact.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise MlxedgeError(f"merge {i} ({merge!r}) in {TokenizerKeys.MERGES} has no separator")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # tokenizers rejects a merge whose parts or result are not tokens; llama.cpp keeps it but can
    # never emit its result, so dropping it changes no output that maps to real tokens.
    usable = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    if len(usable) < len(pairs):
        logger.warning(
            "dropped %d merges that produce no vocabulary token", len(pairs) - len(usable)
        )
    model = models.BPE(vocab=vocab, merges=usable, ignore_merges=pre.ignore_merges, fuse_unk=False)
    tokenizer = Tokenizer(model)
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in pre.regexes]
    # The regexes already split the text, so the byte mapping must not split it again.
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], token_types: list[int], add_prefix: bool, unk: str
) -> Tokenizer:
    """SentencePiece vocabulary as a BPE with byte fallback.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring token; ordering every (left, right) split of every token by that score gives a
    BPE merge list with the same preference.
    """
    if len(scores) < len(tokens):
        raise MlxedgeError(
            f"{TokenizerKeys.SCORES} has {len(scores)} entries for {len(tokens)} tokens"
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    mergeable = {
        tok
        for tok, kind in zip(tokens, token_types, strict=False)
        if kind in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED)
    }
    ranked = []
    for merged in mergeable:
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[vocab[merged]], vocab[merged], vocab[left], left, right))
    ranked.sort()  # best score first; ids break ties so the order never depends on set iteration
    merges = [(left, right) for *_, left, right in ranked]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if add_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    strip_first = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip_first]
    )
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    added = []
    for tok, kind in zip(tokens, token_types, strict=False):
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            special = kind == TOKEN_TYPE_CONTROL
            added.append(AddedToken(tok, special=special, normalized=False))
    # Already in the model vocabulary, so each keeps its GGUF id.
    tokenizer.add_tokens(added)


def _special_tokens(metadata: Mapping[str, Any], tokens: list[str]) -> dict[str, tuple[str, int]]:
    """Role ("bos", "eos", "unk", "pad") -> (token text, id) for the ids the GGUF names."""
    roles = {
        "bos": TokenizerKeys.BOS_ID,
        "eos": TokenizerKeys.EOS_ID,
        "unk": TokenizerKeys.UNK_ID,
        "pad": TokenizerKeys.PAD_ID,
    }
    special = {}
    for role, key in roles.items():
        tid = metadata.get(key)
        if tid is None:
            continue
        tid = int(tid)
        if not 0 <= tid < len(tokens):
            # llama.cpp ignores an out-of-range special id with a warning; do the same.
            logger.warning(
                "%s = %d is outside the vocabulary of %d; ignored", key, tid, len(tokens)
            )
            continue
        special[role] = (tokens[tid], tid)
    return special


def _post_processor(
    vocab_type: str,
    special: dict[str, tuple[str, int]],
    add_bos: bool,
    add_eos: bool,
) -> processors.PostProcessor | None:
    """What encode(add_special_tokens=True) wraps around the text."""
    bos = special.get("bos") if add_bos else None
    eos = special.get("eos") if add_eos else None
    if add_bos and bos is None:
        raise MlxedgeError(f"{TokenizerKeys.ADD_BOS} is true but {TokenizerKeys.BOS_ID} is not set")
    if add_eos and eos is None:
        raise MlxedgeError(f"{TokenizerKeys.ADD_EOS} is true but {TokenizerKeys.EOS_ID} is not set")
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if vocab_type == "gpt2" else None
    head = [f"{bos[0]}:0"] if bos else []
    tail = [f"{eos[0]}:0"] if eos else []
    pair_head = [f"{bos[0]}:1"] if bos else []
    pair_tail = [f"{eos[0]}:1"] if eos else []
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *pair_head, "$B:1", *pair_tail],
        special_tokens=sorted({bos, eos} - {None}, key=lambda s: s[1]),
    )


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
