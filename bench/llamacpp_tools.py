"""llama.cpp's side of the GGUF benchmark: its source, tools, converter venv and command lines.

Everything comes from the llama-cpp-python source distribution, which vendors llama.cpp, and is
made once under ``bench/work/``:

- the sdist, downloaded by pip (``pip download llama-cpp-python==VERSION --no-binary :all:``)
  into ``bench/work/sdist/`` and unpacked there;
- ``llama-quantize`` and ``llama-perplexity``, CPU-only Release builds by cmake, in
  ``bench/work/llama.cpp/build/bin/``;
- a venv with ``convert_hf_to_gguf.py``'s dependencies, ``bench/work/convert-venv/``.

``Tools`` holds what was found or built; the ``*_argv`` functions are the command lines the parts
run (ours included, so that both sides are written in one place).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import bench_convert as bc  # the bench folder is on sys.path: bench_gguf.py puts it there

WORK_DIR = bc.WORK_DIR
REPO_DIR = bc.REPO_DIR
GGUF_WORK = WORK_DIR / "gguf"  # this benchmark's outputs, caches and logs

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


# ---------------------------------------------------------------------------------------------
# Source, build, converter venv


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
    installed = REPO_DIR / ".venv" / "sdist" / archive.name  # `make install` fetched it already
    if not archive.is_file() and installed.is_file():
        SDIST_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(installed, archive)
    if not archive.is_file():
        # --no-binary for this package only: ":all:" would build its build dependencies from
        # source too (cmake among them), which takes many minutes.
        argv = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                "--no-deps", "--no-binary", "llama-cpp-python", "-d", str(SDIST_DIR)]  # fmt: skip
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


# ---------------------------------------------------------------------------------------------
# Command lines and their outputs


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


def perplexity_base_argv(tools: Tools, f32: Path, text: Path, kld: Path, chunks: int) -> list[str]:
    return [str(tools.perplexity), "-m", str(f32), "-f", str(text), "-c", "512", "-b", "512",
            "--chunks", str(chunks), "--kl-divergence-base", str(kld)]  # fmt: skip


def perplexity_kl_argv(tools: Tools, quant: Path, kld: Path, chunks: int) -> list[str]:
    return [str(tools.perplexity), "-m", str(quant), "-c", "512", "-b", "512", "--chunks",
            str(chunks), "--kl-divergence-base", str(kld), "--kl-divergence"]  # fmt: skip
