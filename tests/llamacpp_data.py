"""llama.cpp's own test data, unpacked once at install time so that no test touches the network.

The llama-cpp-python source distribution vendors the whole llama.cpp tree; its installed wheel
carries none of it. `make install` downloads the sdist (pip) and runs this script on it, which
copies out what the tests judge our tokenizer export by:

- `models/ggml-vocab-*.gguf` with their `.inp` strings and `.out` ids (made by the Hugging Face
  tokenizers), which llama.cpp's test-tokenizer-0 runs;
- `src/llama-vocab.cpp`, whose pre-tokenizer table our own must state.

Usage: python tests/llamacpp_data.py SDIST.tar.gz   (unpacks into DATA_DIR, complete or not at all)
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the version pyproject.toml pins for the llamacpp extra
# Inside the virtual environment, so a fresh venv (or `make clean`) never sees stale data.
DATA_DIR = Path(sys.prefix) / "share" / "mlxedge-tests" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
_VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
_COMPLETE = ".complete"


def _wanted(relative: str) -> bool:
    folder, _, name = relative.partition("/")
    if folder == "models":
        return name.startswith("ggml-vocab-") and "/" not in name
    return relative == "src/llama-vocab.cpp"


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished extraction."""
    return (folder / _COMPLETE).is_file()


def extract(sdist: Path, dest: Path = DATA_DIR) -> Path:
    """Copy the test data out of `sdist` into `dest`, via a temporary sibling and one rename."""
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        count = 0
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                relative = member.name.removeprefix(_VENDORED)
                if relative == member.name or not member.isfile() or not _wanted(relative):
                    continue
                (temp / relative).parent.mkdir(parents=True, exist_ok=True)
                (temp / relative).write_bytes(tar.extractfile(member).read())
                count += 1
        if not (temp / "src" / "llama-vocab.cpp").is_file() or count < 10:
            raise SystemExit(f"{sdist}: not llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist")
        (temp / _COMPLETE).write_text(f"{count} files from {Path(sdist).name}\n")
        shutil.rmtree(dest, ignore_errors=True)
        temp.rename(dest)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(f"llama.cpp test data: {extract(Path(sys.argv[1]))}")
