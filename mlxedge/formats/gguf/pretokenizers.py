"""llama.cpp's BPE pre-tokenizers: the one table GGUF import and export both read.

A GGUF file names its pre-tokenizer in `tokenizer.ggml.pre`; llama.cpp maps the name to a list of
split regexes and a few vocabulary flags (`llama_vocab::impl::load` and the `llm_tokenizer_bpe`
constructor in src/llama-vocab.cpp, llama.cpp 0c1e570 as vendored by llama-cpp-python 0.3.36).
Each row of `TABLE` below is one branch of that mapping: the names it accepts, the regexes (each
splits the pieces the one before left, spelled as llama.cpp spells them with control characters
escaped), and the flags the branch sets.

The importer (tokenizer_import) rebuilds a tokenizer.json from a row; the exporter
(tokenizer_export) matches a tokenizer.json's split definition against the rows. Rows that split
text the same way (same regexes and merge mode) are one behaviour; export writes the first name
of the first such row, so the order of rows and of names within a row matters.
"""

from __future__ import annotations

from dataclasses import dataclass

# ----------------------------------------------------------------------------------- regexes

# llama.cpp spells the contractions with explicit case classes: its regex engine has no inline
# (?i:...) groups.
CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN35 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT = r"\p{N}"  # one digit per piece
DIGITS = r"\p{N}+"
# Tekken's \p{Lu}/\p{Ll} classes, which llama.cpp's regex engine emulates with lookaheads.
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
    + CONTRACTIONS
    + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED_WORDS = (  # Hugging Face's cased-word classes, which llama.cpp reads as \p{L}
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + CONTRACTIONS
    + r"?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + CONTRACTIONS
    + "?"
)
_JAIS2 = (
    CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
    r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_PUNCT_WORDS = (  # DeepSeek V3 / Hunyuan / AFMoE main split
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
)
_CJK_KANA = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# DeepSeek's classes, escaped so no editor or tool can normalize the characters.
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5"
    "\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3"
    "\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115"
    "\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
_YOUTU_CJK = (
    "[\uac00-\ud7a3\u3131-\u318e]+"
    "|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+"
    "|[\u3105-\u312f]+|" + _CJK_KANA
)
_AFMOE_CJK = (
    "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f"
    "\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f"
    "\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+"
)
_NEWLINES = r"[^\n]+|[\n]+"

_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, DIGITS, r"[0-9][0-9][0-9]")
_SMOLLM = (DIGIT, GPT2)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    _DEEPSEEK_LETTERS,
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _DEEPSEEK_CJK,
    DIGITS,
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, DIGIT)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    _CJK_KANA,
    _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_SPARK2_5 = (
    r"\p{N}{1,3}",
    _CJK_KANA,
    _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
    DIGIT,
)
_CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    DIGIT,
    r"[\p{P}!-/:-@\[-`{-~]",
    GPT2,
)

# ------------------------------------------------------------------------------------- table

# Why the importer cannot rebuild some rows as a tokenizers pipeline.
_RAW_UTF8 = "BPE over raw UTF-8 with escaped whitespace (no byte-level mapping)"
_CUSTOM_SPLIT = "a split llama.cpp implements in C++, not as a regex"
_CASE_CLASSES = r"case classes (\p{Lu}, \p{Ll}) that llama.cpp's regex engine reads as \p{L}"


@dataclass(frozen=True)
class PreTokenizer:
    """One branch of llama.cpp's `tokenizer.ggml.pre` mapping.

    Attributes:
        names: the `tokenizer.ggml.pre` values of the branch.
        regexes: split regexes in the order llama.cpp applies them.
        ignore_merges: llama.cpp looks a whole pre-token up in the vocabulary before merging.
        add_bos: the default of add_bos_token when the GGUF does not say.
        clean_spaces: llama.cpp removes spaces before punctuation when detokenizing.
        add_sep: llama.cpp appends the SEP token when the GGUF does not say otherwise.
        unsupported: why mlxedge cannot rebuild this branch as a Hugging Face tokenizer; None
            where it can.
    """

    names: tuple[str, ...]
    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False
    clean_spaces: bool = True
    add_sep: bool = False
    unsupported: str | None = None

    @property
    def behaviour(self) -> tuple[tuple[str, ...], bool]:
        """What decides how text is split into tokens: the regexes and the merge mode."""
        return self.regexes, self.ignore_merges


def _row(*names: str, regexes: tuple[str, ...], **flags) -> PreTokenizer:
    return PreTokenizer(names, regexes, **flags)


