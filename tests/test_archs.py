"""Each architecture module's forward, run by executors other than numpy's reference: a recording
`Ops` with symbolic shapes (what a graph builder such as Core ML's sees), and numpy block by block
with a hook on every linear layer's input (what calibration needs); and the sliding-window rules
of each model type, as Hugging Face defines them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from tiny_models import ARCHS, make_tiny_model

from mlxedge.archs import ARCHITECTURES, Kind, Role, arch_for
from mlxedge.formats.hf import HFCheckpoint
from mlxedge.runtime.numpy_ops import NumpyOps
from mlxedge.runtime.reference import ReferenceModel

L = "L"  # the symbolic sequence length


@dataclass(frozen=True)
class Sym:
    """A value of the recording executor: only a shape, whose entries may be symbols."""

    shape: tuple


class RecordingOps:
    """`Ops` that computes nothing: it checks every shape against the architecture's table and
    logs each call, as a graph builder with a symbolic sequence length would see the forward."""

    def __init__(self, arch) -> None:
        self.shapes = {e.name: e.shape for e in arch.tensors()}
        self.calls: list[tuple[str, str | None, tuple]] = []

    def _log(self, op: str, name: str | None, out: tuple) -> Sym:
        self.calls.append((op, name, out))
        return Sym(out)

    def embedding(self, table, ids):
        assert ids.shape == (L,)
        return self._log("embedding", table, (L, self.shapes[table][1]))

    def linear(self, x, module, bias=False):
        out_dim, in_dim = self.shapes[module + ".weight"]
        assert x.shape[-1] == in_dim, (module, x.shape)
        if bias:
            assert self.shapes[module + ".bias"] == (out_dim,)
        return self._log("linear", module, (*x.shape[:-1], out_dim))

    def rms_norm(self, x, weight, eps, offset=0.0):
        assert self.shapes[weight] == (x.shape[-1],) and eps > 0 and offset in (0.0, 1.0)
        return self._log("rms_norm", weight, x.shape)

    def split_heads(self, x, n_heads, head_dim):
        assert x.shape == (L, n_heads * head_dim)
        return self._log("split_heads", None, (n_heads, L, head_dim))

    def merge_heads(self, x):
        h, length, d = x.shape
        return self._log("merge_heads", None, (length, h * d))

    def rope_tables(self, positions, inv_freq):
        assert positions.shape == (L,) and inv_freq.ndim == 1
        return self._log("rope_tables", None, (L, 2 * len(inv_freq)))

    def rope(self, x, tables):
        assert x.shape[1:] == tables.shape
        return self._log("rope", None, x.shape)

    def causal_mask(self, positions, window):
        return self._log("causal_mask", str(window), (L, L))

    def attention(self, layer, q, k, v, mask, scale, soft_cap=None):
        assert q.shape[0] % k.shape[0] == 0 and k.shape == v.shape and mask.shape == (L, L)
        assert scale > 0 and (soft_cap is None or soft_cap > 0)
        return self._log("attention", str(layer), q.shape)

    def silu(self, x):
        return self._log("silu", None, x.shape)

    def gelu_tanh(self, x):
        return self._log("gelu_tanh", None, x.shape)

    def soft_cap(self, x, cap):
        assert cap > 0
        return self._log("soft_cap", str(cap), x.shape)

    def scale(self, x, factor):
        return self._log("scale", str(factor), x.shape)

    def split(self, x, sizes):
        assert x.shape[-1] == sum(sizes)
        return [self._log("split", str(n), (*x.shape[:-1], n)) for n in sizes]

    def mul(self, a, b):
        assert a.shape == b.shape
        return self._log("mul", None, a.shape)

    def add(self, a, b):
        assert a.shape == b.shape
        return self._log("add", None, a.shape)

    def tail(self, x, first):
        return self._log("tail", str(first), (f"{L}-{first}", *x.shape[1:]))


def config_for(model_type: str, **extra) -> dict:
    return {"model_type": model_type, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, **extra}  # fmt: skip


VARIANTS = [
    *[(t, {}) for t in sorted(ARCHITECTURES)],
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 32}),
]


@pytest.mark.parametrize(("model_type", "extra"), VARIANTS)
def test_every_forward_runs_on_symbolic_shapes(model_type, extra):
    arch = arch_for(config_for(model_type, **extra))
    ops = RecordingOps(arch)
    out = arch.forward(ops, Sym((L,)), Sym((L,)), first=5)
    s = arch.spec
    assert out.shape == (f"{L}-5", s.vocab_size)
    linears = [name for op, name, _ in ops.calls if op == "linear"]
    per_layer = sum(e.role == Role.LINEAR and e.layer == 0 for e in arch.tensors())
    assert per_layer == (4 if model_type == "phi3" else 7)  # fused q/k/v and gate/up
    assert len(linears) == per_layer * s.n_layers + 1
    assert len(set(linears[:-1])) == per_layer * s.n_layers  # every projection once
    used = {name for op, name, _ in ops.calls if op in ("linear", "embedding", "rms_norm")}
    for e in arch.tensors():  # every parameter of the table is used by the forward
        assert e.name in used or e.module in used, e.name
    assert sum(op == "attention" for op, _, _ in ops.calls) == s.n_layers


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {
        arch: make_tiny_model(
            root / arch, arch, dtype="float32", layers=3, head_dim=32 if arch == "qwen3" else None
        )  # fmt: skip
        for arch in ARCHS
    }


class ObservingOps(NumpyOps):
    """numpy's Ops, recording the input of every linear layer (as calibration does)."""

    def __init__(self, params) -> None:
        super().__init__(params)
        self.inputs: dict[str, np.ndarray] = {}

    def linear(self, x, module, bias=False):
        self.inputs[module] = x
        return super().linear(x, module, bias)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_the_forward_runs_block_by_block_with_a_hook_on_linear_inputs(tiny_models, arch_name):
    folder = tiny_models[arch_name]
    config = json.loads((folder / "config.json").read_text())
    ref = ReferenceModel.from_source(config, HFCheckpoint.from_folder(folder))
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], 24)
    whole = ref.logits(ids)

    arch, ops = ref.arch, ObservingOps(ref.ops.params)
    positions = np.arange(len(ids))
    x = arch.embed(ops, ids)
    context = arch.context(ops, positions)
    for i in range(arch.spec.n_layers):
        before = set(ops.inputs)
        x = arch.block(ops, i, x, context)  # one block at a time, its inputs observable here
        seen = sorted(set(ops.inputs) - before)
        per_layer = sum(e.role == Role.LINEAR and e.layer == i for e in arch.tensors())
        assert len(seen) == per_layer and all(m.startswith(f"model.layers.{i}.") for m in seen)
        assert all(ops.inputs[m].shape[0] == len(ids) for m in seen)
    logits = arch.head(ops, x)
    np.testing.assert_array_equal(logits, whole)  # the same operations in the same order
    q_in = ops.inputs["model.layers.1.mlp.down_proj"]
    assert q_in.shape == (len(ids), config["intermediate_size"])


