"""Reading the user's small input files (configs, indexes, tokenizers, texts) safely.

Only regular files are read: a FIFO would block forever and a character device such as
/dev/zero never ends. Each read is capped, so a huge or endless file fails at once instead of
filling memory, and JSON nested deeper than any real config is refused with a clear error rather
than a RecursionError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import MlxedgeError

MiB = 1 << 20
# Generous for what each holds: the largest real config.json is a few KB, a tokenizer.json of a
# 256k vocabulary ~35 MB, a safetensors index ~2 MB.
JSON_CAP = 64 * MiB
TOKENIZER_CAP = 256 * MiB
TEXT_CAP = 256 * MiB
MAX_JSON_DEPTH = 64  # real configs nest 4-6 levels; tokenizer.json ~8


def open_regular(path: Path | str, what: str = "file"):
    """Open `path` for binary reading only if it is a regular file (following symbolic links).

    The open itself is non-blocking, so a FIFO is refused instead of waiting for a writer.

    Raises:
        MlxedgeError: missing, a folder, a FIFO, a device or a socket, or unreadable.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise MlxedgeError(f"no such {what}", path=path, fix="check the path") from None
    except IsADirectoryError:
        raise MlxedgeError(f"is a folder, not a {what}", path=path) from None
    except OSError as exc:
        raise MlxedgeError(f"cannot open: {exc.strerror or exc}", path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
            raise MlxedgeError(
                f"is {kind}, not a regular file",
                path=path,
                fix=f"pass a regular {what}",
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, cap: int, what: str = "file") -> bytes:
    """The whole of a regular file, refused when it is larger than `cap` bytes."""
    path = Path(path)
    with open_regular(path, what) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size > cap:
                raise MlxedgeError(
                    f"is {size / MiB:.0f} MiB, over the {cap / MiB:.0f} MiB a {what} may be",
                    path=path,
                    fix=f"check that this is the right {what}",
                )
            data = fh.read(cap + 1)  # the file may grow while it is read
        except OSError as exc:
            raise MlxedgeError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if len(data) > cap:
        raise MlxedgeError(f"grew past {cap / MiB:.0f} MiB while being read", path=path)
    return data


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def parse_json(raw: bytes | str, path: Path | str, **kwargs) -> Any:
    """JSON text parsed, with one clear error for malformed, non-UTF-8 or too deeply nested input.

    Args:
        raw: the text.
        path: the file it came from (named in errors).
        kwargs: passed to `json.loads` (an `object_pairs_hook`, say).
    """
    try:
        data = json.loads(raw, **kwargs)
    except RecursionError:
        data = None
        nested = True
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a hook's refusal
        raise MlxedgeError(f"not valid JSON ({exc})", path=path) from None
    else:
        nested = _depth(data) > MAX_JSON_DEPTH
    if nested:
        raise MlxedgeError(
            f"JSON nested more than {MAX_JSON_DEPTH} levels deep; no model file is",
            path=path,
            fix="the file is damaged or not what it is named; use an intact copy",
        )
    return data


def read_json(path: Path | str, cap: int = JSON_CAP, what: str = "JSON file") -> Any:
    """A regular JSON file of at most `cap` bytes, parsed (see `parse_json`)."""
    return parse_json(read_bytes(path, cap, what), path)


def read_text(path: Path | str, cap: int = TEXT_CAP, what: str = "text file") -> str:
    """A regular UTF-8 text file of at most `cap` bytes."""
    raw = read_bytes(path, cap, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MlxedgeError("the text is not UTF-8", path=path, fix="convert it to UTF-8") from None