# The first row of each behaviour is the one export writes (see the module docstring).
TABLE: tuple[PreTokenizer, ...] = (
    _row("default", regexes=_DEFAULT),
    _row("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
         "a.x-4.0", "mellum", "modern-bert", regexes=(GPT2,)),
    _row("mpt", regexes=(GPT2,)),
    _row("olmo", regexes=(GPT2,)),
    _row("jais", regexes=(GPT2,)),
    _row("exaone4", regexes=(GPT2,)),
    _row("trillion", regexes=(GPT2,), clean_spaces=False),
    _row("granite-docling", regexes=(GPT2,), clean_spaces=False),
    _row("jina-v1-en", "jina-v2-code", "roberta-bpe", regexes=(GPT2,), add_sep=True,
         unsupported="llama.cpp appends a SEP token (add_sep), which the import does not add"),
    _row("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", regexes=(LLAMA3,), ignore_merges=True, add_bos=True),
    _row("glm4", "glm5", regexes=(LLAMA3,), ignore_merges=True),
    _row("smaug-bpe", regexes=(LLAMA3,)),
    _row("dbrx", regexes=(LLAMA3,)),
    _row("chatglm-bpe", regexes=(LLAMA3,)),
    _row("jais-2", regexes=(_JAIS2,)),
    _row("minicpm5", regexes=(r"\p{N}{1,3}", LLAMA3.replace(r"\p{N}{1,3}", DIGITS)),
         ignore_merges=True),
    _row("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", regexes=(QWEN2,), clean_spaces=False),
    _row("hunyuan", regexes=(QWEN2,), clean_spaces=False),
    _row("grok-2", regexes=(QWEN2,), clean_spaces=False),
    _row("solar-open", regexes=(QWEN2,), clean_spaces=False),
    _row("stablelm2", regexes=(QWEN2,)),
    _row("megrez", regexes=(QWEN2,)),
    _row("laguna", regexes=(_NEWLINES, QWEN2), clean_spaces=False),
    _row("qwen35", regexes=(QWEN35,), clean_spaces=False),
    _row("ufakzeka", regexes=(QWEN2.removeprefix(CONTRACTIONS + "|"),), clean_spaces=False),
    _row("seed-coder", clean_spaces=False, regexes=(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    )),
    _row("bailingmoe", "bailingmoe2", "llada-moe", clean_spaces=False, regexes=(
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    )),
    _row("exaone-moe", regexes=(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
    )),
    _row("smollm", regexes=_SMOLLM, clean_spaces=False),
    _row("command-r", regexes=_SMOLLM, clean_spaces=False),
    _row("starcoder", regexes=_SMOLLM),
    _row("refact", regexes=_SMOLLM),
    _row("codeshell", regexes=_SMOLLM),
    _row("exaone", regexes=_SMOLLM),
    _row("minerva-7b", regexes=_SMOLLM),
    _row("mellum2", regexes=_SMOLLM),
    _row("falcon", regexes=(r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]")),
    _row("tekken", regexes=(TEKKEN,), ignore_merges=True, add_bos=True, clean_spaces=False),
    _row("gpt-4o", "llama4", "kanana2", "talkie", regexes=(_GPT4O,), clean_spaces=False),
    _row("minimax-m2", regexes=(_GPT4O,), clean_spaces=False),
    _row("granite-embed-multi-97m", regexes=(_GRANITE_EMB_MULTI,), ignore_merges=True,
         clean_spaces=False),
    _row("deepseek-llm", regexes=_DEEPSEEK_LLM, clean_spaces=False),
    _row("deepseek-coder", regexes=_DEEPSEEK_CODER, clean_spaces=False),
    _row("deepseek-v3", regexes=_DEEPSEEK_V3, clean_spaces=False),
    _row("hunyuan-dense", regexes=_DEEPSEEK_V3, clean_spaces=False),
    _row("hy_v4", regexes=_DEEPSEEK_V3, clean_spaces=False),
    _row("joyai-llm", regexes=_DEEPSEEK_V3, clean_spaces=False),
    _row("spark2_5", regexes=_SPARK2_5, clean_spaces=False),
    _row("youtu", regexes=(_YOUTU_CJK, _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+"), ignore_merges=True, clean_spaces=False,
         unsupported=_CASE_CLASSES),
    _row("poro-chat", regexes=(_PORO,), clean_spaces=False),
    _row("bloom", regexes=(_PORO,)),
    _row("gpt3-finnish", regexes=(_PORO,)),
    _row("viking", regexes=(_PORO, DIGIT), clean_spaces=False),
    _row("chameleon", regexes=_CHAMELEON, add_bos=True, clean_spaces=False),
    _row("superbpe", regexes=(DIGITS, r"(?=(\d{3})+(?!\d))"), clean_spaces=False),
    _row("tiny_aya", "cohere2moe", clean_spaces=False, unsupported=_CUSTOM_SPLIT, regexes=(
        r"\d{1,3}(?=(?:\d{3})*\b)",
        _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    )),
    _row("kimi-k2", regexes=(r"\p{Han}+",), clean_spaces=False, unsupported=_CUSTOM_SPLIT),
    _row("afmoe", clean_spaces=False, unsupported=_CUSTOM_SPLIT, regexes=(
        r"\p{AFMoE_digits}",
        _AFMOE_CJK,
        _PUNCT_WORDS + r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    )),
    _row("gemma4", "granite-embed-multi-311m", regexes=(_NEWLINES,), unsupported=_RAW_UTF8),
    _row("sarvam-moe", regexes=(_NEWLINES,), clean_spaces=False, unsupported=_RAW_UTF8),
    _row("whitespace", regexes=(r"\S+",), unsupported=_RAW_UTF8),
)  # fmt: skip

# `tokenizer.ggml.pre` name -> its row; every name llama.cpp accepts, and no other.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {name: row for row in TABLE for name in row.names}


def _canonical_names() -> dict[tuple[tuple[str, ...], bool], str]:
    names: dict[tuple[tuple[str, ...], bool], str] = {}
    for row in TABLE:
        if row.unsupported is None:
            names.setdefault(row.behaviour, row.names[0])
    return names


# Behaviour -> the name export writes for it, for the rows the importer can rebuild.
CANONICAL = _canonical_names()


def canonical_name(name: str) -> str | None:
    """The name export writes for the behaviour of `name`; None if the import cannot rebuild it."""
    row = PRE_TOKENIZERS.get(name)
    if row is None or row.unsupported is not None:
        return None
    return CANONICAL[row.behaviour]