# ----------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize(
    ("model_type", "extra", "windows"),
    [
        ("llama", {"sliding_window": 8}, (None, None, None)),  # llama has no window
        ("mistral", {}, (4096,) * 3),  # MistralConfig's default
        ("mistral", {"sliding_window": None}, (None,) * 3),
        ("mistral", {"sliding_window": 8}, (8,) * 3),
        ("qwen2", {"sliding_window": 8}, (None,) * 3),  # use_sliding_window defaults to false
        ("qwen2", {"sliding_window": 8, "use_sliding_window": True}, (None,) * 3),  # 28 layers
        ("qwen2", {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1},
         (None, 8, 8)),
        ("qwen3", {"sliding_window": 8, "use_sliding_window": True,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
         (8, None, 8)),
    ],
)  # fmt: skip
def test_sliding_windows_follow_hugging_face_per_model_type(model_type, extra, windows):
    assert arch_for(config_for(model_type, **extra)).spec.windows == windows


def _logits(folder, config, ids):
    return ReferenceModel.from_source(config, HFCheckpoint.from_folder(folder)).logits(ids)


def test_a_window_changes_only_what_lies_beyond_it(tiny_models):
    folder = tiny_models["qwen2"]
    config = json.loads((folder / "config.json").read_text())
    ids = np.random.default_rng(2).integers(0, config["vocab_size"], 24)
    full = _logits(folder, config | {"sliding_window": None}, ids)
    # Hugging Face: a stated window applies only with use_sliding_window, false by default.
    unset = {k: v for k, v in config.items() if k != "use_sliding_window"}
    np.testing.assert_array_equal(_logits(folder, unset | {"sliding_window": 6}, ids), full)
    on = config | {"sliding_window": 6, "use_sliding_window": True}
    from_second = _logits(folder, on | {"max_window_layers": 1}, ids)
    every = _logits(folder, on | {"max_window_layers": 0}, ids)
    np.testing.assert_array_equal(from_second[:6], full[:6])  # within the window: same masks
    assert np.abs(from_second[6:] - full[6:]).max() > 1e-3
    assert np.abs(from_second[6:] - every[6:]).max() > 1e-3  # the first block has no window


def test_the_table_names_llama_cpp_kinds_and_roles():
    arch = arch_for(config_for("qwen2", tie_word_embeddings=True))
    kinds = {e.name: (e.kind, e.role) for e in arch.tensors()}
    assert kinds["model.layers.2.self_attn.v_proj.weight"] == (Kind.ATTN_V, Role.LINEAR)
    assert kinds["model.layers.2.self_attn.v_proj.bias"] == (Kind.ATTN_V, Role.BIAS)
    assert kinds["model.embed_tokens.weight"] == (Kind.TOKEN_EMBD, Role.EMBEDDING)
    assert "lm_head.weight" not in kinds and arch.role("lm_head.weight") == Role.DROP
