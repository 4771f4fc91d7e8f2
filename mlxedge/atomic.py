"""Atomic outputs that never destroy what is not ours.

Every artifact (an MLX or Hugging Face folder, a GGUF file, a Modelfile) is built in a hidden
temporary sibling, `.<name>.partial-XXXX`, and renamed onto its path only when complete, so an
interrupted run leaves no half-written artifact.

What mlxedge writes carries a mark, written first so a partial output carries it too:
- a folder holds the stamp file `.mlxedge`;
- a GGUF file holds the metadata key `mlxedge.output`, second after `general.architecture`, so it
  is read from the first few hundred bytes without parsing the rest of the metadata;
- a text file (a Modelfile) starts with the comment line `# written by mlxedge`.
The mark is constant (no time, no process id): reruns stay byte-identical.

`--force` replaces only a regular file or folder that carries the mark. An output that is the
source, lies inside it or contains it is refused whatever the flags, as is anything else that is
not ours: a device, a FIFO, a symbolic link, an unmarked file or folder, the current directory.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import MlxedgeError

logger = logging.getLogger(__name__)

MARK_FILE = ".mlxedge"
MARK_TEXT = "written by mlxedge: `mlxedge ... --force` may replace this folder\n"
GGUF_MARK_KEY = "mlxedge.output"
GGUF_MARK_VALUE = "mlxedge"
TEXT_MARK = "# written by mlxedge\n"

_GGUF_MAGIC = b"GGUF"
_GGUF_STRING = 8
# Sizes of GGUF's fixed-size scalar value types (uint8 .. float64, bool), by type id.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_MARK_MAX_KVS = 4  # the mark is the second key; a few more keep the reader tolerant
_GGUF_MAX_STRING = 1 << 12

# Every output this process has committed, in order (what an interrupted command did finish).
COMMITTED: list[Path] = []

_FORCE_FIX = "delete it yourself if you mean to replace it, or choose another output name"


def mark_folder(folder: Path) -> None:
    """Put the mark of an mlxedge output into `folder` (before anything else is written)."""
    (Path(folder) / MARK_FILE).write_text(MARK_TEXT, encoding="utf-8")


def mark_gguf(writer) -> None:
    """Add the mark of an mlxedge output to a fresh `gguf.GGUFWriter`, before any other key."""
    writer.add_string(GGUF_MARK_KEY, GGUF_MARK_VALUE)


def _gguf_has_mark(fh) -> bool:
    """Whether an open GGUF file's first metadata keys include our mark (bounded reads only)."""
    head = fh.read(24)
    if len(head) < 24 or head[:4] != _GGUF_MAGIC:
        return False
    version, _, n_kv = struct.unpack("<IQQ", head[4:])
    if version < 2:  # version 1 used 32-bit lengths; we never wrote it
        return False

    def string() -> str | None:
        raw = fh.read(8)
        if len(raw) < 8:
            return None
        (n,) = struct.unpack("<Q", raw)
        if n > _GGUF_MAX_STRING:
            return None
        data = fh.read(n)
        return data.decode("utf-8", "replace") if len(data) == n else None

    for _ in range(min(n_kv, _GGUF_MARK_MAX_KVS)):
        key = string()
        raw = fh.read(4)
        if key is None or len(raw) < 4:
            return False
        (vtype,) = struct.unpack("<I", raw)
        if vtype == _GGUF_STRING:
            value = string()
            if value is None:
                return False
            if key == GGUF_MARK_KEY:
                return value == GGUF_MARK_VALUE
        elif vtype in _GGUF_SCALAR_SIZES:
            fh.read(_GGUF_SCALAR_SIZES[vtype])
        else:  # an array before the mark: not one of ours
            return False
    return False


