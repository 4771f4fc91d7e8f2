"""Running models: the numpy reference forward pass and the backends the cross-check compares.

Every backend has the same small interface (`Backend`): a name, what it runs on, and
`logits(ids, first)` for one sequence. A backend that cannot run on this machine raises
`BackendUnavailable` with the reason, which the harness reports instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the CLI imports BACKENDS at start-up, where numpy is not loaded yet
    import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class Tolerance:
    """How close a backend must come to the numpy reference run on the same weights.

    Attributes:
        max_abs_logit: largest allowed absolute logit difference (float32 backends), or None.
        kl_mean: largest allowed mean KL divergence (half-precision backends), or None.
    """

    max_abs_logit: float | None = None
    kl_mean: float | None = None


class Backend(Protocol):
    name: str
    device: str
    tolerance: Tolerance
    # Tokens this backend is given per run where it is slow (None: the full protocol).
    token_budget: int | None

    def logits(self, ids: np.ndarray, first: int = 0) -> np.ndarray:
        """Next-token logits (len(ids) - first, vocab) for one sequence of token ids."""
        ...


BACKENDS = ("reference", "mlx", "llamacpp", "coreml-interp", "coreml")


def make_backend(name: str, model) -> Backend:
    """The backend `name` for a `model.Model`.

    Raises:
        BackendUnavailable: it cannot run this model on this machine.
        ValueError: unknown backend name.
    """
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(model)
    if name == "mlx":
        from .mlx_runner import MLXBackend

        return MLXBackend(model)
    if name == "llamacpp":
        from .llamacpp_runner import LlamaCppBackend

        return LlamaCppBackend(model)
    if name == "coreml-interp":
        from .coreml_backend import CoreMLInterpBackend

        return CoreMLInterpBackend(model)
    if name == "coreml":
        from .coreml_backend import CoreMLBackend

        return CoreMLBackend(model)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
