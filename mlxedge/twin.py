"""An artifact's plain twin: the yardstick the quality gate sets its ceiling from.

The twin is the original model's weights put through the same per-tensor storage as the artifact
by the plain rule: MLX's round-to-nearest (`rtn`) at each quantized tensor's bits, group size and
scale dtype; llama.cpp's own reference quantizer (which `quant.ggml` reproduces bit for bit) at
each GGUF tensor's type; a float tensor rounded to the artifact's float type. Every method that
does better than the plain rule, on the same bytes, passes a gate set as a multiple of the twin's
KL divergence by construction; an artifact damaged after quantizing (a doubled scale, a swapped
tensor) does not, whatever the model and bit width. The twin also diagnoses a failure: the
tensors whose weights lie furthest from the original, relative to the twin's error.

Each tensor source says how its tensors are stored through `plain_twin(name, weights)`, so this
module knows no format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Model, TensorInfo

# The gate's ceiling: this multiple of the twin's mean KL on the same tokens, plus the backend's
# floor. Measured on SmolLM2 (4 bits, groups of 64, choice text): mse-zero's KL is 1.36 times
# rtn's, mse's 0.86 times; one layer's o_proj scales doubled gives 1.95 times (0.82 against 0.42).
GATE_MULTIPLE = 1.5
# Added to every ceiling so float and 8-bit artifacts, whose KL is near zero, do not fail on the
# noise of summation order. A backend adds what its own fidelity tolerance allows: its mean KL
# tolerance, or for a tolerance of |dlogit| <= m the most KL such a difference can cause, m^2 / 2
# (Hoeffding's lemma: the log-partition moves by at most the mean shift plus (2m)^2 / 8).
GATE_FLOOR = 1e-6


def backend_floor(tolerance) -> float:
    """The floor of a ceiling for a backend with this fidelity tolerance (None: the yardstick)."""
    if tolerance is None:
        return GATE_FLOOR
    if tolerance.kl_mean is not None:
        return GATE_FLOOR + tolerance.kl_mean
    if tolerance.max_abs_logit is not None:
        return GATE_FLOOR + tolerance.max_abs_logit**2 / 2
    return GATE_FLOOR


class TwinUnavailable(Exception):
    """The artifact's storage has no plain rule here (the message says which tensor and why)."""


class TwinSource:
    """The twin's tensors: the original's, each stored as the artifact stores it (on read).

    Args:
        original: the original model's tensors (float).
        artifact: the artifact's tensors; its `plain_twin(name, w)` gives the plain-rule
            reconstruction of float weights `w` in that tensor's storage.

    Raises:
        TwinUnavailable: a tensor missing from the original or of another shape.
    """

    def __init__(self, original, artifact) -> None:
        self._original, self._artifact = original, artifact
        theirs = {i.name: tuple(i.shape) for i in original.infos()}
        self._infos = []
        self._dtypes = {}  # how the artifact stores each tensor
        quantized = getattr(artifact, "scheme", lambda name: None)  # an MLX folder's schemes
        # Every tensor stored in float32: the twin is the original itself (no run needed).
        self.is_original = True
        for info in artifact.infos():
            if theirs.get(info.name) != tuple(info.shape):
                raise TwinUnavailable(f"{info.name} differs from the original's")
            self._infos.append(TensorInfo(info.name, tuple(info.shape), "float32"))
            self._dtypes[info.name] = info.dtype
            if info.dtype not in ("float32", "F32") or quantized(info.name) is not None:
                self.is_original = False

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        w = np.asarray(self._original.read(name), dtype=np.float32)
        # A format's source knows its own plain rule; any other stores floats of a dtype.
        rule = getattr(self._artifact, "plain_twin", None)
        twin = rule(name, w) if rule is not None else round_to_float(w, self._dtypes[name])
        return twin if rows is None else twin[rows[0] : rows[1]]


def round_to_float(w: np.ndarray, dtype: str) -> np.ndarray:
    """`w` rounded to a float storage type ("float16", "bfloat16", "F16", ...) and back."""
    import ml_dtypes

    kinds = {"float16": np.float16, "F16": np.float16, "bfloat16": ml_dtypes.bfloat16,
             "BF16": ml_dtypes.bfloat16}  # fmt: skip
    kind = kinds.get(dtype)
    if kind is None:
        if dtype not in ("float32", "F32"):
            raise TwinUnavailable(f"no plain rule for storage {dtype}")
        return w
    with np.errstate(over="ignore"):
        return w.astype(kind).astype(np.float32)


def twin_model(original: Model, artifact: Model) -> Model:
    """The twin of `artifact`, as a model the reference backend runs.

    Raises:
        TwinUnavailable: see `TwinSource`.
    """
    return Model(
        name=f"{artifact.name} (plain twin)",
        origin=artifact.origin,
        kind="twin",
        path=None,
        config=original.config,
        weights=TwinSource(original.weights, artifact.weights),
        tokenizer=original.tokenizer,
    )


@dataclass(frozen=True)
class Suspect:
    """A tensor further from the original than the twin's: squared error relative to the twin's."""

    name: str
    ratio: float


def diagnose(
    original: dict[str, np.ndarray],
    artifact: dict[str, np.ndarray],
    twin: dict[str, np.ndarray],
    top: int = 3,
    at_least: float = 2.0,
) -> list[Suspect]:
    """The tensors whose artifact weights lie furthest from the original relative to the twin's.

    A diagnosis, not a gate: a later method may move weights on purpose (to lower the output
    error rather than the weight error).

    Args:
        original, artifact, twin: float32 parameters by name.
        top: how many to name at most.
        at_least: name only tensors at least this many times the twin's squared error.
    """
    found = []
    for name, t in twin.items():
        o, a = original.get(name), artifact.get(name)
        if o is None or a is None or o.shape != a.shape:
            continue
        e_twin = float(np.square(t - o, dtype=np.float64).sum())
        e_art = float(np.square(a - o, dtype=np.float64).sum())
        scale = float(np.square(o, dtype=np.float64).sum()) * 1e-12  # float rounding level
        ratio = e_art / max(e_twin, scale, 1e-30)
        if ratio >= at_least:
            found.append(Suspect(name, ratio))
    return sorted(found, key=lambda s: -s.ratio)[:top]
