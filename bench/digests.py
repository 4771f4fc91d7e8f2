"""Fingerprints of everything mlxedge writes, to show a change leaves the outputs as they were.

For each input model (tiny generated models of every architecture, tied and untied, and SmolLM2)
it runs the CLI of the mlxedge checkout given by ``--repo`` — MLX folders, GGUF files of several
mixes, a GGUF repacked from an MLX folder, a GGUF imported back to a Hugging Face folder — and
records the SHA-256 of every file written, plus the numpy reference's logits on fixed token ids.
Two runs (two checkouts, same inputs) are then compared file by file and logit by logit.

Usage:
    python bench/digests.py record --repo DIR --out bench/work/digests/NAME.json
    python bench/digests.py compare A.json B.json

Inputs are generated once into ``bench/work/digests/inputs`` (by this checkout's
``tests/tiny_models.py``) and reused by every later run, so both sides read identical bytes.
The logits are stored beside the JSON as ``NAME.npz``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK = BENCH_DIR / "work" / "digests"
INPUTS = WORK / "inputs"
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
GGUF_TYPES = ("Q4_K_M", "Q8_0", "Q2_K", "Q5_0", "F16")

# The numpy reference's logits, through whichever API the checkout has.
LOGITS_SNIPPET = """
import sys, numpy as np
from mlxedge.runtime.reference import ReferenceModel
folder, ids_path, out = sys.argv[1:4]
ids = np.load(ids_path)
if hasattr(ReferenceModel, "from_model"):  # after the restructure: one loader
    from mlxedge.source import resolve
    ref = ReferenceModel.from_model(resolve(folder))
else:
    from mlxedge.runtime.artifact import open_model
    model = open_model(folder)
    ref = ReferenceModel.from_source(model.config, model.weights)
np.save(out, ref.logits(ids))
"""


def make_inputs() -> list[tuple[str, str]]:
    """(label, MODEL argument) of every input, generated on first use."""
    sys.path.insert(0, str(REPO_DIR / "tests"))
    from tiny_models import make_tiny_model

    models = []
    for arch in ARCHS:
        for tied in (True, False):
            label = f"{arch}-{'tied' if tied else 'untied'}"
            folder = INPUTS / label
            if not (folder / "config.json").is_file():
                head_dim = 32 if arch == "qwen3" else None
                make_tiny_model(folder, arch, tied=tied, dtype="bfloat16", head_dim=head_dim)
            models.append((label, str(folder)))
    models.append(("smollm2", "smollm2"))
    return models


def file_digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def record(repo: Path, out_json: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(repo)}
    cli = [sys.executable, "-m", "mlxedge.cli"]
    scratch = WORK / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    digests: dict[str, dict[str, str]] = {}
    logits: dict[str, np.ndarray] = {}

    def run(label: str, *args: str, output: Path) -> None:
        done = subprocess.run([*cli, *args], env=env, cwd=scratch, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{label}: {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        digests[label] = file_digests(output)
        print(f"{label}: {len(digests[label])} files", flush=True)

    for name, model in make_inputs():
        base = scratch / name
        base.mkdir()
        mlx4 = base / "mlx-4bit"
        run(f"{name}/mlx-4bit", "quantize", model, "-o", str(mlx4), output=mlx4)
        mlx3 = base / "mlx-3bit-uniform-rtn"
        run(f"{name}/mlx-3bit-uniform-rtn", "quantize", model, "-o", str(mlx3), "--bits", "3",
            "--recipe", "uniform", "--method", "rtn", output=mlx3)  # fmt: skip
        for t in GGUF_TYPES if name != "smollm2" else ("Q4_K_M", "Q8_0", "Q2_K"):
            g = base / f"{t}.gguf"
            run(f"{name}/{t}.gguf", "export", "gguf", model, "-o", str(g), "--type", t, output=g)
        repacked = base / "mlx-4bit.gguf"
        run(f"{name}/mlx-4bit.gguf", "export", "gguf", str(mlx4), "-o", str(repacked),
            output=repacked)  # fmt: skip
        if name != "smollm2":
            hf = base / "imported"
            run(f"{name}/imported", "import", str(base / "Q8_0.gguf"), "-o", str(hf), output=hf)
            ids = np.random.default_rng(0).integers(0, 300, 40)
            np.save(base / "ids.npy", ids)
            for what, folder in (("source", model), ("mlx-4bit", str(mlx4))):
                out = base / f"logits-{what}.npy"
                cmd = [sys.executable, "-c", LOGITS_SNIPPET, folder, str(base / "ids.npy"), out]
                done = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"logits of {name}/{what} failed:\n{done.stderr[-2000:]}")
                logits[f"{name}/{what}"] = np.load(out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    out_json.write_text(json.dumps({"repo": str(repo), "commit": commit, "digests": digests},
                                   indent=1, sort_keys=True))  # fmt: skip
    np.savez(out_json.with_suffix(".npz"), **{k.replace("/", "__"): v for k, v in logits.items()})
    print(f"wrote {out_json}")


def compare(a_json: Path, b_json: Path) -> int:
    a, b = json.loads(a_json.read_text()), json.loads(b_json.read_text())
    print(f"A: {a['commit']} ({a['repo']})\nB: {b['commit']} ({b['repo']})")
    same = differ = 0
    for label in sorted(set(a["digests"]) | set(b["digests"])):
        fa, fb = a["digests"].get(label, {}), b["digests"].get(label, {})
        for f in sorted(set(fa) | set(fb)):
            if fa.get(f) == fb.get(f):
                same += 1
            else:
                differ += 1
                print(f"  differs: {f} ({'missing in A' if f not in fa else ''}"
                      f"{'missing in B' if f not in fb else ''})")  # fmt: skip
    print(f"files: {same} identical, {differ} different")
    la, lb = np.load(a_json.with_suffix(".npz")), np.load(b_json.with_suffix(".npz"))
    worst = 0.0
    for k in sorted(la.files):
        d = float(np.abs(la[k] - lb[k]).max())
        worst = max(worst, d)
        print(f"  logits {k.replace('__', '/')}: max |A - B| = {d:.3g}")
    print(f"reference logits: largest difference {worst:.3g} over {len(la.files)} runs")
    return 0 if differ == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--repo", type=Path, default=REPO_DIR)
    rec.add_argument("--out", type=Path, required=True)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.repo.resolve(), args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