def is_ours(path: Path) -> bool:
    """Whether `path` is a regular file or folder that mlxedge wrote (it carries the mark)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        mark = path / MARK_FILE
        try:
            if not stat.S_ISREG(os.lstat(mark).st_mode):
                return False
            with open(mark, "rb") as fh:
                return fh.read(len(MARK_TEXT) + 1) == MARK_TEXT.encode()
        except OSError:
            return False
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        with open(path, "rb") as fh:
            if fh.read(4) == _GGUF_MAGIC:
                fh.seek(0)
                return _gguf_has_mark(fh)
            fh.seek(0)
            return fh.read(len(TEXT_MARK)) == TEXT_MARK.encode()
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_source(target: Path, protect: Iterable[Path | None]) -> None:
    """Refuse a target that is, lies inside or contains one of the sources being read."""
    real = target.resolve()  # follows a symlink at the target or above it
    for source in protect:
        if source is None:
            continue
        source = Path(source).absolute()
        src = source.resolve()
        if real == src or _same(target, source):
            how = "is the model being read"
        elif src in real.parents:
            how = "lies inside the model being read"
        elif real in src.parents:
            how = "contains the model being read"
        else:
            continue
        raise MlxedgeError(
            f"the output {how} ({source}); writing it would destroy the source",
            path=target,
            fix="choose an output outside the model's folder (and not a folder holding it)",
        )


def check_output(
    target: Path | str, force: bool = False, protect: Iterable[Path | None] = ()
) -> Path:
    """Check that `target` may be written, before any work starts; return it as an absolute path.

    Args:
        target: the output path the user asked for.
        force: replace an existing output, if mlxedge wrote it.
        protect: the model files or folders being read; the output must not touch them.

    Returns:
        `target` made absolute, with `.` and `..` removed (a symlink at the end is kept).

    Raises:
        MlxedgeError: the target is or holds a source, exists without `force`, or exists and is
            not a regular file or folder carrying mlxedge's mark.
    """
    target = Path(os.path.abspath(Path(target).expanduser()))
    if target.name == "":
        raise MlxedgeError("cannot write to the root of the file system", path=target)
    try:
        _refuse_source(target, protect)
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    except OSError as exc:  # a name too long, a parent that is a file, no permission
        raise _os_error(exc, target, started=False) from None
    if not force:
        raise MlxedgeError(
            "already exists", path=target, fix="pass --force to replace it, or choose another name"
        )
    if stat.S_ISLNK(st.st_mode):
        raise MlxedgeError(
            "is a symbolic link; --force replaces only files and folders mlxedge wrote",
            path=target,
            fix=_FORCE_FIX,
        )
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise MlxedgeError(
            "is not a regular file or folder (a device, FIFO or socket); it was left untouched",
            path=target,
            fix="choose another output name",
        )
    cwd = Path.cwd().resolve()
    if stat.S_ISDIR(st.st_mode) and (target.resolve() == cwd or target.resolve() in cwd.parents):
        raise MlxedgeError(
            "is (or holds) the current directory; --force will not replace it",
            path=target,
            fix="choose another output name, or run from another directory",
        )
    if not is_ours(target):
        what = f"it has no {MARK_FILE} file" if stat.S_ISDIR(st.st_mode) else "it carries no mark"
        raise MlxedgeError(
            f"was not written by mlxedge ({what}); --force replaces only mlxedge's own outputs",
            path=target,
            fix=_FORCE_FIX,
        )
    return target


def _umask() -> int:
    # The only way to read the umask is to set it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to the disk."""
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(Path(folder) / name)
            _fsync(Path(folder))
    else:
        _fsync(path)


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path` (a file or folder), or None if another process holds one.

    Every hidden sibling a run creates stays locked while the run lives; the kernel drops the
    lock when the process dies, however it dies, so a lock that can be taken marks a sibling
    whose run is gone.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _locked_temp(make) -> tuple[Path, int]:
    """Create a hidden sibling with `make()` and lock it before anything is written into it.

    A sweep by another run can take the lock in the instant between the two and remove the
    still-empty entry; then a fresh one is made.
    """
    while True:
        temp = Path(make())
        fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a sweep looks at it
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(temp)):
                return temp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _make_temp(target: Path, is_dir: bool) -> tuple[Path, int]:
    """A locked hidden sibling of `target` to build it in, and the descriptor holding the lock."""
    prefix = f".{target.name}.partial-"
    if is_dir:
        temp, fd = _locked_temp(lambda: tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        mode = 0o777
    else:

        def make() -> str:
            handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
            os.close(handle)
            return name

        temp, fd = _locked_temp(make)
        mode = 0o666
    # mkdtemp/mkstemp create owner-only entries; the artifact should get the usual permissions.
    os.chmod(temp, mode & ~_umask())
    if is_dir:
        mark_folder(temp)
    return temp, fd


def _is_empty(path: Path) -> bool:
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return not any(os.scandir(path))
        return stat.S_ISREG(st.st_mode) and st.st_size == 0
    except OSError:
        return False


def sweep_stale(target: Path) -> list[str]:
    """Clean up after runs to `target` that were killed (SIGKILL, a power cut) mid-way.

    - `.NAME.partial-*` siblings whose run is gone (their lock can be taken) and that carry our
      mark, or are still empty, are removed; a live run's are never touched.
    - `.NAME.old-*` siblings hold the previous output a killed `--force` swap had moved aside:
      put back when nothing has taken its place since, removed otherwise.

    Returns:
        What was done, one line per sibling (also logged).
    """
    target = Path(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    done = []
    for entry in entries:
        name = entry.name
        partial = name.startswith(f".{target.name}.partial-")
        aside = name.startswith(f".{target.name}.old-")
        if not (partial or aside) or entry.is_symlink():
            continue
        path = Path(entry.path)
        fd = _lock(path)
        if fd is None:
            continue  # a live run's, or not ours to open
        try:
            if partial and (is_ours(path) or _is_empty(path)):
                _remove(path)
                done.append(f"removed {path}, left by an interrupted run")
            elif aside and path.is_dir():
                old = path / "old"
                if is_ours(old) and not os.path.lexists(target):
                    os.replace(old, target)
                    done.append(f"restored {target} from {path}, left by an interrupted --force")
                    os.rmdir(path)
                elif is_ours(old) or _is_empty(path):
                    _remove(path)
                    done.append(f"removed {path}, left by an interrupted --force")
        except OSError as exc:
            logger.warning("%s: could not clean up (%s)", path, exc.strerror or exc)
        finally:
            os.close(fd)
    for line in done:
        logger.warning("%s", line)
    return done


@contextmanager
def atomic_set(
    targets: list[tuple[Path, bool]], force: bool = False, protect: Iterable[Path | None] = ()
) -> Iterator[list[Path]]:
    """Build a set of outputs (a GGUF and its Modelfile, say) in hidden siblings and commit them
    as one unit: every one is in place, or — after any failure before or during the commit —
    none of them (earlier outputs they replace are put back).

    Each is flushed to the disk (files, folders and their contents) before the first rename, and
    the folders holding them after the last, so a power cut cannot leave a renamed but empty
    file. What holds under SIGKILL: two files cannot be renamed in one step, so a kill between
    the renames of one commit (microseconds) can leave the first output of the set new and a
    later one old or absent; outputs are committed in the order given, the main artifact first,
    so what is left is always usable. Anything a killed run leaves behind is a hidden sibling
    carrying our mark.

    Args:
        targets: (path, is a folder) of each output, the main one first.
        force: replace existing outputs, if mlxedge wrote them.
        protect: the model files or folders being read (see `check_output`).

    Yields:
        One temporary path per target, next to it: a folder holding only the mark, or an empty
        file the writer must mark.

    Raises:
        MlxedgeError: what `check_output` raises (checked before any work starts), or the disk
            filled up. On any exception, including KeyboardInterrupt, every temporary is removed
            and the exception re-raised.
    """
    protect = tuple(protect)
    for t, _ in targets:
        sweep_stale(Path(os.path.abspath(Path(t).expanduser())))
    targets = [(check_output(t, force, protect), d) for t, d in targets]
    temps: list[Path] = []
    locks: list[int] = []
    try:
        for target, is_dir in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp, fd = _make_temp(target, is_dir)
            temps.append(temp)
            locks.append(fd)
        yield temps
        for temp in temps:
            if not is_ours(temp):  # every writer marks what it writes; a bug must not ship
                raise RuntimeError(f"{temp}: the writer did not mark its output")
            _fsync_tree(temp)
        _commit([(temp, t) for temp, (t, _) in zip(temps, targets, strict=True)], force, protect)
    except BaseException as exc:
        for temp in temps:
            _remove(temp)
        for fd in locks:
            os.close(fd)
        if isinstance(exc, OSError):
            raise _os_error(exc, targets[0][0], started=bool(temps)) from exc
        raise
    for fd in locks:
        os.close(fd)
    for parent in {t.parent for t, _ in targets}:
        _fsync(parent)
    COMMITTED.extend(t for t, _ in targets)
    logger.debug("wrote %s", ", ".join(str(t) for t, _ in targets))


def _os_error(exc: OSError, target: Path, started: bool) -> MlxedgeError:
    """The one clear error for an operating-system failure while making an output."""
    where = exc.filename or target
    if exc.errno == errno.ENOSPC or (exc.errno is None and _nearly_full(target.parent)):
        # numpy's tofile reports a short write as an OSError without errno.
        return MlxedgeError("no space left on device while writing; nothing was kept",
                            path=target, fix="free some disk space or write the output "
                            "elsewhere")  # fmt: skip
    fixes = {
        errno.EROFS: "the file system is read-only; write the output elsewhere",
        errno.EACCES: "you may not write there; choose a folder you own",
        errno.EPERM: "you may not write there; choose a folder you own",
        errno.ENOTDIR: "a part of the output path is a file, not a folder; choose another path",
        errno.EEXIST: "a part of the output path is a file, not a folder; choose another path",
        errno.ENAMETOOLONG: "the output name is too long for the file system; choose a shorter one",
        errno.EDQUOT: "your disk quota is used up; free some space or write elsewhere",
    }
    what = "cannot write the output" if started else "cannot create the output"
    return MlxedgeError(
        f"{what}: {exc.strerror or exc} ({where}); nothing was kept",
        path=target,
        fix=fixes.get(exc.errno, "check the output path"),
    )


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 << 20
    except OSError:
        return False


def _commit(pairs: list[tuple[Path, Path]], force: bool, protect: tuple) -> None:
    """Rename each temporary onto its target; on a failure, undo what was done."""
    undo: list[_Step] = []
    try:
        for temp, target in pairs:
            step = _Step(target)
            undo.append(step)
            if os.path.lexists(target):
                if not force:  # appeared while we were writing
                    raise MlxedgeError("appeared while writing; it was left untouched", path=target)
                check_output(target, force, protect)  # what appeared meanwhile must be ours too
                step.aside, step.lock = _locked_temp(
                    lambda target=target: tempfile.mkdtemp(
                        prefix=f".{target.name}.old-", dir=target.parent
                    )
                )
                if temp.is_file() and target.is_file():
                    os.link(target, step.aside / "old")  # kept for an undo; the swap is one step
                else:  # a folder cannot be swapped in one step: move the old one aside first
                    os.rename(target, step.aside / "old")
                    step.moved = True
            os.replace(temp, target)  # onto a file: one atomic step; else onto nothing
            step.renamed = True
    except BaseException:
        for step in reversed(undo):
            step.undo()
        raise
    finally:
        for step in undo:
            if step.aside is not None:
                shutil.rmtree(step.aside, ignore_errors=True)
            if step.lock is not None:
                os.close(step.lock)


@dataclass
class _Step:
    """One output of a commit, and what undoing it takes."""

    target: Path
    aside: Path | None = None  # holds the old version as `old` while the commit runs
    moved: bool = False  # the old version was moved out of the way (a folder)
    renamed: bool = False  # the new version is in place
    lock: int | None = None  # holds the lock on `aside`

    def undo(self) -> None:
        try:
            if self.renamed:
                _remove(self.target)
            if (self.renamed or self.moved) and self.aside is not None:
                os.replace(self.aside / "old", self.target)
        except OSError:  # keep undoing the others; the old version stays in its hidden sibling
            logger.warning("could not restore %s; its old version is in %s", self.target,
                           self.aside)  # fmt: skip


@contextmanager
def atomic_output(
    target: Path, force: bool = False, protect: Iterable[Path | None] = ()
) -> Iterator[Path]:
    """Build an output folder in a hidden sibling and rename it onto `target` only on success.

    Args:
        target: the folder to produce.
        force: replace `target` if it exists and mlxedge wrote it.
        protect: the model files or folders being read (see `check_output`).

    Yields:
        A temporary folder next to `target` (`.<name>.partial-XXXX`) holding only the mark.

    Raises:
        MlxedgeError: what `check_output` raises (checked before any work starts), or the disk
            filled up. On any exception, including KeyboardInterrupt, the temporary folder is
            removed and the exception re-raised.
    """
    with atomic_set([(Path(target), True)], force, protect) as (temp,):
        yield temp


@contextmanager
def atomic_file(
    target: Path, force: bool = False, protect: Iterable[Path | None] = ()
) -> Iterator[Path]:
    """Like `atomic_output`, for a single file (a GGUF, say); the writer must mark it
    (`mark_gguf`, or `TEXT_MARK` as a text file's first line).

    Args:
        target: the file to produce.
        force: replace `target` if it exists and mlxedge wrote it.
        protect: the model files or folders being read (see `check_output`).

    Yields:
        The path of an empty temporary file next to `target` to write into.

    Raises:
        MlxedgeError: what `check_output` raises, or the disk filled up.
    """
    with atomic_set([(Path(target), False)], force, protect) as (temp,):
        yield temp
