"""Resolve what the user passed as MODEL into a `Model`: the one loader every command uses.

MODEL is one of: `smollm2` (the embedded default model), a `.gguf` file, a Hugging Face folder,
an MLX folder (one with a `quantization` block in its config), a Core ML export (a `.mlpackage`
or the folder `export coreml` writes), or a Hub id (`org/name`, fetched
into the Hugging Face cache; `HF_HUB_OFFLINE` and `HF_TOKEN` are honoured by huggingface_hub
itself).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .archs import unwrap
from .errors import MlxedgeError
from .formats.hf import HFCheckpoint
from .inputs import JSON_CAP, TOKENIZER_CAP, read_bytes, read_json
from .model import Model, Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"

# Files carried into every artifact unchanged (weights and config.json are rewritten instead).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# What a Hub download fetches: no pickles, no other frameworks' weights.
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", *SIDE_FILES]

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_QUANTIZED_TENSOR_SUFFIXES = (".scales", ".qweight", ".qzeros", ".weight_scale", ".g_idx")


def resolve(model: str, revision: str | None = None) -> Model:
    """Open MODEL, whatever it is.

    Args:
        model: `smollm2`, a `.gguf` path, a Hugging Face or MLX folder, or a Hub id.
        revision: a Hub branch, tag or commit (Hub ids only).

    Returns:
        The model, with its tensors not yet read.

    Raises:
        MlxedgeError: the path is missing or unreadable, the checkpoint is in a quantized format
            this project does not read (GPTQ, AWQ, FP8), its architecture is unsupported, or a
            Hub id cannot be fetched.
    """
    if model == DEFAULT_MODEL:
        from .default_model import default_model_path

        model_ = _from_gguf(default_model_path())
        # The GGUF's own general.name describes a training run; name the published model instead.
        model_.name, model_.origin = "SmolLM2-135M-Instruct", DEFAULT_MODEL
        model_.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
        # Presented as the original model, not as the Q4_1 file it ships as.
        model_.kind, model_.bits = "builtin", None
        return model_
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise MlxedgeError("no such GGUF file", path=path, fix="check the path")
        return _from_gguf(path)
    if path.suffix == ".mlpackage" or (path.is_dir() and any(path.glob("*.mlpackage"))):
        from .formats.coreml.load import load_coreml

        return check_against_spec(load_coreml(path))
    if path.exists():
        if not path.is_dir():
            raise MlxedgeError(
                "not a model folder or a .gguf file",
                path=path,
                fix="pass a Hugging Face folder (config.json + *.safetensors) or a .gguf file",
            )
        return from_folder(path, origin=path.absolute().name)  # `.` is named after the folder
    if is_hub_id(model):
        return from_folder(_download(model, revision), origin=model, hub_id=model)
    raise MlxedgeError(
        "no such file or folder, and not a Hub id (org/name)",
        path=model,
        fix=f"pass a model folder, a .gguf file, a Hub id, or '{DEFAULT_MODEL}'",
    )


def local_path(model: str) -> Path | None:
    """The file or folder MODEL names on this machine, without reading or downloading anything:
    for checks that must run before any work (a Hub id gives None; `resolve` knows its folder)."""
    if model == DEFAULT_MODEL:
        from .default_model import default_model_path

        try:
            return default_model_path()
        except MlxedgeError:
            return None  # `resolve` will say what is missing
    path = Path(model).expanduser()
    return path if os.path.lexists(path) else None


def _from_gguf(path: Path) -> Model:
    from .formats.gguf.load import load_gguf

    return check_against_spec(load_gguf(path))


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch a Hub snapshot (safetensors, config and tokenizer files only) into the HF cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise MlxedgeError(
            "this model is gated",
            path=repo_id,
            fix="accept its licence on the Hub and set HF_TOKEN to a token with access",
        ) from None
    except RevisionNotFoundError:
        raise MlxedgeError(f"revision {revision!r} not found", path=repo_id) from None
    except RepositoryNotFoundError:
        raise MlxedgeError(
            "no such model on the Hub (or it is private)",
            path=repo_id,
            fix="check the id, or set HF_TOKEN for a private model",
        ) from None
    except LocalEntryNotFoundError:
        raise MlxedgeError(
            "not in the local Hugging Face cache, and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set)",
            path=repo_id,
            fix="download it once while online, or pass a local folder",
        ) from None
    except OSError as e:  # network errors surface as OSError subclasses
        raise MlxedgeError(f"could not download: {e}", path=repo_id) from None


def is_hub_id(model: str) -> bool:
    """Whether MODEL reads as a Hub id (`org/name`) rather than a path."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "/"))


def read_json_object(path: Path, missing_ok: bool = False) -> dict:
    """A JSON file holding one object, with one clear error for each way it can be wrong.

    Args:
        path: the file.
        missing_ok: a missing file reads as {} instead of raising.
    """
    if missing_ok and not os.path.lexists(path):
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise MlxedgeError("not a JSON object", path=path)
    return data


def read_config(folder: Path) -> dict:
    """A model folder's config.json (see `read_json_object`)."""
    if not (folder / "config.json").exists():
        raise MlxedgeError(
            "no config.json in this folder",
            path=folder,
            fix="pass a Hugging Face model folder (config.json + *.safetensors)",
        )
    return read_json_object(folder / "config.json")


