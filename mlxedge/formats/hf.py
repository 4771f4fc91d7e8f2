"""A Hugging Face folder: its safetensors weights read as one `TensorSource` (one file, or shards
with their index), and any model written as a plain folder (config.json, safetensors, tokenizer
files).

The writer serves `mlxedge import FILE.gguf -o DIR`: the GGUF becomes a folder that transformers,
mlx-lm and `mlxedge quantize` read like any other checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..archs import Role
from ..atomic import atomic_output
from ..errors import MlxedgeError
from ..inputs import read_json
from ..model import Model, TensorInfo
from ..plan import TensorPlan
from ..quant.schemes import storage_dtype
from .safetensors import INDEX_NAME, SafetensorsFile, ShardedWriter


class HFCheckpoint:
    """The safetensors weights of a Hugging Face model folder, as a `TensorSource`.

    Use `HFCheckpoint.from_folder` to build one.

    Args:
        files: opened shards, in reading order.
        owners: tensor name -> the shard holding it, in reading order.
    """

    def __init__(self, files: list[SafetensorsFile], owners: dict[str, SafetensorsFile]) -> None:
        self.files = files
        self._owners = owners

    @classmethod
    def from_folder(cls, folder: Path) -> HFCheckpoint:
        """Open the weights of a model folder without reading any tensor data.

        The shard index (`model.safetensors.index.json`) decides which tensors exist when present;
        otherwise every `*.safetensors` file in the folder is read, in sorted order.

        Args:
            folder: the model folder.

        Returns:
            The checkpoint, ordered by shard and then by position within the shard.

        Raises:
            MlxedgeError: the folder has no safetensors weights, the index is malformed or names
                missing shards or tensors, or a tensor appears in two shards.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise MlxedgeError("is not a folder", path=folder, fix="pass a model folder")
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            return cls._from_index(folder, index_path)
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise MlxedgeError(
                "holds no *.safetensors weights; only safetensors are read, never .bin/.pt "
                "pickles, because loading a pickle can run arbitrary code",
                path=folder,
                fix="convert the weights to safetensors, or pass a model published in safetensors",
            )
        files = [SafetensorsFile(p) for p in paths]
        owners: dict[str, SafetensorsFile] = {}
        for shard in files:
            for info in shard.infos():
                if info.name in owners:
                    raise MlxedgeError(
                        f"tensor {info.name!r} is in both {owners[info.name].path.name} and "
                        f"{shard.path.name}",
                        path=folder,
                        fix="remove the stray .safetensors file, or add a " + INDEX_NAME,
                    )
                owners[info.name] = shard
        return cls(files, owners)

    @classmethod
    def _from_index(cls, folder: Path, index_path: Path) -> HFCheckpoint:
        fix = "download or convert the model again"
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if weight_map is None:
            raise MlxedgeError("has no weight_map object", index_path, fix)
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise MlxedgeError("weight_map must map tensor names to file names", index_path, fix)
        by_file: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            by_file.setdefault(file_name, []).append(name)
        files, owners = [], {}
        for file_name in sorted(by_file):
            path = folder / file_name
            # An index is input too: it must name files in the model folder. Checked on the name,
            # not the resolved path: a Hub cache snapshot's shards are symlinks into its blobs.
            if Path(file_name).name != file_name or file_name in (".", ".."):
                raise MlxedgeError(f"names a file outside the folder: {file_name!r}", index_path)
            if not path.is_file():
                raise MlxedgeError(f"names {file_name}, which is missing", index_path, fix)
            shard = SafetensorsFile(path)
            present = {info.name for info in shard.infos()}
            missing = [name for name in by_file[file_name] if name not in present]
            if missing:
                raise MlxedgeError(
                    f"names {len(missing)} tensors missing from {file_name}, e.g. {missing[0]!r}",
                    index_path,
                    fix,
                )
            files.append(shard)
            wanted = set(by_file[file_name])
            owners.update((info.name, shard) for info in shard.infos() if info.name in wanted)
        return cls(files, owners)

    def infos(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype name, shard by shard in data order.

        Returns:
            One TensorInfo per tensor.
        """
        return [
            info
            for shard in self.files
            for info in shard.infos()
            if self._owners.get(info.name) is shard
        ]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor (or rows [start, stop) of it), copied out of its shard.

        Args:
            name: the tensor's name.
            rows: read only these rows of the first axis.

        Returns:
            The tensor with its stored shape and dtype.

        Raises:
            KeyError: no shard holds a tensor of that name.
        """
        try:
            shard = self._owners[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in the checkpoint") from None
        return shard.read(name, rows)


class HFFolderWriter:
    """A plain Hugging Face folder as a `pipeline.Writer`: config.json and the tokenizer files
    first, then the safetensors shards tensor by tensor."""

    def __init__(self, folder: Path, model: Model, dtype: str) -> None:
        self.folder, self.model, self.dtype = folder, model, dtype
        self._shards: ShardedWriter | None = None

    def begin(self, plans: list[TensorPlan]) -> None:
        config = dict(self.model.arch.output_config())
        config["torch_dtype"] = self.dtype
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (self.folder / "config.json").write_text(text)
        for name, data in sorted(self.model.side_files.items()):
            (self.folder / name).write_bytes(data)
        infos = [TensorInfo(p.name, p.shape, self.dtype) for p in plans]
        self._shards = ShardedWriter(self.folder, infos, {"format": "pt"})

    def write(self, plan: TensorPlan, arrays: list[np.ndarray]) -> None:
        self._shards.write(plan.name, arrays[0])

    def finish(self, report) -> None:
        self._shards.close()

    def abort(self) -> None:
        if self._shards is not None:
            self._shards.abort()


def write_hf_folder(
    source: Model,
    output: Path,
    dtype: str = "float32",
    force: bool = False,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> Path:
    """Write `source` as an unquantized Hugging Face folder, one tensor at a time.

    Args:
        source: the model.
        output: folder to create (must not exist unless `force`).
        dtype: float dtype of every tensor ("float32" keeps dequantized GGUF weights exact).
        force: replace an existing output (one mlxedge wrote).
        on_tensor: called after each tensor is written.

    Returns:
        The output folder.

    Raises:
        MlxedgeError: an output mlxedge may not write, full disk, bad dtype, bad input (NaN/Inf).
    """
    from ..pipeline import ConvertReport, convert

    storage_dtype(dtype)
    arch = source.arch
    plans = [
        TensorPlan(i.name, i.name, tuple(i.shape), arch.entry(i.name), i.dtype, dtype=dtype)
        for i in source.weights.infos()
        if arch.role(i.name) != Role.DROP
    ]
    report = ConvertReport(output=Path(output), params=sum(p.params for p in plans))
    with atomic_output(output, force=force, protect=[source.path]) as tmp:
        writer = HFFolderWriter(tmp, source, dtype)
        try:
            convert(source, plans, writer, report, on_tensor=on_tensor)
        except BaseException:
            writer.abort()
            raise
    return Path(output)
