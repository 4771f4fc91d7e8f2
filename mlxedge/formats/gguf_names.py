"""Hugging Face ↔ GGUF: tensor names and llama.cpp's q/k row order, for import and export alike."""

from __future__ import annotations

import re

import numpy as np

# GGUF tensor name (without "blk.N.") -> Hugging Face name (without "model.layers.N.").
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_TO_GGUF_BLOCK = {hf: gg for gg, hf in BLOCK_NAMES.items()}
_HF_TO_GGUF_GLOBAL = {hf: gg for gg, hf in GLOBAL_NAMES.items()}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor ("blk.0.attn_q.weight" ->
    "model.layers.0.self_attn.q_proj.weight"), or None when it is not one of ours."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _GGUF_BLOCK.fullmatch(gguf_name)
    if match is None or match.group(2) not in BLOCK_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor (the inverse of `hf_tensor_name`), or None."""
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    match = _HF_BLOCK.fullmatch(hf_name)
    if match is None or match.group(2) not in _HF_TO_GGUF_BLOCK:
        return None
    layer, part, kind = match.groups()
    return f"blk.{layer}.{_HF_TO_GGUF_BLOCK[part]}.{kind}"


def unpermute_qk(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (pairs -> halves within each head).

    llama.cpp stores each head's rows as (head_dim/2, 2) interleaved pairs; Hugging Face stores
    them as (2, head_dim/2) halves. Works on weights (rows, in) and biases (rows,).

    Args:
        rows: a q_proj or k_proj weight or bias in GGUF row order.
        n_head: number of heads of that projection (key/value heads for k_proj).

    Returns:
        The tensor in Hugging Face row order, same shape.
    """
    shape = rows.shape
    head_dim = shape[0] // n_head
    paired = rows.reshape(n_head, head_dim // 2, 2, *shape[1:])  # (H, D/2, 2, in)
    return paired.swapaxes(1, 2).reshape(shape)  # (H, 2, D/2, in) -> (H*D, in)


def permute_qk(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Apply llama.cpp's q/k row permutation (halves -> pairs): the inverse of `unpermute_qk`,
    what an export of a llama-style model must write."""
    shape = rows.shape
    head_dim = shape[0] // n_head
    halves = rows.reshape(n_head, 2, head_dim // 2, *shape[1:])  # (H, 2, D/2, in)
    return halves.swapaxes(1, 2).reshape(shape)  # (H, D/2, 2, in) -> (H*D, in)
