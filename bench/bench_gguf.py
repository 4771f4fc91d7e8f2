"""`mlxedge export gguf` against llama.cpp's own path: speed, memory, quality, K-quant error.

llama.cpp's path is its converter to a float GGUF, then its quantizer:
    python convert_hf_to_gguf.py MODEL --outtype f32 --outfile F32.gguf
    llama-quantize F32.gguf OUT.gguf Q4_K_M
both taken from the llama-cpp-python source distribution (which vendors llama.cpp), built and
installed once under ``bench/work/``. Three measurements, all in the same run on this machine:

1. speed: wall time and peak RSS of whole processes, ours against convert + quantize, median
   over ``--runs`` interleaved runs (SmolLM2-135M and the Llama-3.2-1B-shape model);
2. quality (SmolLM2 only): KL divergence of every mix, ours and llama.cpp's, against llama.cpp's
   F32 GGUF, measured by ``llama-perplexity --kl-divergence`` on the same tokens;
3. K-quant reconstruction error on ``ffn_down`` tensors: ``ggml_blocks.quantize_rows`` against
   llama.cpp's ``ggml_quantize_chunk`` (the quantizer llama-quantize runs without an imatrix).

Usage:
    python bench/bench_gguf.py [--parts speed,quality,kquant] [--models smollm2,llama1b]
                               [--runs 3] [--text python-docs] [--chunks 16]

The tables are printed and written into ``bench/RESULTS.md`` between the markers
``<!-- gguf-bench:start -->`` and ``<!-- gguf-bench:end -->``, one block per part, so that a run
of some parts (``--parts quality``) replaces only theirs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert as bc  # noqa: E402  (the shared inputs and the process measurement)

WORK_DIR = bc.WORK_DIR
REPO_DIR = bc.REPO_DIR
GGUF_WORK = WORK_DIR / "gguf"
RESULTS_MD = bc.RESULTS_MD
START_MARKER = "<!-- gguf-bench:start -->"
END_MARKER = "<!-- gguf-bench:end -->"

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_DIR = WORK_DIR / "sdist"
SDIST_ROOT = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
LLAMA_SRC = SDIST_ROOT / "vendor" / "llama.cpp"
LLAMA_BUILD = WORK_DIR / "llama.cpp" / "build"
LLAMA_BIN = LLAMA_BUILD / "bin"
CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON",
]  # fmt: skip
TOOLS = ("llama-quantize", "llama-perplexity")
CONVERT_VENV = WORK_DIR / "convert-venv"
# convert_hf_to_gguf.py's requirements files, except torch: they pin torch==2.11.0 from
# PyTorch's own index, which this machine cannot reach; 2.13.0 is PyPI's CPU build here.
CONVERT_REQUIREMENTS = [
    "torch==2.13.0", "transformers==4.57.6", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0",
    "protobuf>=4.21.0,<5.0.0", "tqdm>=4.27", "pyyaml>=5.1", "requests>=2.25",
]  # fmt: skip

PARTS = ("speed", "quality", "kquant")
MODELS = bc.MODELS
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "Q8_0", "Q4_0", "F16", "F32")  # fmt: skip
SPEED_MIX = "Q4_K_M"
QUALITY_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
CONVERT_OUTTYPES = ("f32", "f16", "bf16")
# llama.cpp's numbers on SmolLM2 in DESIGN.md (anchors text, 19 windows of 512).
PUBLISHED_KL = {"Q4_K_M": 0.066, "Q3_K_M": 0.158, "Q8_0": 0.0046}
OURS, CONVERT, QUANTIZE = "mlxedge export gguf", "convert_hf_to_gguf.py", "llama-quantize"


# ---------------------------------------------------------------------------------------------
# llama.cpp: source, build, converter venv


def run_checked(argv: list[str], log: Path, what: str, cwd: Path = REPO_DIR) -> None:
    """Run a set-up step, its output into ``log``; exit with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{what} (log: {log.relative_to(REPO_DIR)})", flush=True)
    with log.open("wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        sys.exit(f"{what} failed (exit code {done.returncode}):\n{tail}")


def prepare_llama_source() -> Path:
    """llama.cpp's tree from the llama-cpp-python sdist, downloaded and unpacked on first use."""
    if (LLAMA_SRC / "convert_hf_to_gguf.py").is_file():
        return LLAMA_SRC
    archive = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not archive.is_file():
        argv = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "--no-deps", "--no-binary", ":all:", "-d", str(SDIST_DIR)]  # fmt: skip
        log = GGUF_WORK / "logs" / "sdist-download.log"
        run_checked(argv, log, "downloading the llama-cpp-python sdist")
    print(f"unpacking {archive.name}", flush=True)
    with tarfile.open(archive) as tar:
        tar.extractall(SDIST_DIR, filter="tar")
    return LLAMA_SRC


