"""Time Apple's published Core ML recipe for LLMs, from a float folder to an int4 package.

This measures the path described in Apple's article "On Device Llama 3.1 with
Core ML", done the way the article does it and without mlxedge:

1. load   -- ``LlamaForCausalLM.from_pretrained`` on a float Hugging Face folder,
             wrapped in a module that holds a stateful KV cache (two registered
             buffers ``keyCache``/``valueCache`` of shape
             ``(layers, 1, kv_heads, context, head_dim)``, written by slice
             assignment through a ``transformers`` ``Cache`` subclass);
2. trace  -- ``torch.jit.trace`` of ``forward(inputIds, causalMask) -> logits``;
3. convert -- ``coremltools.convert`` to an ML program (macOS 15 target) with
             flexible ``inputIds``/``causalMask`` shapes and the two caches as
             Core ML states, fp16 compute precision;
4. quantize -- ``linear_quantize_weights`` to int4, symmetric, per block of 32;
5. save   -- writing the ``.mlpackage``.

It prints one JSON line with the wall seconds of each phase, their total, the
versions used and the size of the package's ``weight.bin``. Peak memory is
measured from outside, for instance with ``/usr/bin/time -f '%e s %M KiB'``.
Nothing is run through Core ML itself (``skip_model_load=True``), so the script
also works where the Core ML runtime is missing, as on Linux.

The recipe needs its own environment, kept apart from the project's::

    python3 -m venv bench/work/apple-venv
    bench/work/apple-venv/bin/pip install torch==2.13.0   # a CPU build; plain `torch` pulls CUDA
    bench/work/apple-venv/bin/pip install coremltools==9.0 transformers==4.44.2 safetensors \\
        numpy==2.3.5

numpy must stay below 2.4: coremltools 9.0's torch frontend converts one-element arrays to Python
scalars (``dtype(x.val)`` in ``_cast``), which numpy 2.4 made an error ("only 0-dimensional
arrays can be converted to Python scalars"). The float folder is the one bench_convert.py makes
(``bench/work/smollm2-f32``). It runs as::

    /usr/bin/time -f '%e s %M KiB' bench/work/apple-venv/bin/python bench/coreml_apple_recipe.py \\
        --model bench/work/smollm2-f32 --out bench/work/smollm2-apple-int4.mlpackage --context 1024

``--list-ops`` additionally reloads the saved program and adds the sorted list
of its distinct MIL op types to the JSON line (not counted in the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import coremltools as ct
import numpy as np
import torch
import transformers
from transformers import LlamaForCausalLM
from transformers.cache_utils import Cache

T = TypeVar("T")


class SliceUpdateKeyValueCache(Cache):
    """A fixed-size KV cache updated in place by slice assignment."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.past_seen_tokens: int = 0
        self.k: torch.Tensor = torch.zeros(shape, dtype=dtype)
        self.v: torch.Tensor = torch.zeros(shape, dtype=dtype)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        begin = self.past_seen_tokens
        end = begin + key_states.shape[-2]
        self.k[layer_idx, :, : key_states.shape[1], begin:end, :] = key_states
        self.v[layer_idx, :, : value_states.shape[1], begin:end, :] = value_states
        return self.k[layer_idx, :, :, :end, :], self.v[layer_idx, :, :, :end, :]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.past_seen_tokens

    def get_max_length(self) -> int | None:
        return self.k.shape[-2]


class StatefulLlama(torch.nn.Module):
    """``LlamaForCausalLM`` with its KV cache held in two registered buffers."""

    def __init__(self, model: LlamaForCausalLM, context: int) -> None:
        super().__init__()
        self.model = model
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.kv_cache_shape = (config.num_hidden_layers, 1, config.num_key_value_heads, context,
                               head_dim)  # fmt: skip
        self.kv_cache = SliceUpdateKeyValueCache(self.kv_cache_shape)
        self.register_buffer("keyCache", self.kv_cache.k)
        self.register_buffer("valueCache", self.kv_cache.v)

    @torch.no_grad()
    def forward(self, inputIds: torch.Tensor, causalMask: torch.Tensor) -> torch.Tensor:
        self.kv_cache.past_seen_tokens = causalMask.shape[-1] - inputIds.shape[-1]
        out = self.model(
            inputIds, attention_mask=causalMask, past_key_values=self.kv_cache, use_cache=True
        )
        return out.logits


