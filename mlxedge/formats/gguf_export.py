"""Write a model as a GGUF file llama.cpp loads: metadata, tokenizer and tensors.

This first version writes float tensors (F32/F16) and any single block type for the linear
weights; the llama.cpp file mixes (Q4_K_M and the like) and the CLI build on it. gguf-py's
`GGUFWriter` does the file layout (header, key/value pairs, aligned tensor data); what goes in is
decided here.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from ..archs import Role, arch_for
from ..errors import MlxedgeError
from .ggml_blocks import TYPES, quantize_rows
from .gguf_names import gguf_tensor_name, permute_qk
from .gguf_vocab import add_tokenizer

# llama-style rotary (rotate-half in Hugging Face) is stored permuted for llama.cpp's "norm" rope;
# qwen2/qwen3 use llama.cpp's "neox" rope, which reads Hugging Face's order as it is.
_PERMUTED = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def write_gguf(
    path: Path,
    name: str,
    config: dict,
    weights,
    tokenizer_json: bytes,
    tokenizer_config: dict,
    linear_type: str = "F32",
    pre: str = "gpt-2",
) -> None:
    """Write `weights` (a TensorSource under Hugging Face names) as a GGUF file.

    Norms and biases are F32; every other tensor (linears, embedding, head) is `linear_type`
    ("F32", "F16" or a block type of `ggml_blocks.TYPES`), falling back to F16 where a row does
    not divide into blocks.
    """
    arch = arch_for(config, "config.json")
    kind = arch.model_type
    gguf_arch = _GGUF_ARCH[kind]
    c = config
    n_head = int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // n_head)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(c["hidden_size"]))
    writer.add_block_count(int(c["num_hidden_layers"]))
    writer.add_feed_forward_length(int(c["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(int(c["vocab_size"]))
    writer.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    if c.get("rope_scaling"):
        raise MlxedgeError("rope scaling cannot be exported yet", fix="export a model without it")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(
        writer, int(config["vocab_size"]), json.loads(tokenizer_json), tokenizer_config, pre
    )

    for info in weights.infos():
        role = arch.role(info.name)
        if role == Role.DROP:
            continue
        out_name = gguf_tensor_name(info.name)
        if out_name is None:
            raise MlxedgeError(f"no GGUF name for tensor {info.name!r}")
        w = np.asarray(weights.read(info.name), dtype=np.float32)
        if _PERMUTED[kind] and info.name.endswith(("q_proj.weight", "q_proj.bias")):
            w = permute_qk(w, n_head)
        elif _PERMUTED[kind] and info.name.endswith(("k_proj.weight", "k_proj.bias")):
            w = permute_qk(w, n_kv)
        if role in (Role.NORM, Role.BIAS) or w.ndim == 1 or linear_type == "F32":
            writer.add_tensor(out_name, np.ascontiguousarray(w, dtype=np.float32))
        elif linear_type == "F16" or w.shape[-1] % TYPES[linear_type].block_size:
            writer.add_tensor(out_name, w.astype(np.float16))
        else:
            data = quantize_rows(w, linear_type)
            writer.add_tensor(out_name, data, raw_shape=data.shape, raw_dtype=QType[linear_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
