"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF tokenizer metadata.

Two vocabulary kinds are written, the ones llama.cpp runs for llama-family models:

- byte-level BPE (`tokenizer.ggml.model = "gpt2"`): tokens, merges, and the name of llama.cpp's
  pre-tokenizer (`tokenizer.ggml.pre`). The name is read from tokenizer.json's own definition: its
  split steps are rewritten as the list of regexes llama.cpp would apply, and that list (with the
  model's `ignore_merges` flag) is looked up in llama.cpp's table. Token-id hashes are not used, so
  a vocabulary trained from scratch with a known scheme still gets its name.
- SentencePiece-style BPE with byte fallback (`"llama"`, Llama 2 / Mistral): tokens, scores and
  token types. llama.cpp's SPM tokenizer merges the adjacent pair whose result has the highest
  score, so scores are derived from the merge ranks (earlier merge, higher score); that gives the
  ids the Hugging Face BPE gives.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.pretokenizers import (
    CANONICAL,
    CONTRACTIONS,
    DIGIT,
    DIGITS,
    GPT2,
    PRE_TOKENIZERS,
    TEKKEN,
    canonical_name,
)
from mlxedge.formats.gguf.tokenizer_import import SPM_SPACE

log = logging.getLogger(__name__)

_SPECIAL_LOOKING = ("<|", "<｜", "<pad>", "<mask>", "<unused")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Every `tokenizer.ggml.pre` value llama.cpp accepts; any other makes llama.cpp refuse the file.
LLAMA_CPP_PRE_NAMES: tuple[str, ...] = tuple(PRE_TOKENIZERS)

# Names that split like another one (same regexes and merge mode in llama.cpp) -> the name export
# writes for that behaviour, for every behaviour the importer can rebuild.
PRE_TOKENIZER_ALIASES: dict[str, str] = {
    name: canonical
    for name in PRE_TOKENIZERS
    if (canonical := canonical_name(name)) is not None and canonical != name
}

# Tekken's original \p{Lu}/\p{Ll} classes, which llama.cpp's regex engine emulates (TEKKEN).
_TEKKEN_HF = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Hugging Face spellings llama.cpp rewrote for its regex engine, which has no inline flags.
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# The split of the `ByteLevel(use_regex=True)` step (tokenizers' byte_level.rs). llama.cpp's GPT-2
# regex lacks the final `|\s+`; it keeps any text no alternative matches as a piece of its own,
# which is what that alternative does.
_HF_GPT2 = GPT2 + r"|\s+"

_EXAMPLES = "gpt-2, llama-bpe, qwen2, smollm, deepseek-llm"


def detect_pre_tokenizer(tok_json: dict) -> str:
    """The llama.cpp pre-tokenizer name that splits text as this byte-level BPE tokenizer does.

    The definition is compared step by step, not by hashing token ids: `Split` regexes (isolated,
    not inverted), `Digits`, and a final `ByteLevel` (without a prefix space; its built-in GPT-2
    regex counts as a split when `use_regex` is on), plus the model's `ignore_merges`.

    Args:
        tok_json: a parsed tokenizer.json with a BPE model.

    Returns:
        The name export writes for that behaviour (pretokenizers.CANONICAL), e.g. "gpt-2",
        "llama-bpe", "qwen2", "smollm" or "deepseek-llm". Other names with the same behaviour
        (e.g. "starcoder" for "smollm") are in PRE_TOKENIZER_ALIASES.

    Raises:
        MlxedgeError: the definition has no llama.cpp equivalent; the message names the
            --pre-tokenizer override.
    """
    regexes, problem = _split_regexes(tok_json)
    if problem is None:
        normalizer = tok_json.get("normalizer")
        # llama.cpp does not normalize BPE input; NFC leaves already-composed text unchanged and
        # is what Qwen2's tokenizers declare (llama.cpp's own converter accepts it the same way).
        if normalizer is not None and normalizer.get("type") != "NFC":
            problem = f"normalizer {_describe(normalizer)}"
    if problem is None:
        ignore_merges = bool(tok_json.get("model", {}).get("ignore_merges", False))
        name = CANONICAL.get((regexes, ignore_merges))
        if name is not None:
            return name
        shown = " then ".join(f"/{r}/" for r in regexes) or "none"
        problem = f"split regexes {shown} (ignore_merges={ignore_merges})"
    raise MlxedgeError(
        f"the tokenizer's pre-tokenizer has no llama.cpp equivalent: {problem}",
        fix=f"pass --pre-tokenizer NAME with the llama.cpp name to use (e.g. {_EXAMPLES}); "
        "llama.cpp then splits text its own way",
    )


def check_pre_tokenizer(name: str) -> str:
    """`name` if llama.cpp accepts it as `tokenizer.ggml.pre`.

    Args:
        name: a pre-tokenizer name such as "llama-bpe".

    Returns:
        The name, unchanged.

    Raises:
        MlxedgeError: llama.cpp does not know the name; the message lists the valid ones.
    """
    if name not in LLAMA_CPP_PRE_NAMES:
        raise MlxedgeError(
            f"unknown pre-tokenizer {name!r}",
            fix="use one of llama.cpp's names: " + ", ".join(sorted(LLAMA_CPP_PRE_NAMES)),
        )
    return name


def add_tokenizer(
    writer: gguf.GGUFWriter,
    vocab_size: int,
    tok_json: dict,
    tok_config: dict,
    pre: str | None = None,
) -> bool:
    """Write a Hugging Face tokenizer as `tokenizer.*` metadata.

    Returns:
        Whether llama.cpp will put BOS in front of a text (the add_bos_token written).

    Args:
        writer: the GGUF writer, before its key/value data is written.
        vocab_size: the model's vocabulary size; ids without a token become `[PAD{i}]` (UNUSED).
        tok_json: parsed tokenizer.json (a BPE model: byte-level, or SentencePiece-style with
            byte fallback).
        tok_config: parsed tokenizer_config.json (special tokens, add_bos/eos, chat template).
        pre: llama.cpp pre-tokenizer name; None reads it from tok_json (detect_pre_tokenizer).
            SentencePiece vocabularies have none ("default" is written).

    Raises:
        MlxedgeError: the tokenizer kind is not supported, its pre-tokenizer has no llama.cpp
            equivalent, or `pre` is not a name llama.cpp accepts.
    """
    if pre is not None:
        check_pre_tokenizer(pre)
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise MlxedgeError(
            f"tokenizer model {model.get('type')!r} cannot be exported yet",
            fix="byte-level BPE and SentencePiece-style BPE (byte fallback) are supported",
        )
    tokens, types = _token_table(vocab_size, tok_json)
    if _is_sentencepiece(tok_json):
        add_space_prefix = _spm_space_prefix(tok_json)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, types, model.get("merges", [])).tolist())
        writer.add_token_types(types)
        writer.add_add_space_prefix(add_space_prefix)
    else:
        if pre is None:
            pre = detect_pre_tokenizer(tok_json)
            log.info("pre-tokenizer: %s (from tokenizer.json)", pre)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(list(_merge_strings(model.get("merges", []))))
    return _add_specials(writer, tokens, types, tok_json, tok_config)


