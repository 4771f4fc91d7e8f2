"""Import a GGUF file as a `SourceModel`: Hugging Face config, names, shapes and tokenizer files.

GGUF files hold llama.cpp's view of a model, which differs from the Hugging Face checkpoint it was
converted from in three ways this module undoes:

- tensor names (`blk.3.attn_q.weight` instead of `model.layers.3.self_attn.q_proj.weight`);
- dimension order (GGUF lists `ne0` first, the fastest-varying axis; numpy/HF list it last);
- for the "llama" architecture only, the rows of q_proj / k_proj (and their biases) are permuted
  so llama.cpp's rotary embedding can rotate adjacent pairs; HF rotates the two halves of each head.
  llama.cpp's converter does not permute "qwen2" / "qwen3", which use the half-split rotary itself.

Weights stay memory-mapped and are dequantized to float32 one tensor per `read()` call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from mlxedge.errors import MlxedgeError
from mlxedge.formats.gguf_names import hf_tensor_name, unpermute_qk
from mlxedge.formats.gguf_reader import GGUFFile, GGUFTensor, open_gguf
from mlxedge.formats.gguf_tokenizer import TokenizerKeys, tokenizer_files_from_gguf
from mlxedge.model import SourceModel, TensorInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Arch:
    """How one GGUF `general.architecture` maps onto a Hugging Face / mlx-lm model class."""

    model_type: str
    hf_class: str
    permuted_qk: bool  # llama.cpp's converter permuted q/k rows for rotary on adjacent pairs
    attention_bias: bool | None  # None: decided by whether the file holds attn_q.bias


ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", permuted_qk=True, attention_bias=None),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", permuted_qk=False, attention_bias=True),
    "qwen3": _Arch("qwen3", "Qwen3ForCausalLM", permuted_qk=False, attention_bias=False),
}

# Storage types that gguf-py can turn into float32, with the dtype name TensorInfo reports.
_FLOAT_NAMES = {QType.F32: "float32", QType.F16: "float16", QType.BF16: "bfloat16"}


def _dequantizable(qtype: QType) -> bool:
    return qtype in (QType.F32, QType.F16) or qtype in gguf.quants._type_traits


class GGUFTensorSource:
    """Tensors of one GGUF file under Hugging Face names, dequantized to float32 on read."""

    def __init__(self, path: Path, file: GGUFFile, n_head: int, n_kv_head: int, arch: _Arch):
        self._path = path
        self._file = file
        self._tensors: dict[str, GGUFTensor] = {}
        self._heads: dict[str, int] = {}  # HF name -> head count, for tensors to un-permute
        for tensor in file.tensors.values():
            name = hf_tensor_name(tensor.name)
            if name is None:
                continue
            self._tensors[name] = tensor
            if arch.permuted_qk and ".self_attn.q_proj." in name:
                self._heads[name] = n_head
            elif arch.permuted_qk and ".self_attn.k_proj." in name:
                self._heads[name] = n_kv_head

    def infos(self) -> list[TensorInfo]:
        """HF name, (out, in) shape and GGUF storage type of each tensor, in file order."""
        return [
            TensorInfo(name=name, shape=t.shape, dtype=_FLOAT_NAMES.get(t.type, t.type.name))
            for name, t in self._tensors.items()
        ]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [start, stop) of it) as float32 in Hugging Face layout.

        GGUF blocks are dequantized whole; a row range is cut from the full tensor.
        """
        full = self._read_full(name)
        return full if rows is None else full[rows[0] : rows[1]]

    def _read_full(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32 in Hugging Face layout.

        Args:
            name: a Hugging Face tensor name from `infos()`.

        Returns:
            A float32 array the caller owns, shape (out, in) for matrices.

        Raises:
            MlxedgeError: unknown name, or a storage type gguf-py cannot dequantize.
        """
        tensor = self._tensors.get(name)
        if tensor is None:
            raise MlxedgeError(f"no tensor named {name!r}", path=self._path)
        if not _dequantizable(tensor.type):
            raise MlxedgeError(
                f"tensor {tensor.name} has type {tensor.type.name}, which cannot be "
                "dequantized yet",
                path=self._path,
            )
        # dequantize returns a view for F32; copying detaches the result from the memory map.
        values = np.array(dequantize(self._file.data(tensor), tensor.type), dtype=np.float32)
        values = values.reshape(tensor.shape)
        if name in self._heads:
            values = unpermute_qk(values, self._heads[name])
        return values


def load_gguf(path: Path) -> SourceModel:
    """Open a GGUF file as a model: HF config, lazily dequantized tensors and tokenizer files.

    Args:
        path: a .gguf file with architecture llama, qwen2 or qwen3.

    Returns:
        A SourceModel whose weights read as float32 with Hugging Face names and shapes, whose
        config is a Hugging Face config.json for the matching mlx-lm model class, and whose
        side files are the rebuilt tokenizer files.

    Raises:
        MlxedgeError: the file is truncated or corrupt, its architecture, a tensor type or its
            vocabulary is not supported, or required metadata is missing (the key is named).
    """
    path = Path(path)
    file = open_gguf(path)
    metadata = file.metadata

    arch_name = _get(metadata, "general.architecture", path)
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise MlxedgeError(
            f"architecture {arch_name!r} is not supported; supported: "
            + ", ".join(sorted(ARCHITECTURES)),
            path=path,
        )
    _check_tensors(file, path)
    config = _build_config(metadata, arch_name, arch, file, path)
    try:
        side_files = tokenizer_files_from_gguf(metadata)
    except MlxedgeError as err:
        raise MlxedgeError(err.message, path=path, fix=err.fix) from err

    weights = GGUFTensorSource(
        path, file, config["num_attention_heads"], config["num_key_value_heads"], arch
    )
    return SourceModel(
        name=_display_name(metadata, path),
        origin=path.name,
        config=config,
        weights=weights,
        side_files=side_files,
        license=metadata.get("general.license"),
        base_model=_base_model(metadata),
        gguf_metadata={k: v for k, v in metadata.items() if not isinstance(v, list)},
        path=path,
    )


def _get(metadata: dict[str, Any], key: str, path: Path) -> Any:
    value = metadata.get(key)
    if value is None:
        raise MlxedgeError(f"missing metadata key {key}", path=path)
    return value


def _check_tensors(file: GGUFFile, path: Path) -> None:
    """Fail before any work on a tensor this importer cannot name or dequantize."""
    for tensor in file.tensors.values():
        if tensor.name == "rope_freqs.weight":
            # Llama-3-style rope scaling is stored as per-frequency factors; rebuilding the HF
            # rope_scaling block from them is not implemented.
            raise MlxedgeError(
                "tensor rope_freqs.weight (Llama 3 rope scaling) is not supported yet", path=path
            )
        if hf_tensor_name(tensor.name) is None:
            raise MlxedgeError(
                f"tensor {tensor.name} has no Hugging Face equivalent here", path=path
            )
        if not _dequantizable(tensor.type):
            raise MlxedgeError(
                f"tensor {tensor.name} has type {tensor.type.name}, which cannot be "
                "dequantized yet",
                path=path,
            )


def _build_config(
    metadata: dict[str, Any], arch_name: str, arch: _Arch, file: GGUFFile, path: Path
) -> dict[str, Any]:
    """A Hugging Face config.json from the `{arch}.*` hyperparameters."""

    def key(template: str) -> str:
        return template.format(arch=arch_name)

    def need(template: str) -> Any:
        return _get(metadata, key(template), path)

    llm, attn, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    hidden = int(need(llm.EMBEDDING_LENGTH))
    n_head = _per_layer_scalar(need(attn.HEAD_COUNT), key(attn.HEAD_COUNT), path)
    n_kv_head = _per_layer_scalar(
        metadata.get(key(attn.HEAD_COUNT_KV), n_head), key(attn.HEAD_COUNT_KV), path
    )
    head_dim = int(metadata.get(key(attn.KEY_LENGTH)) or hidden // n_head)
    rope_dim = metadata.get(key(rope.DIMENSION_COUNT))
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise MlxedgeError(
            f"partial rotary ({key(rope.DIMENSION_COUNT)} = {rope_dim}, head size {head_dim}) "
            "is not supported",
            path=path,
        )
    names = file.tensors
    tokens = _get(metadata, TokenizerKeys.TOKENS, path)
    vocab_size = len(tokens)
    embedding = names.get("token_embd.weight")
    if embedding is None:
        raise MlxedgeError("tensor token_embd.weight is missing", path=path)
    embed_rows = int(embedding.shape[0])
    if embed_rows != vocab_size:
        # mlx-lm sizes the embedding from vocab_size, so the tensor wins.
        logger.warning(
            "%s: %d tokens but %d embedding rows; using %d",
            path,
            vocab_size,
            embed_rows,
            embed_rows,
        )
        vocab_size = embed_rows

    rope_theta = metadata.get(key(rope.FREQ_BASE))
    if rope_theta is None:
        logger.warning("%s: no %s; using 10000, llama.cpp's default", path, key(rope.FREQ_BASE))
        rope_theta = 10000.0
    attention_bias = arch.attention_bias
    if attention_bias is None:
        attention_bias = "blk.0.attn_q.bias" in names

    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "hidden_size": hidden,
        "intermediate_size": int(need(llm.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": int(need(llm.BLOCK_COUNT)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "rms_norm_eps": _decimal(need(attn.LAYERNORM_RMS_EPS)),
        "rope_theta": _decimal(rope_theta),
        "max_position_embeddings": int(need(llm.CONTEXT_LENGTH)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": bool(attention_bias),
        "mlp_bias": False,
    }
    if (scaling := _rope_scaling(metadata, arch_name)) is not None:
        config["rope_scaling"] = scaling
    for role, meta_key in (("bos", TokenizerKeys.BOS_ID), ("eos", TokenizerKeys.EOS_ID)):
        if (tid := metadata.get(meta_key)) is not None:
            config[f"{role}_token_id"] = int(tid)
    return config


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not
    9.999999747378752e-06), which is how the source config.json wrote it."""
    return float(str(np.float32(value)))


def _per_layer_scalar(value: Any, key: str, path: Path) -> int:
    """Head counts may be stored per layer; the supported classes need them equal."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise MlxedgeError(f"per-layer {key} values differ; not supported", path=path)
        value = value[0]
    return int(value)


def _rope_scaling(metadata: dict[str, Any], arch_name: str) -> dict[str, Any] | None:
    """The HF rope_scaling block for linear or YaRN scaling, when the file states one."""
    rope = gguf.Keys.Rope
    kind = metadata.get(rope.SCALING_TYPE.format(arch=arch_name))
    factor = metadata.get(rope.SCALING_FACTOR.format(arch=arch_name))
    if kind in (None, "none") or factor is None:
        return None
    scaling: dict[str, Any] = {"type": kind, "rope_type": kind, "factor": _decimal(factor)}
    original = metadata.get(rope.SCALING_ORIG_CTX_LEN.format(arch=arch_name))
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _display_name(metadata: dict[str, Any], path: Path) -> str:
    parts = [metadata.get(f"general.{k}") for k in ("basename", "size_label", "finetune")]
    parts = [str(p) for p in parts if p]
    return "-".join(parts) if parts else path.stem


def _base_model(metadata: dict[str, Any]) -> str | None:
    """The first base model as "org/name" when the file records one."""
    url = metadata.get("general.base_model.0.repo_url")
    prefix = "https://huggingface.co/"
    if isinstance(url, str) and url.startswith(prefix):
        return url[len(prefix) :].strip("/")
    name = metadata.get("general.base_model.0.name")
    org = metadata.get("general.base_model.0.organization")
    if name and org:
        return f"{org}/{name}"
    return name or None
