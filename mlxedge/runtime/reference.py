"""The reference forward pass: every architecture's own forward, executed by numpy in float32.

This is the yardstick every other backend is compared with, and the CPU fallback: it depends on
nothing but numpy and reads weights from any `TensorSource` — an original checkpoint, a GGUF file
dequantized, or an MLX folder dequantized exactly as MLX computes (see `formats.mlx`). The
decoder itself is written once in its `archs/` module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..archs import Architecture, arch_for
from ..errors import MlxedgeError, non_finite
from ..model import TensorSource
from .numpy_ops import NumpyOps


class ReferenceModel:
    """A model held as float32 numpy arrays, run by its architecture's forward.

    Args:
        arch: the architecture (with its spec).
        params: every parameter of the architecture's table, float32, by Hugging Face name.
    """

    def __init__(self, arch: Architecture, params: dict[str, np.ndarray]) -> None:
        self.arch = arch
        self.ops = NumpyOps(params)
        self.vocab_size = arch.spec.vocab_size

    @classmethod
    def from_source(
        cls, config: dict, source: TensorSource, where: str | Path | None = None
    ) -> ReferenceModel:
        """Read every parameter the architecture's table lists from `source` (as float32).

        Args:
            config: the model's config.
            source: its tensors.
            where: the file or folder they come from, named in errors.

        Raises:
            MlxedgeError: the config is unusable, the checkpoint lacks a parameter, or one
                holds NaN or Inf values.
        """
        arch = arch_for(config, "config.json")
        names = [e.name for e in arch.tensors()]
        available = {i.name for i in source.infos()}
        missing = [n for n in names if n not in available]
        if missing:
            raise MlxedgeError(
                f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}",
                fix="use a complete checkpoint of the model",
            )
        params = {}
        for n in names:
            params[n] = np.ascontiguousarray(source.read(n), dtype=np.float32)
            if not np.isfinite(params[n]).all():  # would print a perplexity of nan
                raise non_finite(n, where or "the model")
        return cls(arch, params)

    @classmethod
    def from_model(cls, model) -> ReferenceModel:
        """`from_source` of a `model.Model`'s config and weights."""
        where = getattr(model, "path", None) or getattr(model, "origin", None)
        return cls.from_source(model.config, model.weights, where)

    def logits(self, ids: Sequence[int], first: int = 0) -> np.ndarray:
        """Next-token logits at positions first..len(ids)-1 (float32, (len(ids) - first, vocab)).

        Positions before `first` are computed (they are context) but skip the output head.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("ids must be a non-empty 1-D sequence")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        return self.arch.forward(self.ops, ids, np.arange(len(ids)), first)


class ReferenceBackend:
    """The numpy reference as a `Backend` (weights read on first use)."""

    name = "reference"
    device = "numpy, cpu"
    tolerance = None  # it is the yardstick
    token_budget = None

    def __init__(self, model) -> None:
        self._model = model
        self._ref: ReferenceModel | None = None

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The model's float32 parameters by name (read on first use)."""
        return self._reference().ops.params

    def _reference(self) -> ReferenceModel:
        if self._ref is None:
            self._ref = ReferenceModel.from_model(self._model)
        return self._ref

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        return self._reference().logits(ids, first)