def _token_table(vocab_size: int, tok_json: dict) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id."""
    model = tok_json["model"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    byte_fallback = bool(model.get("byte_fallback"))
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
            types[i] = gguf.TokenType.NORMAL
            if byte_fallback and _BYTE_TOKEN.fullmatch(text):
                types[i] = gguf.TokenType.BYTE
    for added in tok_json.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            special = added.get("special") or added["content"].startswith(_SPECIAL_LOOKING)
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    unk = model.get("unk_token")
    if byte_fallback and unk is not None:
        for i, text in enumerate(tokens):
            if text == unk:
                types[i] = gguf.TokenType.UNKNOWN
    return tokens, [int(t) for t in types]


def _merge_strings(merges: list) -> Iterator[str]:
    for m in merges:
        yield m if isinstance(m, str) else " ".join(m)


def _merge_pairs(merges: list) -> Iterator[tuple[str, str]]:
    for m in merges:
        if isinstance(m, str):
            # A space inside a SentencePiece token is `▁`, so the first space separates.
            left, _, right = m.partition(" ")
            yield left, right
        else:
            yield m[0], m[1]


# ---------------------------------------------------------------------------------- byte-level BPE


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [s for p in pre_tokenizer.get("pretokenizers", []) for s in _steps(p)]
    return [pre_tokenizer]


def _split_regexes(tok_json: dict) -> tuple[tuple[str, ...], str | None]:
    """The pre-tokenizer as llama.cpp-style split regexes, or a description of what is not."""
    steps = _steps(tok_json.get("pre_tokenizer"))
    regexes: list[str] = []
    for k, step in enumerate(steps):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            if "Regex" not in pattern or step.get("behavior") != "Isolated" or step.get("invert"):
                return (), f"step {_describe(step)}"
            regexes.append(_normal_regex(pattern["Regex"]))
        elif kind == "Digits":
            regexes.append(DIGIT if step.get("individual_digits") else DIGITS)
        elif kind == "ByteLevel" and k == len(steps) - 1:
            if step.get("add_prefix_space"):
                return (), "ByteLevel with add_prefix_space=true (llama.cpp never adds a space)"
            if step.get("use_regex", True):
                regexes.append(GPT2)
        else:
            return (), f"step {_describe(step)}"
    if not steps or steps[-1].get("type") != "ByteLevel":
        return (), "no final ByteLevel step (not a byte-level BPE)"
    return tuple(regexes), None


def _normal_regex(regex: str) -> str:
    """A split regex in llama.cpp's spelling, so equal behaviour compares equal."""
    # Control characters written literally or escaped mean the same to both engines.
    regex = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    if regex == _HF_GPT2:
        return GPT2
    if regex == _TEKKEN_HF:
        return TEKKEN
    return regex.replace(_HF_CONTRACTIONS, CONTRACTIONS)


