"""Quantizing on a Mac: our Metal kernels vs the native C kernels vs numpy, and vs `mx.quantize`.

Runs only where our Metal kernels run (macOS on Apple Silicon); elsewhere it says why and exits
with status 2 (on Linux the kernels' text is checked by tests/metal_harness.py instead).

For the Llama-3.2-1B and Llama-3.1-8B shapes it quantizes each distinct weight shape (random
bfloat16 values, 4 bits, groups of 64, bfloat16 scales) with every implementation, `--repeats`
times (numpy once, on the 1B shape only), takes the median, and multiplies by how many tensors of
that shape the model has: the model's time without disk I/O. Every implementation's codes are
compared with the Metal kernels' (they must be identical; `mx.quantize` is compared too, and on
the GPU it differs in
all-negative groups and exact ties, see the README's rounding rule).

The floor is what the hardware allows: bytes read and written (2 per weight of bfloat16 in; the
codes, scales and biases out) over the memory bandwidth (`--bandwidth` GB/s, default the
marketed figure of the chip found by `sysctl`), and reading the bfloat16 source from disk at
`--disk` GB/s (default 5).

Usage (on a Mac, in the project's venv):
    python bench/metal.py [--models 1b,8b] [--methods rtn,mse,mse-zero] [--repeats 3]

Output: one markdown table, printed and written into bench/RESULTS.md between
``<!-- metal-bench:start -->`` and ``<!-- metal-bench:end -->``:

    | model | method | implementation | seconds | ratio to native | GB/s | same bytes |

and below it the floor lines (`memory floor: X s at Y GB/s`, `disk floor: X s at Y GB/s`), the
chip, macOS, MLX and mlxedge versions, and the exact command.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import write_results  # noqa: E402

START, END = "<!-- metal-bench:start -->", "<!-- metal-bench:end -->"
BITS, GROUP = 4, 64
# (rows, cols) -> tensors of that shape
SHAPES = {
    "1b": {(2048, 2048): 32, (512, 2048): 32, (8192, 2048): 32, (2048, 8192): 16,
           (128256, 2048): 1},
    "8b": {(4096, 4096): 64, (1024, 4096): 64, (14336, 4096): 64, (4096, 14336): 32,
           (128256, 4096): 2},
}  # fmt: skip
LABELS = {"1b": "Llama-3.2-1B shape", "8b": "Llama-3.1-8B shape"}
BANDWIDTH = {"M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800, "M2": 100,
             "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800, "M3": 100, "M3 Pro": 150,
             "M3 Max": 400, "M4": 120, "M4 Pro": 273, "M4 Max": 546}  # fmt: skip


def refuse_elsewhere() -> str | None:
    from mlxedge.quant.backend import metal_available

    if sys.platform != "darwin":
        return f"bench/metal.py needs macOS on Apple Silicon (this is {platform.system()})"
    if not metal_available():
        return "MLX reports no Metal device here"
    return None


def chip() -> str:
    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip
    except OSError:
        return platform.machine()


def marketed_bandwidth(name: str) -> float | None:
    found = [k for k in BANDWIDTH if k in name]
    return BANDWIDTH[max(found, key=len)] if found else None


def timed(fn, w, repeats: int) -> tuple[float, object]:
    """The median seconds of `fn(w)` over `repeats` runs, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(w)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def implementations(model: str, method: str) -> dict:
    import mlx.core as mx

    from mlxedge.quant import backend
    from mlxedge.quant.schemes import AffineScheme

    scheme = AffineScheme(BITS, GROUP)

    def family(name):
        def run(w):
            backend.set_kernels(name)
            try:
                qt, _ = backend.quantize(w, scheme, "bfloat16", method)
            finally:
                backend.set_kernels(None)
            return qt.weight

        return run

    out = {"metal": family("metal"), "native": family("native")}
    if model == "1b":  # numpy's search on 8B weights would take hours: the 1B shape says enough
        out["numpy"] = family("numpy")
    if method == "rtn":

        def coalesced(w):
            from mlxedge.quant import metal

            launch = metal.affine_rtn_coalesced_launch(backend._to_mx(w), BITS, GROUP, "bfloat16")
            out = metal.call(metal.AFFINE_RTN_COALESCED, launch)
            mx.eval(*out)
            return np.array(out[0]).reshape(w.shape[0], -1)

        out["metal (coalesced rtn)"] = coalesced

        def mlx_gpu(w):
            q, s, b = mx.quantize(backend._to_mx(w), group_size=GROUP, bits=BITS)
            mx.eval(q, s, b)
            return np.array(q)

        out["mx.quantize (GPU)"] = mlx_gpu
    return out


def measure(model: str, method: str, repeats: int) -> list[dict]:
    import ml_dtypes

    rows = []
    totals: dict[str, float] = {}
    same: dict[str, bool] = {}
    weights = 0
    for (r, c), count in SHAPES[model].items():
        w = np.random.default_rng(r * c).standard_normal((r, c)).astype(ml_dtypes.bfloat16)
        weights += r * c * count
        reference = None
        for name, fn in implementations(model, method).items():
            reps = 1 if name == "numpy" else repeats
            seconds, codes = timed(fn, w, reps)
            totals[name] = totals.get(name, 0.0) + seconds * count
            if reference is None:
                reference = codes
            same[name] = same.get(name, True) and np.array_equal(codes, reference)
    moved = weights * (2 + BITS / 8 + 2 * 2 / GROUP)
    for name, seconds in totals.items():
        rows.append({"model": model, "method": method, "impl": name, "seconds": seconds,
                     "ratio": seconds / totals["native"], "gbs": moved / seconds / 1e9,
                     "same": same[name], "weights": weights, "moved": moved})  # fmt: skip
    return rows


def render(rows: list[dict], bandwidth: float | None, disk: float, argv: list[str]) -> str:
    import mlx.core as mx

    from mlxedge import __version__

    lines = ["### Quantizing on the GPU: Metal kernels vs native C vs numpy", "",
             "| model | method | implementation | seconds | ratio to native | GB/s | same bytes |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {LABELS[row['model']]} | {row['method']} | {row['impl']} | "
                     f"{row['seconds']:.2f} | {row['ratio']:.2f}x | {row['gbs']:.1f} | "
                     f"{'yes' if row['same'] else 'no'} |")  # fmt: skip
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        row = next(r for r in rows if r["model"] == model)
        if bandwidth:
            lines.append(f"- {LABELS[model]}: memory floor {row['moved'] / bandwidth / 1e9:.3f} s "
                         f"at {bandwidth:g} GB/s")  # fmt: skip
        lines.append(f"- {LABELS[model]}: disk floor {row['weights'] * 2 / disk / 1e9:.2f} s "
                     f"at {disk:g} GB/s (bfloat16 source)")  # fmt: skip
    lines += [f"- chip: {chip()}, macOS {platform.mac_ver()[0]}, MLX {mx.__version__}, "
              f"mlxedge {__version__}",
              f"- command: `{shlex.join(['python', 'bench/metal.py', *argv])}`"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--methods", default="rtn,mse,mse-zero")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth, GB/s")
    parser.add_argument("--disk", type=float, default=5.0, help="disk read speed, GB/s")
    args = parser.parse_args(argv)
    reason = refuse_elsewhere()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    bandwidth = args.bandwidth or marketed_bandwidth(chip())
    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            rows += measure(model, method, args.repeats)
    section = render(rows, bandwidth, args.disk, argv)
    print(section)
    write_results(section, markers=(START, END))
    return 0


if __name__ == "__main__":
    sys.exit(main())