def _refuse_foreign_quantization(folder: Path, config: dict, names: list[str]) -> None:
    """Checkpoints quantized by other tools (GPTQ, AWQ, FP8) are not read; say what instead."""
    qc = config.get("quantization_config")
    if qc is not None or any(n.endswith(_QUANTIZED_TENSOR_SUFFIXES) for n in names):
        method = (qc or {}).get("quant_method", "a quantized format")
        raise MlxedgeError(
            f"this checkpoint is already quantized ({method})",
            path=folder,
            fix="pass the original float16/bfloat16/float32 model it was made from",
        )


def from_folder(folder: Path, origin: str, hub_id: str | None = None) -> Model:
    """Open a Hugging Face folder, or an MLX folder (its config has a `quantization` block).

    Args:
        folder: contains config.json and *.safetensors (sharded with an index, or not).
        origin: how the model is named in reports and cards (no directories).
        hub_id: the Hub id, when the folder is a Hub snapshot.

    Raises:
        MlxedgeError: unreadable folder, missing/invalid config.json, unsupported architecture,
            a checkpoint in another tool's quantized format, or missing tensors.
    """
    config = read_config(folder)
    config, checkpoint = unwrap(
        config, HFCheckpoint.from_folder(folder), str(folder / "config.json")
    )
    names = [i.name for i in checkpoint.infos()]
    quantization = config.get("quantization") if isinstance(config, dict) else None
    if quantization is not None:
        from .formats.mlx import mlx_weights

        weights, bits = mlx_weights(checkpoint, quantization, folder)
        kind = "mlx"
    else:
        _refuse_foreign_quantization(folder, config, names)
        weights, bits, kind = checkpoint, None, "hf"
    side = read_side_files(folder)
    name = hub_id.split("/")[-1] if hub_id else folder.absolute().name  # `.`: the folder's name
    readme = side_file(folder, "README.md")
    license_id = _card_field(readme, "license") if readme is not None else None
    model = Model(
        name=name,
        origin=origin,
        kind=kind,
        path=folder,
        config=config,
        weights=weights,
        tokenizer=Tokenizer(side, where=str(folder / "tokenizer.json")),
        quantization=quantization,
        bits=bits,
        license=license_id,
        base_model=hub_id,
    )
    return check_against_spec(model)


def check_against_spec(model: Model) -> Model:
    """Refuse a model whose tensors disagree with its config, before anything is written.

    Every tensor of the architecture's table must be present with the shape the config implies
    (a config of 0 or 5 layers over 2 blocks, a vocabulary over fewer embedding rows, a wrong
    KV-head count or a transposed weight otherwise gives an artifact other runtimes refuse).

    Raises:
        MlxedgeError: naming the first tensor that is missing or misshapen, and the file.
    """
    where = model.path
    config_file = "config.json" if model.kind in ("hf", "mlx", "coreml") else "metadata"
    shapes = {i.name: tuple(i.shape) for i in model.weights.infos()}
    table = model.arch.tensors()
    missing = [e.name for e in table if e.name not in shapes]
    if missing:
        raise MlxedgeError(
            f"{len(missing)} tensors the {config_file} calls for are missing, e.g. {missing[0]!r}"
            f" (it describes {model.arch.spec.n_layers} layers)",
            path=where,
            fix="the checkpoint is incomplete or its config does not belong to it; "
            "download or convert it again",
        )
    for entry in table:
        if shapes[entry.name] != entry.shape:
            raise MlxedgeError(
                f"tensor {entry.name!r} has shape {list(shapes[entry.name])}, but the "
                f"{config_file} implies {list(entry.shape)}",
                path=where,
                fix="the config does not match the weights; use the model's original config",
            )
    return model


def read_side_files(folder: Path) -> dict[str, bytes]:
    """The bytes of every side file the folder has of its own (see `side_file`), capped."""
    side = {}
    for name in SIDE_FILES:
        f = side_file(folder, name)
        if f is not None:
            side[name] = read_bytes(f, TOKENIZER_CAP, "tokenizer file")
    return side


def side_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if it is a regular file of the folder's own, else None.

    A file that is a symbolic link leading outside the folder is skipped with a warning naming
    it: a cloned repository could otherwise plant a link to a private file (an SSH key, say)
    whose contents would travel inside every artifact. Links into the same Hugging Face cache
    repository's `blobs/` folder are how every file of a Hub snapshot is stored, so those count
    as the folder's own.

    Args:
        folder: the model folder.
        name: a file name in it (tokenizer.json, README.md, ...).

    Returns:
        The path to read, or None when the file is absent, not a regular file, or skipped.
    """
    path = folder / name
    if not path.is_file():  # follows links; a dangling one is absent
        return None
    real, home = path.resolve(), folder.resolve()
    if real.parent == home or home in real.parents:
        return path
    snapshots = home.parent
    if snapshots.name == "snapshots" and real.parent == snapshots.parent / "blobs":
        return path
    log.warning(
        "%s: skipped: a symbolic link to %s, outside the model folder (replace the link with "
        "the file itself to include it)",
        path,
        real,
    )
    return None


def _card_field(readme: Path, key: str) -> str | None:
    """A scalar from a model card's YAML front matter (`key: value`), without a YAML parser."""
    try:
        text = read_bytes(readme, JSON_CAP, "model card").decode("utf-8", errors="replace")
    except MlxedgeError:
        return None  # the card only supplies an optional licence field
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    for line in front.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() == key and v.strip():
            return v.strip().strip("'\"")
    return None