def _describe(obj: dict) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in obj.items() if k != "type")
    return f"{obj.get('type')}({fields})"


# ----------------------------------------------------------------------------------- SentencePiece


def _is_sentencepiece(tok_json: dict) -> bool:
    """Llama 2 / Mistral style: BPE over `▁`-joined text with byte fallback."""
    if tok_json["model"].get("byte_fallback"):
        return True
    pre = tok_json.get("pre_tokenizer") or {}
    return pre.get("type") == "Metaspace" or SPM_SPACE in str(tok_json.get("normalizer"))


def _spm_space_prefix(tok_json: dict) -> bool:
    """Whether text gets a leading `▁` (llama.cpp's add_space_prefix); checks the rest fits."""
    normalizer = tok_json.get("normalizer")
    pre = tok_json.get("pre_tokenizer")
    if not tok_json["model"].get("byte_fallback"):
        raise MlxedgeError(
            "SentencePiece-style tokenizer without byte_fallback cannot be exported",
            fix="llama.cpp's SentencePiece tokenizer falls back to <0xXX> byte tokens",
        )
    if pre is None and normalizer is not None:
        steps = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else None
        steps = steps if steps is not None else [normalizer]
        replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
        prepend = {"type": "Prepend", "prepend": SPM_SPACE}
        if steps == [replace]:
            return False
        if steps == [prepend, replace]:
            return True
    elif normalizer is None and pre is not None and pre.get("type") == "Metaspace":
        # Splitting at each `▁` (split=true) only matters for tokens holding an inner `▁`;
        # SentencePiece vocabularies trained with split_by_whitespace have none.
        if pre.get("replacement", SPM_SPACE) == SPM_SPACE:
            scheme = pre.get("prepend_scheme")
            if scheme is None:
                return bool(pre.get("add_prefix_space", True))
            if scheme in ("first", "always", "never"):
                # llama.cpp adds the space at the start and after each special token ("always");
                # "first" differs only for text that follows a special token.
                return scheme != "never"
    raise MlxedgeError(
        "SentencePiece-style tokenizer with an unsupported normalizer/pre-tokenizer: "
        f"{_describe(normalizer) if normalizer else None} / {_describe(pre) if pre else None}",
        fix="supported: Metaspace(replacement='▁'), or the normalizers Prepend('▁') + "
        "Replace(' ', '▁') (Llama 2, Mistral)",
    )


