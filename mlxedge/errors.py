"""The one error type that reaches a user: it names the file and says what to do."""

from __future__ import annotations

from pathlib import Path


class MlxedgeError(Exception):
    """A problem with the user's input or environment, worded for the user.

    Args:
        message: what is wrong, in one sentence.
        path: the file or folder concerned, if any; it is named first in the message.
        fix: what the user can do about it.
    """

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


def non_finite(tensor: str, path: str | Path) -> MlxedgeError:
    """The error for a weight holding NaN or Inf, wherever it is found."""
    return MlxedgeError(
        f"tensor {tensor!r} contains NaN or Inf values",
        path=path,
        fix="the checkpoint is damaged (or was saved after a diverged training step); "
        "use an intact copy",
    )
