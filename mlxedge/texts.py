"""Evaluation texts: where they come from, how they become token windows.

The default text exists wherever Python does, macOS and Linux alike, and was not written for this
project: the documentation topics Python ships in its standard library (`pydoc_data.topics`, the
text `help("if")` prints), concatenated in sorted topic order. It changes slightly between Python
releases, so its name carries the Python version.

Named texts for the quality table: `anchors` is the GPL-3 and Apache-2.0 licence texts Debian
installs (the text llama.cpp's figures in DESIGN.md were measured on), `choice` the GPL-2,
LGPL-2.1 and MPL-2.0 texts, on which defaults are chosen (so that choices are not tuned on the
text they are reported on).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxedgeError
from .inputs import read_text

DEFAULT_TEXT = "python-docs"
LICENSE_DIR = Path("/usr/share/common-licenses")
NAMED_TEXTS = {
    "anchors": ("GPL-3", "Apache-2.0"),
    "choice": ("GPL-2", "LGPL-2.1", "MPL-2.0"),
}


@dataclass(frozen=True)
class Text:
    """A text to evaluate on, with the name reports show."""

    name: str
    content: str


def load_text(spec: str | None) -> Text:
    """The default text, a named text (`anchors`, `choice`), or a UTF-8 file.

    Raises:
        MlxedgeError: missing or unreadable file, not UTF-8, empty text, or a named text whose
            files this machine lacks.
    """
    if spec is None or spec == DEFAULT_TEXT:
        from pydoc_data.topics import topics

        content = "\n\n".join(topics[k] for k in sorted(topics))
        return Text(
            f"Python {platform.python_version()} documentation topics (pydoc_data)", content
        )
    if spec in NAMED_TEXTS:
        files = [LICENSE_DIR / n for n in NAMED_TEXTS[spec]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MlxedgeError(
                f"the {spec!r} text needs licence files this machine lacks",
                path=missing[0],
                fix="on Debian/Ubuntu they come with base-files; elsewhere pass --text FILE",
            )
        content = "".join(read_text(f) for f in files)
        return Text(" + ".join(str(f) for f in files), content)
    path = Path(spec).expanduser()
    content = read_text(path)
    if not content.strip():
        raise MlxedgeError("the text is empty", path=path, fix="pass a text with content")
    return Text(str(path), content)


def tokenize(text: Text, tokenizer) -> list[int]:
    """Token ids of the whole text by a `model.Tokenizer` (no special tokens; BOS is placed per
    window)."""
    hf = tokenizer.hf
    try:
        return hf.encode(text.content, add_special_tokens=False).ids
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise MlxedgeError(f"the tokenizer cannot encode the text ({e})", path=tokenizer.where,
                           fix="use the model's original tokenizer files") from None  # fmt: skip


def check_ids(ids: list[int], vocab_size: int, where) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer larger than the model)."""
    if ids and max(ids) >= vocab_size:
        raise MlxedgeError(
            f"the tokenizer gives token id {max(ids)}, but the model has only {vocab_size} "
            "embedding rows",
            path=where,
            fix="the tokenizer files do not belong to this model; use its original ones",
        )


def windows(
    ids: list[int], ctx: int, bos_id: int | None, max_windows: int | None, text_name: str
) -> np.ndarray:
    """Non-overlapping windows of `ctx` tokens, (n, ctx); llama.cpp's perplexity protocol.

    As llama.cpp does, the first token of each window is replaced by BOS when the model adds one,
    and a text must hold at least two windows.

    Raises:
        MlxedgeError: the text is too short for two windows.
    """
    n = len(ids) // ctx
    if n < 2:
        raise MlxedgeError(
            f"the text has {len(ids)} tokens, fewer than two windows of {ctx}",
            path=text_name,
            fix=f"use a longer text (at least {2 * ctx} tokens) or a smaller --ctx",
        )
    if max_windows is not None:
        n = min(n, max(max_windows, 1))
    out = np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos_id is not None:
        out[:, 0] = bos_id
    return out
