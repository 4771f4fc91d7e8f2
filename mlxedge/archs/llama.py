"""Llama (Llama 2/3, SmolLM, TinyLlama, ...): the decoder the other modules here refine.

Token embedding; per block RMSNorm → attention with rotary embeddings (Hugging Face's
rotate-half layout; theta and scaling from the config) and grouped KV heads under a causal mask
→ residual → RMSNorm → SwiGLU MLP → residual; final RMSNorm; the output head (the embedding when
tied). `attention_bias` puts biases on q, k, v and o; `mlp_bias` on the MLP's projections.

In GGUF ("llama" architecture) the q and k rows are stored permuted for llama.cpp's rotary, which
rotates adjacent pairs (`TensorEntry.gguf_heads`), and Llama 3.1-style rope scaling travels as a
`rope_freqs` tensor of per-frequency divisors.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import gguf
import numpy as np

from ..errors import MlxedgeError
from .ops import Ops, Value
from .spec import LIMITS, Kind, ModelSpec, Role, TensorEntry, rope_inv_freq

_ROPE_FREQS = "rope_freqs.weight"


@functools.lru_cache(maxsize=8)
def _name_map(arch: gguf.MODEL_ARCH, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's Hugging Face <-> GGUF name map (tens of milliseconds to build: built once)."""
    return gguf.get_tensor_name_map(arch, n_layers)