def _spm_scores(tokens: list[str], types: list[int], merges: list) -> np.ndarray:
    """Scores under which llama.cpp's SPM tokenizer merges in the BPE merge order.

    llama.cpp merges the adjacent pair whose joined text is the highest-scoring token, leftmost
    first among equals; the BPE merges the pair of lowest rank. A token made by merge r gets
    -r, so both pick the same pair. gguf-py's LlamaHfVocab (llama.cpp's converter without a
    tokenizer.model) writes -1000 for every token instead, which makes llama.cpp merge leftmost
    pairs first. Tokens no merge produces get a score below every merge; non-normal tokens get 0,
    as SentencePiece gives them.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    n_merges = len(merges)
    scores = np.full(len(tokens), -float(n_merges + 1), dtype=np.float32)
    for rank in range(n_merges - 1, -1, -1):  # the first merge producing a token wins
        left, right = next(_merge_pairs(merges[rank : rank + 1]))
        i = ids.get(left + right)
        if i is not None:
            scores[i] = -float(rank)
    for i, kind in enumerate(types):
        if kind != gguf.TokenType.NORMAL:
            scores[i] = 0.0
    return scores


# -------------------------------------------------------------------------------- special tokens

_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>")
_EOM_TEXTS = ("<|eom_id|>",)


def _add_specials(
    writer: gguf.GGUFWriter, tokens: list[str], types: list[int], tok_json: dict, tok_config: dict
) -> bool:
    """Special ids, add_bos/add_eos and the chat template; returns add_bos as written."""
    ids = {t: i for i, t in enumerate(tokens)}
    found: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad", "eot", "eom"):
        token = tok_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token in ids:
            found[role] = ids[token]
    if "unk" not in found and tok_json["model"].get("unk_token") in ids:
        found["unk"] = ids[tok_json["model"]["unk_token"]]
    # llama.cpp guesses end-of-turn tokens by text when the file names none; name them.
    for role, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS)):
        for text in texts:
            i = ids.get(text)
            if role not in found and i is not None and types[i] == gguf.TokenType.CONTROL:
                found[role] = i
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
        "eom": writer.add_eom_token_id,
    }
    for role, tid in found.items():
        adders[role](tid)

    template_bos, template_eos = _template_wraps(tok_json.get("post_processor"), tokens, found)
    add_bos = tok_config.get("add_bos_token")
    add_eos = tok_config.get("add_eos_token")
    adds_bos = bool(template_bos if add_bos is None else add_bos)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(bool(template_eos if add_eos is None else add_eos))

    template: Any = tok_config.get("chat_template")
    if template:
        # gguf-py writes the "default" entry of the list form as the chat template and the
        # others under tokenizer.chat_template.NAME, as llama.cpp's converter does.
        writer.add_chat_template(template)
    return adds_bos


def _template_wraps(
    post_processor: dict | None, tokens: list[str], found: dict[str, int]
) -> tuple[bool, bool]:
    """Whether a TemplateProcessing post-processor puts BOS first / EOS last on single input."""
    for step in _post_steps(post_processor):
        if step.get("type") != "TemplateProcessing":
            continue
        single = step.get("single", [])
        first = single[0].get("SpecialToken", {}).get("id") if single else None
        last = single[-1].get("SpecialToken", {}).get("id") if single else None

        def is_role(text: str | None, role: str) -> bool:
            return role in found and text == tokens[found[role]]

        return is_role(first, "bos"), is_role(last, "eos")
    return False, False


def _post_steps(post_processor: dict | None) -> list[dict]:
    if post_processor is None:
        return []
    if post_processor.get("type") == "Sequence":
        return list(post_processor.get("processors", []))
    return [post_processor]
