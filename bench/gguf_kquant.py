"""Part 3 of the GGUF benchmark: K-quant reconstruction error of ``ffn_down`` tensors.

``sum((w - dequant(quant(w)))^2)`` per tensor and K type, ours (``ggml_blocks.quantize_rows`` then
``dequantize_rows``) against llama.cpp's (``ggml_quantize_chunk`` from llama-cpp-python's
libggml-base, read back by gguf-py's dequantizer). Results are cached in
``bench/work/gguf/kquant.json``, keyed by a hash of the quantizer's source.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import bench_convert as bc
import numpy as np
from llamacpp_tools import GGUF_WORK

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _libggml():
    """llama-cpp-python's ggml library (the same llama.cpp commit), with ggml_quantize_chunk."""
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "libggml.so", "libggml.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            if hasattr(lib, "ggml_quantize_chunk"):
                fn = lib.ggml_quantize_chunk
                fn.restype = ctypes.c_size_t
                fn.argtypes = [
                    ctypes.c_int,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_void_p,
                ]
                return fn
    raise RuntimeError(f"no ggml library with ggml_quantize_chunk under {lib_dir}")


def llama_cpp_quantize(x: np.ndarray, type_name: str) -> np.ndarray:
    """llama.cpp's bytes for ``x`` (rows, cols), without an importance matrix."""
    from gguf import GGMLQuantizationType

    from mlxedge.quant.ggml import TYPES

    t = TYPES[type_name]
    rows, cols = x.shape
    out = np.zeros((rows, cols // t.block_size * t.type_size), dtype=np.uint8)
    written = _libggml()(
        GGMLQuantizationType[type_name].value, x.ctypes.data, out.ctypes.data, 0, rows, cols, None
    )
    assert written == out.nbytes, (written, out.nbytes)
    return out


def kquant_job(model_dir: str, name: str, rows: int | None, type_name: str) -> dict:
    """Squared reconstruction error of one tensor and type, ours and llama.cpp's."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from mlxedge.quant.ggml import dequantize_rows, native_available, quantize_rows
    from mlxedge.source import resolve

    w = resolve(model_dir).weights.read(name)  # (out, in): a row is one GGUF row
    w = np.ascontiguousarray(np.asarray(w[:rows] if rows else w, dtype=np.float32))
    llama_cpp_quantize(w[:1], type_name)  # load the library outside the timing
    start = time.perf_counter()
    ours_bytes = quantize_rows(w, type_name)
    ours_s = time.perf_counter() - start
    ours = dequantize_rows(ours_bytes, type_name, w.shape[1])
    start = time.perf_counter()
    theirs_bytes = llama_cpp_quantize(w, type_name)
    theirs_s = time.perf_counter() - start
    # Their bytes through gguf-py's dequantizer: independent of ours.
    theirs = dequantize(theirs_bytes, GGMLQuantizationType[type_name]).reshape(w.shape)
    err_ours = float(np.sum((w.astype(np.float64) - ours) ** 2))
    err_theirs = float(np.sum((w.astype(np.float64) - theirs) ** 2))
    return {
        "tensor": name,
        "type": type_name,
        "shape": list(w.shape),
        "err_ours": err_ours,
        "err_theirs": err_theirs,
        "identical": bool(np.array_equal(ours_bytes, theirs_bytes)),
        "ours_s": ours_s,
        "theirs_s": theirs_s,
        "native": native_available(),
    }


def kquant_tensors(model: str, layers: str | None) -> list[int]:
    n = {"smollm2": 30, "llama1b": 16}[model]
    if not layers:
        return list(range(n))
    return [i for i in (int(v) for v in layers.split(",")) if i < n]


def measure_kquants(jobs: list[tuple[str, str, str, int | None, str]]) -> list[dict]:
    """Run (model, model_dir, tensor, rows, type) jobs, cached by the quantizer's source.

    The cache key hashes ``ggml_blocks.py`` and its native kernel (source and built module), so
    a changed quantizer is re-measured. With the native kernel (two threads of its own) the jobs
    run one at a time, so that the times are not contended; the numpy path runs one per core.
    """
    import mlxedge.quant.ggml as blocks

    sources = sorted(Path(blocks.__file__).parent.glob("_ggml_quants*"))
    h = hashlib.sha256(Path(blocks.__file__).read_bytes())
    for path in sources:
        h.update(path.read_bytes())
    digest = h.hexdigest()[:16]
    workers = 1 if blocks.native_available() else os.cpu_count() or 1
    cache_path = GGUF_WORK / "kquant.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("ggml_blocks") != digest:
        cache = {"ggml_blocks": digest, "results": {}}
    keys = [f"{m}|{t}|{r}|{q}" for m, _, t, r, q in jobs]
    todo = [(k, j) for k, j in zip(keys, jobs, strict=True) if k not in cache["results"]]
    if todo:
        print(
            f"K-quant error: {len(todo)} tensor x type jobs ({len(jobs) - len(todo)} cached)",
            flush=True,
        )
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {k: pool.submit(kquant_job, d, t, r, q) for k, (_, d, t, r, q) in todo}
        for i, (key, future) in enumerate(futures.items(), 1):
            result = future.result()
            cache["results"][key] = result
            cache_path.write_text(json.dumps(cache, indent=1))
            ratio = result["err_ours"] / result["err_theirs"]
            print(
                f"[{i}/{len(todo)}] {key:45s} ratio {ratio:.4f}  "
                f"{'identical bytes' if result['identical'] else 'bytes differ'}  "
                f"ours {result['ours_s']:.1f} s, llama.cpp {result['theirs_s']:.2f} s",
                flush=True,
            )
    return [dict(cache["results"][k], model=k.split("|")[0]) for k in keys]


def kquant_table(results: list[dict]) -> str:
    """Per model and type: mean and max error ratio ours / llama.cpp, identical-bytes count."""
    rows = [
        "| model | tensors | type | mean ratio | max ratio | identical bytes | ours path | "
        "ours ms/tensor | llama.cpp ms/tensor |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for model in dict.fromkeys(r["model"] for r in results):
        for type_name in K_TYPES:
            group = [r for r in results if r["model"] == model and r["type"] == type_name]
            if not group:
                continue
            ratios = [r["err_ours"] / r["err_theirs"] for r in group]
            shape = "x".join(str(s) for s in group[0]["shape"])
            rows.append(
                f"| {bc.MODEL_LABELS[model]} | {len(group)} x {shape} | {type_name} | "
                f"{statistics.fmean(ratios):.4f} | {max(ratios):.4f} | "
                f"{sum(r['identical'] for r in group)}/{len(group)} | "
                f"{'native, 2 threads' if group[0].get('native') else 'numpy'} | "
                f"{1e3 * statistics.fmean(r['ours_s'] for r in group):.0f} | "
                f"{1e3 * statistics.fmean(r['theirs_s'] for r in group):.0f} |"
            )
    return "\n".join(rows)