class Llama:
    """model_type "llama", and the base of the llama-like decoders.

    Args:
        config: a Hugging Face config.json's contents.
        where: the file the config came from, named in errors.

    Raises:
        MlxedgeError: a required key is missing or the geometry does not add up.
    """

    model_type: ClassVar[str] = "llama"
    hf_class: ClassVar[str] = "LlamaForCausalLM"
    gguf_arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.LLAMA
    # llama.cpp's "norm" rotary rotates adjacent pairs: q/k rows are stored permuted for it.
    gguf_permuted_qk: ClassVar[bool] = True
    required_keys: ClassVar[tuple[str, ...]] = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    )
    # Hugging Face's defaults for the config class (LlamaConfig).
    defaults: ClassVar[dict[str, Any]] = {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }

    def __init__(self, config: dict, where: str = "config.json") -> None:
        self.config = config
        self.where = where
        missing = [k for k in self.required_keys if k not in config]
        if missing:
            raise MlxedgeError(
                f"config.json lacks {', '.join(missing)}, "
                f"required for model_type {self.model_type!r}",
                path=where,
                fix="use the model's original config.json",
            )
        self.spec = self._spec()
        self._table: list[TensorEntry] | None = None
        self._by_name: dict[str, TensorEntry] = {}
        self._by_gguf: dict[str, TensorEntry] = {}

    # ----------------------------------------------------------------------------- the spec

    def _get(self, key: str) -> Any:
        value = self.config.get(key)
        return self.defaults.get(key) if value is None else value

    def _bad(self, key: str, value: Any, what: str) -> MlxedgeError:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        return MlxedgeError(
            f"{key} is {shown}, {what}", path=self.where, fix="use the model's original config.json"
        )

    def _int(self, key: str, value: Any = None) -> int:
        """A positive whole number within what any real model uses (`spec.LIMITS`)."""
        value = self._get(key) if value is None else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 2048.0: some converters write whole numbers as floats
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self._bad(key, value, "not a positive whole number")
        limit = LIMITS.get(key)
        if limit is not None and value > limit:
            raise self._bad(key, value, f"beyond the {limit:,} any real model has")
        return value

    def _float(self, key: str) -> float:
        """A positive finite number."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, value, "not a number")
        if not math.isfinite(value) or value <= 0:
            raise self._bad(key, value, "not a positive finite number")
        return float(value)

    def _bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "not true or false")
        return value

    def _head_dim(self) -> int:
        if self.config.get("head_dim") is not None:
            return self._int("head_dim")
        return self._derived_head_dim()

    def _derived_head_dim(self) -> int:
        """hidden_size / num_attention_heads, which must divide."""
        hidden, heads = self._int("hidden_size"), self._int("num_attention_heads")
        if hidden % heads:
            raise MlxedgeError(
                f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                path=self.where,
                fix="use the model's original config.json",
            )
        return hidden // heads

    def _windows(self, n_layers: int) -> tuple[int | None, ...]:
        """The sliding window of each block (None: full attention). Llama has none."""
        return (None,) * n_layers

    def _biases(self) -> tuple[bool, bool, bool]:
        """(q/k/v, o, MLP) biases."""
        attention = self._bool("attention_bias")
        return attention, attention, self._bool("mlp_bias")

    # A norm before attention (input_layernorm); OLMo 2 normalizes the outputs instead.
    _pre_norms: ClassVar[bool] = True
    # Trained activations overflow float16 (Gemma's residual stream): an executor computing in
    # float16 keeps the residual stream in float32.
    float32_residual: ClassVar[bool] = False
    # rope scaling types beyond no scaling, linear and llama3 that this model type uses
    rope_kinds: ClassVar[tuple[str, ...]] = ()

    def _qk_norm(self) -> bool:
        return False

    def _spec(self) -> ModelSpec:
        n_heads = self._int("num_attention_heads")
        n_kv = self._int("num_key_value_heads", self.config.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise MlxedgeError(
                f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}",
                path=self.where,
                fix="use the model's original config.json",
            )
        head_dim = self._head_dim()
        if head_dim % 2:
            raise MlxedgeError(f"head size {head_dim} is not an even number", path=self.where,
                               fix="use the model's original config.json")  # fmt: skip
        n_layers = self._int("num_hidden_layers")
        qkv_bias, o_bias, mlp_bias = self._biases()
        activation = self._activation()
        scaling = self.config.get("rope_scaling") or None
        if scaling is not None and not isinstance(scaling, dict):
            raise self._bad("rope_scaling", scaling, "not an object")
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind in ("longrope", "su") and kind not in self.rope_kinds:
            raise self._bad("rope_scaling", scaling, f"of a type {self.model_type} does not use")
        try:  # an unknown or malformed rope scaling is refused here, before anything is written
            rope_inv_freq(self._float("rope_theta"), scaling, head_dim)
        except MlxedgeError as e:
            raise MlxedgeError(e.message, path=self.where, fix=e.fix) from None
        return ModelSpec(
            model_type=self.model_type,
            hidden_size=self._int("hidden_size"),
            intermediate_size=self._int("intermediate_size"),
            vocab_size=self._int("vocab_size"),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=self._float("rms_norm_eps"),
            rope_theta=self._float("rope_theta"),
            rope_scaling=scaling,
            max_position_embeddings=self._int("max_position_embeddings"),
            tied=self._bool("tie_word_embeddings"),
            windows=self._windows(n_layers),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=self._qk_norm(),
            activation=activation,
        )

    def _activation(self) -> str:
        """The MLP's gate activation, as `ModelSpec.activation` names it."""
        act = self.config.get("hidden_act", "silu")
        if act != "silu":
            raise MlxedgeError(f"hidden_act {act!r} is not supported (silu is)", path=self.where)
        return "silu"

    @property
    def tied(self) -> bool:
        return self.spec.tied

    # ----------------------------------------------------------------------- the tensor table

    def tensors(self) -> list[TensorEntry]:
        """Every parameter of the model, in the order Hugging Face checkpoints store them."""
        if self._table is None:
            self._table = list(self._entries())
            self._by_name = {e.name: e for e in self._table}
            self._by_gguf = {e.gguf_name: e for e in self._table}
        return self._table

    def _entry(self, name: str, shape, role: Role, layer: int | None = None) -> TensorEntry:
        """One row of the tensor table: its GGUF name and kind from gguf-py's name map."""
        s = self.spec
        found = _name_map(self.gguf_arch, s.n_layers).get_type_and_name(
            name, try_suffixes=(".weight", ".bias"))  # fmt: skip
        if found is None:  # pragma: no cover - a table error, caught by the tests
            raise AssertionError(f"gguf-py has no {self.gguf_arch.name} name for {name}")
        kind, gguf_name = found
        heads = None
        if self.gguf_permuted_qk and kind in (Kind.ATTN_Q, Kind.ATTN_K):
            heads = s.n_heads if kind == Kind.ATTN_Q else s.n_kv_heads
        return TensorEntry(name, tuple(shape), kind, role, layer, gguf_name, heads)

    def _entries(self):
        s = self.spec
        entry = self._entry
        d, ff, hd = s.hidden_size, s.intermediate_size, s.head_dim
        q_rows, kv_rows = s.n_heads * hd, s.n_kv_heads * hd

        yield entry("model.embed_tokens.weight", (s.vocab_size, d), Role.EMBEDDING)
        for i in range(s.n_layers):
            p = f"model.layers.{i}."
            if self._pre_norms:
                yield entry(p + "input_layernorm.weight", (d,), Role.NORM, i)
            for x, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                yield entry(p + f"self_attn.{x}_proj.weight", (rows, d), Role.LINEAR, i)
            if s.qkv_bias:
                for x, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                    yield entry(p + f"self_attn.{x}_proj.bias", (rows,), Role.BIAS, i)
            if s.qk_norm:
                yield entry(p + "self_attn.q_norm.weight", (hd,), Role.NORM, i)
                yield entry(p + "self_attn.k_norm.weight", (hd,), Role.NORM, i)
            yield entry(p + "self_attn.o_proj.weight", (d, q_rows), Role.LINEAR, i)
            if s.o_bias:
                yield entry(p + "self_attn.o_proj.bias", (d,), Role.BIAS, i)
            yield entry(p + "post_attention_layernorm.weight", (d,), Role.NORM, i)
            for x, shape in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff))):
                yield entry(p + f"mlp.{x}_proj.weight", shape, Role.LINEAR, i)
                if s.mlp_bias:
                    yield entry(p + f"mlp.{x}_proj.bias", shape[:1], Role.BIAS, i)
        yield entry("model.norm.weight", (d,), Role.NORM)
        if not s.tied:
            yield entry("lm_head.weight", (s.vocab_size, d), Role.HEAD)

    def entry(self, name: str) -> TensorEntry | None:
        """The table's entry for a Hugging Face tensor name, None when it is not a parameter."""
        self.tensors()
        return self._by_name.get(name)

    def role(self, name: str) -> Role:
        """What a checkpoint tensor does; a copy of a tied head or a rotary table is dropped.

        Raises:
            MlxedgeError: the tensor belongs to no model of this type.
        """
        entry = self.entry(name)
        if entry is not None:
            return entry.role
        if name.endswith("rotary_emb.inv_freq") or (self.spec.tied and name == "lm_head.weight"):
            return Role.DROP
        raise MlxedgeError(
            f"tensor {name!r} is not part of a {self.model_type!r} model",
            path=self.where,
            fix="check that config.json's model_type matches the weights",
        )

    # ----------------------------------------------------------------------- the forward pass

    def forward(self, ops: Ops, ids: Value, positions: Value, first: int = 0) -> Value:
        """Next-token logits at positions first.. of one sequence (see `archs.ops`)."""
        x = self.embed(ops, ids)
        context = self.context(ops, positions)
        for i in range(self.spec.n_layers):
            x = self.block(ops, i, x, context)
        return self.head(ops, x, first)

    def embed(self, ops: Ops, ids: Value) -> Value:
        x = ops.embedding("model.embed_tokens.weight", ids)
        m = self.spec.embedding_multiplier
        return x if m == 1.0 else ops.scale(x, m)

    def residual(self, ops: Ops, x: Value, branch: Value) -> Value:
        """x + branch, the branch scaled by the residual multiplier where there is one."""
        m = self.spec.residual_multiplier
        return ops.add(x, branch if m == 1.0 else ops.scale(branch, m))

    def context(self, ops: Ops, positions: Value) -> dict:
        """What every block needs from the positions: rotary tables (one more where sliding
        layers have a rotary base of their own) and one mask per window."""
        s = self.spec
        masks = {w: ops.causal_mask(positions, w) for w in sorted(set(s.windows), key=str)}
        rope = {"global": ops.rope_tables(positions, s.inv_freq())}
        local = [i for i, w in enumerate(s.windows) if w]
        if s.local_rope_theta is not None and local:
            rope["local"] = ops.rope_tables(positions, s.inv_freq(local[0]))
        return {"rope": rope, "masks": masks}

    def rope_of(self, context: dict, i: int) -> Value:
        """Block `i`'s rotary tables."""
        local = self.spec.local_rope_theta is not None and self.spec.windows[i]
        return context["rope"]["local" if local else "global"]

    def heads(self, ops: Ops, q: Value, k: Value, v: Value) -> tuple[Value, Value, Value]:
        """Projected queries, keys and values (tokens, features) as (heads, tokens, dim)."""
        s = self.spec
        return (ops.split_heads(q, s.n_heads, s.head_dim),
                ops.split_heads(k, s.n_kv_heads, s.head_dim),
                ops.split_heads(v, s.n_kv_heads, s.head_dim))  # fmt: skip

    def attend(self, ops: Ops, i: int, q: Value, k: Value, v: Value, context: dict) -> Value:
        """Block `i`'s attention over its heads: rotary on q and k, the block's mask, scale and
        soft-cap; the heads merged back to (tokens, features)."""
        s = self.spec
        rope = self.rope_of(context, i)
        q, k = ops.rope(q, rope), ops.rope(k, rope)
        mask = context["masks"][s.windows[i]]
        return ops.merge_heads(ops.attention(i, q, k, v, mask, s.attention_scale, s.attn_softcap))

    def block(self, ops: Ops, i: int, x: Value, context: dict) -> Value:
        """Decoder block `i`: attention, then the MLP, each around a residual."""
        s, p = self.spec, f"model.layers.{i}."
        h = ops.rms_norm(x, p + "input_layernorm.weight", s.rms_norm_eps)
        q, k, v = self.heads(ops, *(ops.linear(h, p + f"self_attn.{n}_proj", s.qkv_bias)
                                    for n in "qkv"))  # fmt: skip
        if s.qk_norm:
            q = ops.rms_norm(q, p + "self_attn.q_norm.weight", s.rms_norm_eps)
            k = ops.rms_norm(k, p + "self_attn.k_norm.weight", s.rms_norm_eps)
        attended = self.attend(ops, i, q, k, v, context)
        x = self.residual(ops, x, ops.linear(attended, p + "self_attn.o_proj", s.o_bias))
        h = ops.rms_norm(x, p + "post_attention_layernorm.weight", s.rms_norm_eps)
        gate = ops.linear(h, p + "mlp.gate_proj", s.mlp_bias)
        up = ops.linear(h, p + "mlp.up_proj", s.mlp_bias)
        return self.residual(ops, x, ops.linear(ops.mul(ops.silu(gate), up), p + "mlp.down_proj",
                                                s.mlp_bias))  # fmt: skip

    def head(self, ops: Ops, x: Value, first: int = 0) -> Value:
        """The final norm and the output head; logits scaled (Granite) or soft-capped (Gemma 2)
        where the spec says."""
        s = self.spec
        x = ops.rms_norm(ops.tail(x, first), "model.norm.weight", s.rms_norm_eps, s.norm_offset)
        logits = ops.linear(x, "model.embed_tokens" if s.tied else "lm_head")
        if s.logits_scaling != 1.0:
            logits = ops.scale(logits, 1.0 / s.logits_scaling)
        return logits if s.final_softcap is None else ops.soft_cap(logits, s.final_softcap)

    # ------------------------------------------------------------------------ configs written

    def output_config(self) -> dict:
        """The config to write beside converted weights: the source's, with the tie stated (mlx-lm's
        llama default is tied, Hugging Face's untied)."""
        out = dict(self.config)
        out["tie_word_embeddings"] = self.spec.tied
        return out

    # ---------------------------------------------------------------------------------- GGUF

    @classmethod
    def gguf_arch_name_of(cls) -> str:
        """The `general.architecture` of this class's GGUF files ("llama", "qwen2", ...)."""
        return gguf.MODEL_ARCH_NAMES[cls.gguf_arch]

    @property
    def gguf_arch_name(self) -> str:
        return self.gguf_arch_name_of()

    def gguf_entry(self, gguf_name: str, path) -> TensorEntry:
        """The table's entry for a GGUF tensor name.

        Raises:
            MlxedgeError: a tensor the import cannot place (named, with the file).
        """
        self.tensors()
        entry = self._by_gguf.get(gguf_name)
        if entry is not None:
            return entry
        if gguf_name == _ROPE_FREQS:
            # Rebuilding Hugging Face's rope_scaling block from per-frequency factors is not done.
            raise MlxedgeError(
                f"tensor {_ROPE_FREQS} (Llama 3 rope scaling) is not supported yet", path=path
            )
        raise MlxedgeError(f"tensor {gguf_name} has no Hugging Face equivalent here", path=path)

    # llama.cpp's loader for this architecture falls back to the embedding when output.weight is
    # missing (a tied model); where it does not, the writer stores the embedding again as the head.
    gguf_tied_fallback: ClassVar[bool] = True

    def gguf_head_copy(self) -> TensorEntry | None:
        """The entry of an output.weight a GGUF file must carry although the model is tied (the
        embedding written again, as llama.cpp's converter does for such architectures), or None."""
        if not self.spec.tied or self.gguf_tied_fallback:
            return None
        return self._entry("lm_head.weight", (self.spec.vocab_size, self.spec.hidden_size),
                           Role.HEAD)  # fmt: skip

    def llama_cpp_is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B (which some mixes give more bits): 80 layers with grouped KV
        heads (80 without them is its 65B)."""
        return self.spec.n_layers == 80 and self.spec.n_heads != self.spec.n_kv_heads

    def add_gguf_hyperparameters(self, writer: gguf.GGUFWriter) -> None:
        """The `{arch}.*` keys llama.cpp reads to build the model.

        Raises:
            MlxedgeError: rope scaling GGUF cannot express.
        """
        s = self.spec
        writer.add_context_length(s.max_position_embeddings)
        writer.add_embedding_length(s.hidden_size)
        writer.add_block_count(s.n_layers)
        writer.add_feed_forward_length(s.intermediate_size)
        writer.add_head_count(s.n_heads)
        writer.add_head_count_kv(s.n_kv_heads)
        writer.add_key_length(s.head_dim)
        writer.add_value_length(s.head_dim)
        self._add_gguf_vocab_and_rope_dims(writer)
        writer.add_rope_freq_base(s.rope_theta)
        writer.add_layer_norm_rms_eps(s.rms_norm_eps)
        self._add_gguf_rope_scaling(writer)

    def _add_gguf_rope_scaling(self, writer: gguf.GGUFWriter) -> None:
        """The rope scaling keys (Llama 3.1's travels as a tensor, `gguf_computed_tensors`)."""
        scaling = self.spec.rope_scaling or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            if not isinstance(scaling.get("factor"), (int, float)):
                raise MlxedgeError("linear rope scaling without a numeric factor",
                                   path=self.where, fix="set rope_scaling.factor")  # fmt: skip
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind not in ("default", "llama3", None):
            raise MlxedgeError(
                f"rope scaling {kind!r} cannot be exported to GGUF yet",
                path=self.where,
                fix="supported: no scaling, 'linear' and 'llama3'",
            )

    def _add_gguf_vocab_and_rope_dims(self, writer: gguf.GGUFWriter) -> None:
        # llama.cpp's converter states these for its llama architecture.
        writer.add_rope_dimension_count(self.spec.head_dim)
        writer.add_vocab_size(self.spec.vocab_size)

    def gguf_computed_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors a GGUF file carries that no checkpoint has: Llama 3.1-style rope scaling's
        per-frequency divisors (`rope_freqs.weight`), computed in float32 in the order llama.cpp's
        converter computes them, so both write the same bytes."""
        scaling = self.spec.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) != "llama3":
            return []
        factor = float(scaling.get("factor", 8.0))
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        head_dim, f32 = self.spec.head_dim, np.float32
        inv = f32(1) / f32(self.spec.rope_theta) ** (
            np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
        )
        wavelen = f32(2 * math.pi) / inv
        smooth = (f32(old_len) / wavelen - f32(low)) / f32(high - low)
        medium = f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)
        divisor = np.where(
            wavelen < f32(old_len / high),
            f32(1),
            np.where(wavelen > f32(old_len / low), f32(factor), medium),
        )
        return [(_ROPE_FREQS, divisor.astype(f32))]

    # GGUF -> Hugging Face: the keys this class's GGUF files hold, as a config.json.

    @classmethod
    def config_from_gguf(cls, meta: dict, shapes: dict[str, tuple[int, ...]], path) -> dict:
        """A Hugging Face config.json for this class from a GGUF file's metadata.

        Args:
            meta: the file's metadata.
            shapes: GGUF tensor name -> numpy shape (rows first).
            path: the file, named in errors.

        Raises:
            MlxedgeError: a required key is missing (named), or a layout this class cannot hold.
        """
        return _config_from_gguf(cls, meta, shapes, path)

    @classmethod
    def attention_bias_from_gguf(cls, shapes: dict[str, tuple[int, ...]]) -> dict:
        """Config keys that say which projections carry biases, read from the file's tensors."""
        return {"attention_bias": "blk.0.attn_q.bias" in shapes, "mlp_bias": False}


_GGUF_FIX = "the file is damaged or was written by a faulty converter; convert the model again"


def _config_from_gguf(cls, meta: dict, shapes: dict, path) -> dict:
    import logging

    from ..formats.gguf.tokenizer_import import TokenizerKeys

    log = logging.getLogger(__name__)
    arch_name = gguf.MODEL_ARCH_NAMES[cls.gguf_arch]

    def key(template: str) -> str:
        return template.format(arch=arch_name)

    def need(template: str) -> Any:
        value = meta.get(key(template))
        if value is None:
            raise MlxedgeError(f"missing metadata key {key(template)}", path=path, fix=_GGUF_FIX)
        return value

    def whole(name: str, value: Any) -> int:
        """A metadata value that must be a positive integer (named, with the file, if not)."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise MlxedgeError(f"metadata key {name} is {shown}, not a positive integer",
                               path=path, fix=_GGUF_FIX)  # fmt: skip
        return int(value)

    def number(name: str, value: Any) -> float:
        return gguf_positive_number(name, value, path)

    def per_layer(value: Any, name: str) -> int:
        if isinstance(value, list):  # head counts may be stored per layer
            if not value or len(set(value)) != 1:
                raise MlxedgeError(f"per-layer {name} values differ; not supported", path=path)
            value = value[0]
        return whole(name, value)

    llm, attn, rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    hidden = whole(key(llm.EMBEDDING_LENGTH), need(llm.EMBEDDING_LENGTH))
    n_head = per_layer(need(attn.HEAD_COUNT), key(attn.HEAD_COUNT))
    n_kv = per_layer(meta.get(key(attn.HEAD_COUNT_KV), n_head), key(attn.HEAD_COUNT_KV))
    if n_head % n_kv:
        raise MlxedgeError(
            f"metadata key {key(attn.HEAD_COUNT)} = {n_head} is not a multiple of "
            f"{key(attn.HEAD_COUNT_KV)} = {n_kv}",
            path=path,
            fix=_GGUF_FIX,
        )
    stated = meta.get(key(attn.KEY_LENGTH))
    head_dim = whole(key(attn.KEY_LENGTH), stated) if stated is not None else hidden // n_head
    rope_dim = meta.get(key(rope.DIMENSION_COUNT))
    if rope_dim is not None and whole(key(rope.DIMENSION_COUNT), rope_dim) != head_dim:
        raise MlxedgeError(
            f"partial rotary ({key(rope.DIMENSION_COUNT)} = {rope_dim}, head size {head_dim}) "
            "is not supported",
            path=path,
        )
    tokens = meta.get(TokenizerKeys.LIST)
    if tokens is None:
        raise MlxedgeError(f"missing metadata key {TokenizerKeys.LIST}", path=path)
    vocab_size = len(tokens)
    embedding = shapes.get("token_embd.weight")
    if embedding is None:
        raise MlxedgeError("tensor token_embd.weight is missing", path=path)
    if embedding[0] != vocab_size:
        # mlx-lm sizes the embedding from vocab_size, so the tensor wins.
        log.warning("%s: %d tokens but %d embedding rows; using %d",
                    path, vocab_size, embedding[0], embedding[0])  # fmt: skip
        vocab_size = embedding[0]
    rope_theta = meta.get(key(rope.FREQ_BASE))
    if rope_theta is None:
        log.warning("%s: no %s; using 10000, llama.cpp's default", path, key(rope.FREQ_BASE))
        rope_theta = 10000.0
    config: dict[str, Any] = {
        "model_type": cls.model_type,
        "architectures": [cls.hf_class],
        "hidden_size": hidden,
        "intermediate_size": whole(key(llm.FEED_FORWARD_LENGTH), need(llm.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": whole(key(llm.BLOCK_COUNT), need(llm.BLOCK_COUNT)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": number(key(attn.LAYERNORM_RMS_EPS), need(attn.LAYERNORM_RMS_EPS)),
        "rope_theta": number(key(rope.FREQ_BASE), rope_theta),
        "max_position_embeddings": whole(key(llm.CONTEXT_LENGTH), need(llm.CONTEXT_LENGTH)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        **cls.attention_bias_from_gguf(shapes),
    }
    kind = meta.get(rope.SCALING_TYPE.format(arch=arch_name))
    factor = meta.get(rope.SCALING_FACTOR.format(arch=arch_name))
    if kind not in (None, "none") and factor is not None:
        factor = number(rope.SCALING_FACTOR.format(arch=arch_name), factor)
        scaling: dict[str, Any] = {"type": kind, "rope_type": kind, "factor": factor}
        original = meta.get(rope.SCALING_ORIG_CTX_LEN.format(arch=arch_name))
        if original is not None:
            scaling["original_max_position_embeddings"] = whole(
                rope.SCALING_ORIG_CTX_LEN.format(arch=arch_name), original
            )
        config["rope_scaling"] = scaling
    for role, meta_key in (("bos", TokenizerKeys.BOS_ID), ("eos", TokenizerKeys.EOS_ID)):
        if (tid := meta.get(meta_key)) is not None:
            config[f"{role}_token_id"] = whole(meta_key, tid) if tid else 0
    return config


def gguf_positive_number(name: str, value: Any, path) -> float:
    """A GGUF metadata value that must be a positive finite number, as its shortest decimal.

    Raises:
        MlxedgeError: it is not (the key and the file named).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise MlxedgeError(f"metadata key {name} is {value!r:.40}, not a number", path=path,
                           fix=_GGUF_FIX)  # fmt: skip
    if not math.isfinite(float(value)) or value <= 0:
        raise MlxedgeError(f"metadata key {name} is {value}, not a positive finite number",
                           path=path, fix=_GGUF_FIX)  # fmt: skip
    return _decimal(value)


def _decimal(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not
    9.999999747378752e-06), which is how the source config.json wrote it."""
    return float(str(np.float32(value)))
