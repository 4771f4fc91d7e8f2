"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF tokenizer metadata."""

from __future__ import annotations

import gguf

from ..errors import MlxedgeError

_SPECIAL_LOOKING = ("<|", "<｜", "<pad>", "<mask>", "<unused")


def add_tokenizer(
    writer: gguf.GGUFWriter, vocab_size: int, tok_json: dict, tok_config: dict, pre: str
) -> None:
    """A byte-level BPE tokenizer as tokenizer.ggml.* (model "gpt2")."""
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise MlxedgeError(
            f"tokenizer model {model.get('type')!r} cannot be exported yet",
            fix="byte-level BPE tokenizers are supported",
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok_json.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            special = added.get("special") or added["content"].startswith(_SPECIAL_LOOKING)
            tokens[i] = added["content"]
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("unk_token", writer.add_unk_token_id),
    ):
        token = tok_config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token in ids:
            add(ids[token])
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