def llama_cpp_commit() -> str:
    """The vendored llama.cpp commit: the sdist keeps the submodule's git HEAD."""
    head = SDIST_ROOT / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    return head.read_text().strip()[:12] if head.is_file() else "unknown"


def build_llama_tools(src: Path) -> dict[str, Path]:
    """llama-quantize and llama-perplexity, CPU-only Release builds, cached (25 min on 2 cores)."""
    tools = {name: LLAMA_BIN / name for name in TOOLS}
    if all(p.is_file() for p in tools.values()):
        return tools
    logs = GGUF_WORK / "logs"
    cmake = shutil.which("cmake") or sys.exit("cmake is not installed (apt-get install cmake)")
    run_checked(
        [cmake, "-S", str(src), "-B", str(LLAMA_BUILD), *CMAKE_ARGS],
        logs / "cmake-configure.log",
        "configuring llama.cpp",
    )
    run_checked(
        [cmake, "--build", str(LLAMA_BUILD), "-j2", "--target", *TOOLS],
        logs / "cmake-build.log",
        "building llama-quantize and llama-perplexity",
    )
    return tools


def prepare_convert_venv() -> Path:
    """The interpreter of a separate venv with convert_hf_to_gguf.py's dependencies."""
    python = CONVERT_VENV / "bin" / "python"
    probe = [str(python), "-c", "import torch, transformers, sentencepiece, yaml, tqdm"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    logs = GGUF_WORK / "logs"
    run_checked(
        [sys.executable, "-m", "venv", "--clear", str(CONVERT_VENV)],
        logs / "convert-venv.log",
        f"creating {CONVERT_VENV.relative_to(REPO_DIR)}",
    )
    run_checked(
        [str(python), "-m", "pip", "install", *CONVERT_REQUIREMENTS],
        logs / "convert-venv-pip.log",
        "installing torch (CPU), transformers, ...",
    )
    return python


def convert_versions(python: Path) -> str:
    """Versions of the converter's main dependencies."""
    code = "import torch, transformers; print(torch.__version__, transformers.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.split()
    return f"torch {out[0]}, transformers {out[1]}" if len(out) == 2 else "unknown"


# The 1B-shape model's own tokenizer is a 320-token test vocabulary whose pre-tokenizer
# convert_hf_to_gguf.py does not recognise (it refuses to convert); SmolLM2's is a known one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def prepare_llama1b_with_tokenizer(llama1b: Path, smollm2: Path) -> Path:
    """The 1B-shape folder with SmolLM2's tokenizer: weights hard-linked, token ids from SmolLM2.

    Both tools read this folder. The vocabulary (49152 tokens) is smaller than the embedding
    (128256 rows); converters pad it, and it adds kilobytes to a GGUF of gigabytes.
    """
    folder = GGUF_WORK / "llama1b-bf16-smollm2-tokenizer"
    if bc.is_hf_folder(folder):
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in llama1b.iterdir():
        if src.suffix == ".safetensors" or src.name == "model.safetensors.index.json":
            # Hard links: mlxedge refuses an index naming a file outside the folder, which a
            # symlink resolves to. Same data, no copy (a copy where links are not possible).
            try:
                os.link(src, tmp / src.name)
            except OSError:
                shutil.copy2(src, tmp / src.name)
    for name in TOKENIZER_FILES:
        shutil.copy2(smollm2 / name, tmp / name)
    config = json.loads((llama1b / "config.json").read_text())
    smollm2_config = json.loads((smollm2 / "config.json").read_text())
    config.update({k: smollm2_config[k] for k in ("bos_token_id", "eos_token_id")})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Commands


@dataclass
class Tools:
    """Everything the commands need, found or built once."""

    mlxedge: str | None  # None while `mlxedge export gguf` does not exist
    convert_python: Path
    convert_script: Path
    quantize: Path
    perplexity: Path
    outtype: str


def ours_argv(tools: Tools, model: Path | str, out: Path, mix: str) -> list[str]:
    return [tools.mlxedge, "export", "gguf", str(model), "-o", str(out), "--type", mix]


def convert_argv(tools: Tools, model: Path, out: Path) -> list[str]:
    return [str(tools.convert_python), str(tools.convert_script), str(model),
            "--outtype", tools.outtype, "--outfile", str(out)]  # fmt: skip


def quantize_argv(tools: Tools, src: Path, out: Path, mix: str) -> list[str]:
    return [str(tools.quantize), str(src), str(out), mix]


def check_gguf(path: Path) -> str | None:
    """None when ``path`` is a GGUF file (magic and version), else what is wrong."""
    if not path.is_file():
        return f"no {path}"
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF" or int.from_bytes(head[4:8], "little") not in (2, 3):
        return f"{path} is not a GGUF file"
    return None


def gguf_summary(path: Path) -> tuple[float, float, dict[str, str]]:
    """(file MiB, bits per weight over all tensors, {tensor: type and digest}) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    tensors = {
        t.name: f"{t.tensor_type.name}:{hashlib.sha1(t.data.tobytes()).hexdigest()}"
        for t in reader.tensors
    }
    return path.stat().st_size / 2**20, 8 * n_bytes / n_weights, tensors


# ---------------------------------------------------------------------------------------------
# Part 1: speed and memory


@dataclass
class Step:
    """One measured process of a pipeline."""

    tool: str
    argv: list[str]
    out: Path
    walls: list[float] = field(default_factory=list)
    peaks_kib: list[int] = field(default_factory=list)


@dataclass
class Pipeline:
    """The processes that take one model to a quantized GGUF; steps run in order."""

    name: str
    model: str
    steps: list[Step]
    error: str | None = None

    def totals(self) -> list[float]:
        return [sum(walls) for walls in zip(*(s.walls for s in self.steps), strict=True)]


def speed_pipelines(tools: Tools, inputs: dict[str, Path]) -> list[Pipeline]:
    """Per model: llama.cpp's convert + quantize, then ours (when the command exists)."""
    pipelines = []
    out_dir = GGUF_WORK / "out"
    out_dir.mkdir(parents=True, exist_ok=True)  # convert_hf_to_gguf.py does not make it
    for model, path in inputs.items():
        base = out_dir / f"{model}-{tools.outtype}.gguf"
        theirs = out_dir / f"{model}-{SPEED_MIX}-llama.cpp.gguf"
        pipelines.append(Pipeline("llama.cpp", model, [
            Step(CONVERT, convert_argv(tools, path, base), base),
            Step(QUANTIZE, quantize_argv(tools, base, theirs, SPEED_MIX), theirs),
        ]))  # fmt: skip
        if tools.mlxedge:
            ours = out_dir / f"{model}-{SPEED_MIX}-mlxedge.gguf"
            argv = ours_argv(tools, path, ours, SPEED_MIX)
            pipelines.append(Pipeline("mlxedge", model, [Step(OURS, argv, ours)]))
    return pipelines


def measure_speed(pipelines: list[Pipeline], runs: int) -> None:
    """Run every pipeline ``runs`` times, interleaved; every output is deleted after its run."""
    logs = GGUF_WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for r in range(1, runs + 1):
        for p in pipelines:
            if p.error:
                continue
            for step in p.steps:
                step.out.unlink(missing_ok=True)
            for step in p.steps:
                log = logs / f"speed-{step.out.stem}.log"
                wall, peak_kib, code = bc.run_measured(step.argv, log)
                p.error = f"exit code {code}, see {log}" if code else check_gguf(step.out)
                if p.error:
                    print(f"FAIL {step.tool} {p.model}: {p.error}", flush=True)
                    break
                step.walls.append(wall)
                step.peaks_kib.append(peak_kib)
                print(
                    f"run {r}/{runs}  {step.tool:22s} {p.model:8s} {wall:8.2f} s "
                    f"{peak_kib / 1024:7.0f} MiB",
                    flush=True,
                )
            for step in p.steps:
                step.out.unlink(missing_ok=True)


def speed_table(pipelines: list[Pipeline]) -> str:
    """Per model: each step, llama.cpp's total, ours, and the ratio ours / llama.cpp."""
    rows = [
        "| model | tool | step | median wall s | peak RSS MiB | wall vs llama.cpp | "
        "RSS vs llama.cpp |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for model in dict.fromkeys(p.model for p in pipelines):
        label = bc.MODEL_LABELS[model]
        theirs = next((p for p in pipelines if p.model == model and p.name == "llama.cpp"), None)
        their_wall = their_peak = None
        if theirs and not theirs.error:
            for s in theirs.steps:
                rows.append(
                    f"| {label} | llama.cpp | `{s.tool}` | "
                    f"{statistics.median(s.walls):.2f} | {max(s.peaks_kib) / 1024:.0f} | | |"
                )
            their_wall = statistics.median(theirs.totals())
            their_peak = max(max(s.peaks_kib) for s in theirs.steps) / 1024
            rows.append(
                f"| {label} | llama.cpp | **total** (peak: larger step) | "
                f"{their_wall:.2f} | {their_peak:.0f} | 1.00x | 1.00x |"
            )
        elif theirs:
            rows.append(f"| {label} | llama.cpp | | failed: {theirs.error} | | | |")
        for p in pipelines:
            if p.model != model or p.name != "mlxedge":
                continue
            if p.error:
                rows.append(f"| {label} | mlxedge | `{OURS}` | failed: {p.error} | | | |")
                continue
            wall = statistics.median(p.totals())
            peak = max(p.steps[0].peaks_kib) / 1024
            ratios = ("", "")
            if their_wall:
                ratios = (f"**{wall / their_wall:.2f}x**", f"{peak / their_peak:.2f}x")
            rows.append(
                f"| {label} | mlxedge | `{OURS}` | {wall:.2f} | {peak:.0f} | "
                f"{ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Part 2: quality


@dataclass
class KLResult:
    """What llama-perplexity --kl-divergence reports, parsed."""

    tool: str
    mix: str
    mib: float
    bpw: float
    ppl: float
    ppl_err: float
    kld: float
    kld_err: float
    same_top: float
    same_top_err: float
    tensors: dict[str, str] = field(default_factory=dict)  # name -> type and digest of bytes


_NUM = r"([-+0-9.eE]+|nan|inf)"
_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "kld": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
    "same_top": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%",
}


def parse_kl_output(text: str) -> dict[str, tuple[float, float]]:
    """The mean PPL, mean KLD and same-top-token rate, each with its ± error."""
    found = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, text)
        if match is None:
            raise ValueError(f"llama-perplexity printed no {key!r} line")
        found[key] = (float(match.group(1)), float(match.group(2)))
    return found


def write_text(spec: str) -> tuple[Path, str]:
    """The evaluation text (mlxedge.texts' default or a named one) as a file, and its name."""
    from mlxedge.texts import load_text

    text = load_text(None if spec == "python-docs" else spec)
    path = GGUF_WORK / "quality" / f"text-{re.sub(r'[^A-Za-z0-9_.-]', '_', spec)}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text.content:
        path.write_text(text.content, encoding="utf-8")
    return path, text.name


def perplexity_base_argv(tools: Tools, f32: Path, text: Path, kld: Path, chunks: int) -> list[str]:
    return [str(tools.perplexity), "-m", str(f32), "-f", str(text), "-c", "512", "-b", "512",
            "--chunks", str(chunks), "--kl-divergence-base", str(kld)]  # fmt: skip


def perplexity_kl_argv(tools: Tools, quant: Path, kld: Path, chunks: int) -> list[str]:
    return [str(tools.perplexity), "-m", str(quant), "-c", "512", "-b", "512", "--chunks",
            str(chunks), "--kl-divergence-base", str(kld), "--kl-divergence"]  # fmt: skip


def run_logged(argv: list[str], log: Path) -> str | None:
    """Run ``argv``; its output into ``log``; None on success, else the problem."""
    with log.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    return f"exit code {code}, see {log}" if code else None


def measure_quality(
    tools: Tools, model: Path, mixes: list[str], text_spec: str, chunks: int
) -> tuple[list[KLResult], list[str], list[list[str]]]:
    """KL of every mix, llama.cpp's and ours, against llama.cpp's F32 GGUF of ``model``.

    Returns:
        The results, report lines (the F32 base's PPL, then any problems), and the command
        lines run.
    """
    qdir = GGUF_WORK / "quality"
    logs = GGUF_WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    text, text_name = write_text(text_spec)
    f32 = qdir / "smollm2-f32.gguf"
    kld = qdir / f"base-{text.stem}-{chunks}.kld"
    commands, problems, results = [], [], []
    argv = convert_argv(tools, model, f32)
    commands.append(argv)
    if check_gguf(f32) is not None:
        print(f"converting {model.name} to {f32.name}", flush=True)
        tmp = f32.with_suffix(".tmp.gguf")
        argv = convert_argv(tools, model, tmp)
        if problem := run_logged(argv, logs / "quality-convert.log"):
            return [], [f"llama.cpp convert failed: {problem}"], commands
        tmp.rename(f32)
    argv = perplexity_base_argv(tools, f32, text, kld, chunks)
    commands.append(argv)
    if kld.is_file() and base_perplexity(kld) is not None:
        print(f"llama-perplexity base: cached {kld.name}", flush=True)
    else:
        print(f"llama-perplexity base: {text_name}, {chunks} chunks of 512", flush=True)
        kld.unlink(missing_ok=True)
        if problem := run_logged(argv, logs / f"quality-{kld.stem}.log"):
            kld.unlink(missing_ok=True)
            return [], [f"llama-perplexity base failed: {problem}"], commands

    jobs = [("llama.cpp", mix) for mix in mixes]
    if tools.mlxedge:
        jobs += [("mlxedge", mix) for mix in (*mixes, "F32")]
    for tool, mix in jobs:
        out = qdir / f"smollm2-{mix}-{tool}.gguf"
        if tool == "llama.cpp":
            argv = quantize_argv(tools, f32, out, mix)
        else:
            argv = ours_argv(tools, model, out, mix)
        commands.append(argv)
        out.unlink(missing_ok=True)
        log = logs / f"quality-{out.stem}.log"
        problem = run_logged(argv, log) or check_gguf(out)
        if problem is None:
            argv = perplexity_kl_argv(tools, out, kld, chunks)
            problem = run_logged(argv, log.with_suffix(".kl.log"))
        if problem:
            problems.append(f"{tool} {mix}: {problem}")
            print(f"FAIL {tool} {mix}: {problem}", flush=True)
            continue
        stats = parse_kl_output(log.with_suffix(".kl.log").read_text(errors="replace"))
        mib, bpw, tensors = gguf_summary(out)
        out.unlink()
        result = KLResult(
            tool, mix, mib, bpw, *stats["ppl"], *stats["kld"], *stats["same_top"], tensors
        )
        results.append(result)
        print(
            f"{tool:9s} {mix:7s} {bpw:5.2f} bpw  PPL {result.ppl:8.3f}  "
            f"KL {result.kld:.5f} ± {result.kld_err:.5f}  same top {result.same_top:.2f} %",
            flush=True,
        )
    commands.append(perplexity_kl_argv(tools, Path("QUANT.gguf"), kld, chunks))
    problems.insert(0, f"F32 base (llama.cpp's convert): PPL {base_perplexity(kld)}")
    return results, problems, commands


def base_perplexity(kld: Path) -> str | None:
    """The F32 model's PPL from the log of the run that wrote ``kld`` (None unless it finished)."""
    log = GGUF_WORK / "logs" / f"quality-{kld.stem}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    return f"{float(match[1]):.3f} ± {float(match[2]):.3f}" if match else None


def same_tensors(ours: KLResult, theirs: KLResult | None) -> str:
    """How many of our tensors have llama.cpp's name, type and bytes, e.g. `272/272`."""
    if theirs is None or not ours.tensors:
        return ""
    same = sum(theirs.tensors.get(name) == v for name, v in ours.tensors.items())
    return f"{same}/{max(len(ours.tensors), len(theirs.tensors))}"


def quality_table(results: list[KLResult]) -> str:
    """One row per mix and tool: size, PPL, KL, same-top rate, KL ratio, identical tensors."""
    rows = [
        "| mix | tool | MiB | bits/weight | PPL | mean KL ± err | same top % | "
        "KL ours / llama.cpp | tensors identical to llama.cpp's | published llama.cpp KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    theirs = {r.mix: r for r in results if r.tool == "llama.cpp"}
    for r in sorted(results, key=lambda r: (MIXES.index(r.mix), r.tool)):
        ratio = same = ""
        if r.tool == "mlxedge" and r.mix in theirs:
            ratio = f"**{r.kld / theirs[r.mix].kld:.2f}**" if theirs[r.mix].kld > 0 else ""
            same = same_tensors(r, theirs[r.mix])
        published = PUBLISHED_KL.get(r.mix, "") if r.tool == "llama.cpp" else ""
        rows.append(
            f"| {r.mix} | {r.tool} | {r.mib:.1f} | {r.bpw:.2f} | {r.ppl:.3f} | "
            f"{r.kld:.5f} ± {r.kld_err:.5f} | {r.same_top:.2f} | {ratio} | {same} | {published} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Part 3: K-quant reconstruction error on ffn_down


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

    from mlxedge.formats.ggml_blocks import TYPES

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

    from mlxedge.formats.ggml_blocks import dequantize_rows, native_available, quantize_rows
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
    import mlxedge.formats.ggml_blocks as blocks

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


# ---------------------------------------------------------------------------------------------
# Report


def short_argv(argv: list[str]) -> str:
    """A command line with paths shortened to the repository, for the results file."""

    def short(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        if arg.endswith(os.sep + "mlxedge"):
            return "mlxedge"
        if arg.startswith(str(REPO_DIR) + os.sep):
            return os.path.relpath(arg, REPO_DIR)
        return arg

    return shlex.join(short(a) for a in argv)


def mlxedge_rev() -> str:
    """The repository's commit, marked when the package's code has uncommitted changes."""
    git = ["git", "-C", str(REPO_DIR)]
    rev = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    status = [*git, "status", "--porcelain", "--", "mlxedge", "pyproject.toml"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return (rev.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def block_name(part: str, text_spec: str) -> str:
    """The RESULTS.md block of a part: quality on another text than the default gets its own."""
    if part != "quality" or text_spec == "python-docs":
        return part
    return f"quality-{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(text_spec).name)}"


def part_markers(part: str) -> tuple[str, str]:
    return f"<!-- gguf-bench:{part}:start -->", f"<!-- gguf-bench:{part}:end -->"


def _replace_between(text: str, start: str, end: str, body: str) -> str | None:
    i, j = text.find(start), text.find(end)
    if i == -1 or j < i:
        return None
    return text[: i + len(start)] + "\n" + body + "\n" + text[j:]


def write_results(blocks: dict[str, str], path: Path = RESULTS_MD) -> None:
    """Replace the measured parts' blocks inside this benchmark's section of ``path``.

    The section holds one block per part, so a run of some parts keeps the others' last results.
    Everything outside the section is kept.
    """
    text = path.read_text() if path.exists() else "# mlxedge benchmark results\n"
    if _replace_between(text, START_MARKER, END_MARKER, "") is None:
        empty = [f"{a}\n(not measured yet)\n{b}" for a, b in map(part_markers, PARTS)]
        section = "\n".join([START_MARKER, SECTION_TITLE, "", "\n\n".join(empty), END_MARKER])
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    for part, body in blocks.items():
        replaced = _replace_between(text, *part_markers(part), body)
        if replaced is None:  # a section written before this part existed: add the block
            start, end = part_markers(part)
            replaced = text.replace(END_MARKER, f"\n{start}\n{body}\n{end}\n{END_MARKER}")
        text = replaced
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What one part contributes to the results section."""

    lines: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def run_speed(args, tools: Tools, inputs: dict[str, Path], report: Report) -> None:
    """Part 1: time both paths to Q4_K_M on each model."""
    speed_inputs = {m: p for m, p in inputs.items() if m in args.models}
    if "llama1b" in speed_inputs:
        if "smollm2" not in inputs:
            print("SKIP llama1b speed: it borrows SmolLM2's tokenizer, which is missing")
            del speed_inputs["llama1b"]
        else:
            speed_inputs["llama1b"] = prepare_llama1b_with_tokenizer(
                inputs["llama1b"], inputs["smollm2"]
            )
            report.notes.append(
                "1B-shape speed input: the cached folder with SmolLM2's tokenizer files "
                "(its own test tokenizer's pre-tokenizer is unknown to convert_hf_to_gguf.py)"
            )
    pipelines = speed_pipelines(tools, speed_inputs)
    measure_speed(pipelines, args.runs)
    report.failed |= any(p.error for p in pipelines)
    report.commands += [s.argv for p in pipelines for s in p.steps]
    report.lines += [
        f"#### Speed and memory: {SPEED_MIX} from a Hugging Face folder",
        "",
        f"Median wall time and largest peak RSS of whole processes over {args.runs} run(s), "
        "interleaved, outputs deleted between runs. llama.cpp's path is two processes "
        f"(convert to {args.convert_outtype.upper()}, then quantize); its total is the median of "
        "the per-run sums, its peak the larger step's. Below 1 is better.",
        "",
        speed_table(pipelines),
        "",
    ]


def run_quality(args, tools: Tools, smollm2: Path, report: Report) -> None:
    """Part 2: KL divergence of each mix, ours and llama.cpp's, on SmolLM2."""
    results, problems, commands = measure_quality(
        tools, smollm2, args.mixes, args.text, args.chunks
    )
    report.commands += commands
    report.failed |= len(problems) > 1 or not results
    _, text_name = write_text(args.text)
    report.lines += [
        "#### Quality: KL divergence against llama.cpp's F32 GGUF, SmolLM2-135M-Instruct",
        "",
        f"Text: {text_name} (`--text {args.text}`), the first {args.chunks} windows of 512 "
        "tokens; llama-perplexity scores the second half of each window. KL is "
        "KL(F32 || quantized) per token in nats, ± its standard error; PPL is the quantized "
        "model's. Bits per weight count every tensor. The published column is llama.cpp on the "
        "`anchors` text, 19 windows (DESIGN.md). Our F32 row checks that our F32 GGUF is "
        "llama.cpp's model (KL near 0).",
        "",
        quality_table(results),
        "",
        *(f"- {p}" for p in problems),
        "",
    ]


def run_kquant(args, inputs: dict[str, Path], report: Report) -> None:
    """Part 3: K-quant reconstruction error of ffn_down tensors, ours / llama.cpp's."""
    jobs = []
    for model in args.kquant_models:
        if model not in inputs:
            continue
        layers = args.kquant_layers_llama1b if model == "llama1b" else None
        rows = (args.kquant_rows_llama1b or None) if model == "llama1b" else None
        for i in kquant_tensors(model, layers):
            for t in K_TYPES:
                tensor = f"model.layers.{i}.mlp.down_proj.weight"
                jobs.append((model, str(inputs[model]), tensor, rows, t))
    results = measure_kquants(jobs)
    ratios = [r["err_ours"] / r["err_theirs"] for r in results]
    report.failed |= bool(ratios) and (max(ratios) > 1.02 or statistics.fmean(ratios) > 1.0)
    report.lines += [
        "#### K-quant reconstruction error on `ffn_down`: ours / llama.cpp",
        "",
        "Squared reconstruction error sum((w - dequant(quant(w)))^2) per tensor: ours is "
        "`ggml_blocks.quantize_rows` then `dequantize_rows`; llama.cpp's is `ggml_quantize_chunk` "
        "(llama-cpp-python's libggml-base, no importance matrix: what llama-quantize runs) read "
        "back by gguf-py's dequantizer. Targets: mean <= 1.0, none above 1.02. Times are of "
        "quantizing one tensor: ours on the path `quantize_rows` takes (the native kernel on two "
        "threads where it is built, else the numpy specification), llama.cpp's on one thread.",
        "",
        kquant_table(results),
        "",
    ]
    if "llama1b" in args.kquant_models and (args.kquant_layers_llama1b or args.kquant_rows_llama1b):
        report.notes.append(
            f"1B-shape K-quant subset: layers {args.kquant_layers_llama1b or 'all'}, first "
            f"{args.kquant_rows_llama1b or 'all'} rows of each"
        )


SECTION_TITLE = "### GGUF export against llama.cpp (convert_hf_to_gguf.py + llama-quantize)"


def render(report: Report, tools: Tools | None, part: str) -> str:
    """One part's block: its tables, then the machine, versions and command lines."""
    versions = [f"mlxedge {importlib.metadata.version('mlxedge')} (git {mlxedge_rev()})"]
    if part == "kquant":
        versions += [
            f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} (llama.cpp "
            f"{llama_cpp_commit()})",
            f"gguf-py {importlib.metadata.version('gguf')}",
        ]
    else:
        versions.append(
            f"llama.cpp {llama_cpp_commit()} (from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist)"
        )
    if tools and part in ("speed", "quality"):
        versions.append(f"converter venv: {convert_versions(tools.convert_python)}")
    command = shlex.join(["python", "bench/bench_gguf.py", *sys.argv[1:]])
    lines = [
        *report.lines,
        bc.machine_and_versions()[0],
        f"- versions: {', '.join(versions)}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        *(f"- note: {n}" for n in report.notes),
    ]
    if part != "kquant":
        lines.append(
            f"- llama.cpp build: `cmake {' '.join(CMAKE_ARGS)}`, targets {', '.join(TOOLS)}"
        )
    if report.commands:
        unique = dict.fromkeys(tuple(c) for c in report.commands)
        lines += ["", "Command lines run:", "", *(f"- `{short_argv(list(c))}`" for c in unique)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", type=bc._csv(PARTS), default=list(PARTS), help="default: speed,quality,kquant"
    )
    parser.add_argument("--models", type=bc._csv(MODELS), default=list(MODELS), help="for speed")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (default 3)")
    parser.add_argument(
        "--mixes", type=bc._csv(MIXES), default=list(QUALITY_MIXES), help="for quality"
    )
    parser.add_argument(
        "--text",
        default="python-docs",
        help="quality text: python-docs (mlxedge's default), anchors, choice, or a UTF-8 file",
    )
    parser.add_argument(
        "--chunks", type=int, default=16, help="windows of 512 tokens to score (default 16)"
    )
    parser.add_argument(
        "--convert-outtype",
        choices=CONVERT_OUTTYPES,
        default="f32",
        help="convert_hf_to_gguf.py --outtype (default f32)",
    )
    parser.add_argument(
        "--kquant-models", type=bc._csv(MODELS), default=list(MODELS), help="for kquant"
    )
    parser.add_argument(
        "--kquant-layers-llama1b",
        default="",
        help="ffn_down layers of the 1B shape, e.g. 0,5,10,15 (default: all 16)",
    )
    parser.add_argument(
        "--kquant-rows-llama1b",
        type=int,
        default=0,
        help="first rows of each 1B ffn_down tensor (default 0 = all 2048)",
    )
    parser.add_argument("--smollm2-dir", type=Path, help="an existing fp32 SmolLM2 HF folder")
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.name} alone"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.chunks < 2:
        parser.error("--runs must be at least 1 and --chunks at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse options, prepare tools and inputs, measure the chosen parts, record the tables."""
    args = parse_args(argv)
    GGUF_WORK.mkdir(parents=True, exist_ok=True)
    reports = {part: Report() for part in args.parts}
    mlxedge = bc.mlxedge_executable()
    export_problem = bc.cli_unavailable([mlxedge, "export", "gguf"]) if mlxedge else "not found"
    if export_problem:
        message = f"`mlxedge export gguf` is not available yet ({export_problem})"
        print(f"NOTE: {message}; measuring llama.cpp only.", flush=True)
        for part in {"speed", "quality"} & set(args.parts):
            reports[part].notes.append(message + "; only llama.cpp was measured")
    import_problem = bc.cli_unavailable([mlxedge, "import"]) if mlxedge else "not found"

    tools = None
    if {"speed", "quality"} & set(args.parts):
        src = prepare_llama_source()
        built = build_llama_tools(src)
        tools = Tools(
            mlxedge=None if export_problem else mlxedge,
            convert_python=prepare_convert_venv(),
            convert_script=src / "convert_hf_to_gguf.py",
            quantize=built["llama-quantize"],
            perplexity=built["llama-perplexity"],
            outtype=args.convert_outtype,
        )
    inputs: dict[str, Path] = {}
    smollm2 = args.smollm2_dir or bc.prepare_smollm2(mlxedge, import_problem)
    if smollm2 is not None:
        inputs["smollm2"] = smollm2.resolve()
    if "llama1b" in args.models or "llama1b" in args.kquant_models:
        inputs["llama1b"] = bc.prepare_llama1b()

    if "speed" in args.parts:
        run_speed(args, tools, inputs, reports["speed"])
    if "quality" in args.parts and "smollm2" in inputs:
        run_quality(args, tools, inputs["smollm2"], reports["quality"])
    if "kquant" in args.parts:
        run_kquant(args, inputs, reports["kquant"])

    blocks = {block_name(p, args.text): render(r, tools, p) for p, r in reports.items()}
    print()
    print("\n\n".join(blocks.values()))
    if not args.no_write:
        write_results(blocks)
        print(f"\nwritten to {RESULTS_MD}")
    return int(any(r.failed for r in reports.values()))


if __name__ == "__main__":
    sys.exit(main())