def timed(phases: dict[str, float], name: str, fn: Callable[..., T], *args) -> T:
    start = time.perf_counter()
    result = fn(*args)
    phases[name] = round(time.perf_counter() - start, 3)
    return result


def load(folder: Path, context: int) -> StatefulLlama:
    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    wrapped = StatefulLlama(model, context)
    wrapped.eval()
    return wrapped


def trace(model: StatefulLlama) -> torch.jit.ScriptModule:
    input_ids = torch.zeros((1, 2), dtype=torch.int32)
    causal_mask = torch.zeros((1, 1, 2, 5), dtype=torch.float32)
    return torch.jit.trace(model, [input_ids, causal_mask])


def convert(traced: torch.jit.ScriptModule, shape: tuple[int, ...],
            context: int) -> ct.models.MLModel:  # fmt: skip
    query = ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
    cache = ct.TensorType(shape=shape, dtype=np.float16)
    return ct.convert(
        traced,
        inputs=[
            ct.TensorType("inputIds", shape=(1, query), dtype=np.int32),
            ct.TensorType("causalMask", shape=(1, 1, query, end), dtype=np.float16),
        ],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=[
            ct.StateType(wrapped_type=cache, name="keyCache"),
            ct.StateType(wrapped_type=cache, name="valueCache"),
        ],
        minimum_deployment_target=ct.target.macOS15,
        skip_model_load=True,
    )


def quantize(mlmodel: ct.models.MLModel) -> ct.models.MLModel:
    op_config = ct.optimize.coreml.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
    )
    config = ct.optimize.coreml.OptimizationConfig(global_config=op_config)
    return ct.optimize.coreml.linear_quantize_weights(mlmodel, config=config)


def save(mlmodel: ct.models.MLModel, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(out))


def weight_bin_bytes(package: Path) -> int:
    weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return weights.stat().st_size if weights.exists() else 0


def op_types(package: Path) -> list[str]:
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil

    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    weights_dir = str(package / "Data" / "com.apple.CoreML" / "weights")
    prog = load_mil(spec, spec.specificationVersion, weights_dir)
    return sorted({op.op_type for op in prog.functions["main"].operations})


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "coremltools": ct.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def run(folder: Path, out: Path, context: int) -> dict[str, Any]:
    phases: dict[str, float] = {}
    start = time.perf_counter()
    model = timed(phases, "load", load, folder, context)
    shape = model.kv_cache_shape
    traced = timed(phases, "trace", trace, model)
    del model  # the float model is not needed past the trace: its memory goes back
    mlmodel = timed(phases, "convert", convert, traced, shape, context)
    del traced
    mlmodel = timed(phases, "quantize", quantize, mlmodel)
    timed(phases, "save", save, mlmodel, out)
    total = round(time.perf_counter() - start, 3)
    return {
        "model": str(folder),
        "out": str(out),
        "context": context,
        "kv_cache_shape": list(shape),
        "phases_s": phases,
        "total_s": total,
        "weight_bin_bytes": weight_bin_bytes(out),
        "versions": versions(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="float Hugging Face llama folder")
    parser.add_argument("--out", type=Path, required=True, help="the .mlpackage to write")
    parser.add_argument("--context", type=int, default=1024, help="KV cache length (default 1024)")
    parser.add_argument("--list-ops", action="store_true", help="add the program's MIL op types")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        result = run(args.model, args.out, args.context)
    result["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
                                 for w in caught})  # fmt: skip
    for w in result["warnings"]:
        print(w, file=sys.stderr)
    if args.list_ops:
        result["op_types"] = op_types(args.out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
