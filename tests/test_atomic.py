"""Atomic outputs, and what `--force` may replace: only a regular file or folder carrying our mark,
never a source, a device, a FIFO, a link or the current directory."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from mlxedge.atomic import (
    GGUF_MARK_KEY,
    MARK_FILE,
    TEXT_MARK,
    atomic_file,
    atomic_output,
    check_output,
    is_ours,
    mark_folder,
    mark_gguf,
)
from mlxedge.errors import MlxedgeError
from mlxedge.formats.safetensors import write_checkpoint
from mlxedge.model import TensorInfo


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_gguf(path: Path, marked: bool, n_tensors: int = 1) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if marked:
        mark_gguf(writer)
    writer.add_name("x")
    for i in range(n_tensors):
        writer.add_tensor(f"t{i}", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_atomic_output_success_refusal_and_force(tmp_path):
    target = tmp_path / "out"
    with atomic_output(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".out.partial-") and temp.is_dir()
        assert is_ours(temp)  # the mark is written first: a partial output carries it too
        (temp / "a.txt").write_text("one")
    assert siblings(target) == ["out"] and (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in target.iterdir()) == [MARK_FILE, "a.txt"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask()  # not mkdtemp's owner-only 0o700

    with pytest.raises(MlxedgeError, match="--force") as err:
        with atomic_output(target):
            raise AssertionError("must refuse before any work starts")
    assert str(target) in str(err.value)

    with atomic_output(target, force=True) as temp:
        (temp / "b.txt").write_text("two")
    assert siblings(target) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == [MARK_FILE, "b.txt"]


def test_the_mark_is_the_same_every_time(tmp_path):
    for name in ("a", "b"):
        with atomic_output(tmp_path / name):
            pass
    assert (tmp_path / "a" / MARK_FILE).read_bytes() == (tmp_path / "b" / MARK_FILE).read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, exc):
    with atomic_output(tmp_path / "out") as temp:
        (temp / "keep").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_output(tmp_path / "out", force=True) as temp:
            write_checkpoint(temp, [TensorInfo("x", (2,), "float32")], [np.zeros(2, np.float32)])
            raise exc
    assert siblings(tmp_path / "out") == ["out"]
    assert (tmp_path / "out" / "keep").read_text() == "old"  # the old output survives

    with pytest.raises(type(exc)):
        with atomic_file(tmp_path / "m.gguf") as temp:
            temp.write_bytes(b"GGUF")
            raise exc
    assert siblings(tmp_path / "out") == ["out"]


def test_atomic_output_reports_full_disk(tmp_path):
    with pytest.raises(MlxedgeError, match="no space left on device") as err:
        with atomic_output(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(tmp_path / "out") in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert list(tmp_path.iterdir()) == []


def test_atomic_file(tmp_path):
    target = tmp_path / "m.Modelfile"
    with atomic_file(target) as temp:
        assert temp.is_file() and temp.name.startswith(".m.Modelfile.partial-")
        temp.write_text(TEXT_MARK + "one")
    assert target.read_text() == TEXT_MARK + "one" and siblings(target) == ["m.Modelfile"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()
    with pytest.raises(MlxedgeError, match="already exists"):
        with atomic_file(target):
            pass
    with atomic_file(target, force=True) as temp:
        temp.write_text(TEXT_MARK + "two")
    assert target.read_text() == TEXT_MARK + "two" and siblings(target) == ["m.Modelfile"]


def test_a_file_writer_that_forgets_the_mark_ships_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="did not mark"):
        with atomic_file(tmp_path / "m.gguf") as temp:
            temp.write_bytes(b"unmarked")
    assert list(tmp_path.iterdir()) == []


def test_gguf_mark_is_read_from_the_header_alone(tmp_path):
    ours = write_gguf(tmp_path / "ours.gguf", marked=True, n_tensors=3)
    theirs = write_gguf(tmp_path / "theirs.gguf", marked=False)
    assert gguf.GGUFReader(ours).get_field(GGUF_MARK_KEY).contents() == "mlxedge"
    assert is_ours(ours) and not is_ours(theirs)
    # Cut right after the first two keys: the mark is still found, so no full parse is needed.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ours.read_bytes()[:128])
    assert is_ours(cut)
    for junk in (b"", b"GGUF", b"GGUF" + b"\xff" * 60, TEXT_MARK.encode()[:-2]):
        (tmp_path / "junk").write_bytes(junk)
        assert not is_ours(tmp_path / "junk")


def test_a_planted_mark_file_that_is_a_link_does_not_count(tmp_path):
    real = tmp_path / "real"
    mark_folder(tmp_path)
    real.mkdir()
    (real / MARK_FILE).symlink_to(tmp_path / MARK_FILE)
    assert is_ours(tmp_path) and not is_ours(real)


# ------------------------------------------------------------------ what --force may not replace


def refuses(target: Path, match: str, protect=()) -> None:
    with pytest.raises(MlxedgeError, match=match) as err:
        with atomic_output(target, force=True, protect=protect):
            raise AssertionError("must refuse before any work starts")
    assert "fix:" in str(err.value)


@pytest.fixture
def source(tmp_path) -> Path:
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"weights")
    return src


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(root.rglob("*"))
    }


def test_the_source_its_inside_and_its_parents_are_refused(tmp_path, source):
    before = snapshot(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(source)
    before = snapshot(tmp_path)
    for target, how in [
        (source, "is the model"),
        (source / ".", "is the model"),
        (source / "sub", "lies inside the model"),
        (source.parent, "contains the model"),
        (tmp_path, "contains the model"),
        (link, "is the model"),
        (link / "sub", "lies inside the model"),
    ]:
        for force in (False, True):
            with pytest.raises(MlxedgeError, match=how):
                check_output(target, force=force, protect=[source])
        refuses(target, how, protect=[source])
    assert snapshot(tmp_path) == before


def test_a_hard_link_to_a_source_file_is_refused(tmp_path):
    src = write_gguf(tmp_path / "src.gguf", marked=True)
    os.link(src, tmp_path / "same.gguf")
    with pytest.raises(MlxedgeError, match="is the model"):
        check_output(tmp_path / "same.gguf", force=True, protect=[src])


def test_nodes_links_and_unmarked_outputs_are_refused(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    refuses(tmp_path / "fifo", "not a regular file or folder")
    try:
        os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))  # a character device
    except PermissionError:
        pass  # not root: the FIFO above stands for every special file
    else:
        refuses(tmp_path / "null", "not a regular file or folder")
        assert (tmp_path / "null").is_char_device()
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("mine")
    refuses(tmp_path / "folder", "was not written by mlxedge")
    (tmp_path / "file.gguf").write_bytes(b"mine")
    refuses(tmp_path / "file.gguf", "was not written by mlxedge")
    write_gguf(tmp_path / "theirs.gguf", marked=False)
    refuses(tmp_path / "theirs.gguf", "was not written by mlxedge")
    with atomic_output(tmp_path / "ours"):
        pass
    (tmp_path / "to-ours").symlink_to(tmp_path / "ours")
    refuses(tmp_path / "to-ours", "symbolic link")
    assert (tmp_path / "folder" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "file.gguf").read_bytes() == b"mine"
    assert (tmp_path / "fifo").is_fifo() and is_ours(tmp_path / "ours")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_current_directory_is_refused_and_nothing_is_left(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    refuses(Path("."), "current directory")
    with atomic_output(tmp_path / "ours"):
        pass
    monkeypatch.chdir(tmp_path / "ours")
    refuses(Path("."), "current directory")  # even one of ours: the shell would sit in a ghost
    refuses(Path(".."), "current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "work"]
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    with pytest.raises(MlxedgeError, match="root"):
        check_output(Path("/"), force=True)


def test_a_marked_earlier_output_is_replaced(tmp_path):
    with atomic_output(tmp_path / "out") as temp:
        (temp / "old").write_text("old")
    with atomic_output(tmp_path / "out", force=True) as temp:
        (temp / "new").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARK_FILE, "new"]
    ours = write_gguf(tmp_path / "m.gguf", marked=True)
    with atomic_file(ours, force=True) as temp:
        write_gguf(temp, marked=True, n_tensors=2)
    assert len(gguf.GGUFReader(ours).tensors) == 2


# ------------------------------------------------------------------------------- output sets


def test_a_set_is_committed_whole_or_not_at_all(tmp_path, monkeypatch):
    from mlxedge import atomic

    a, b = tmp_path / "m.gguf", tmp_path / "m.Modelfile"
    with atomic.atomic_set([(a, False), (b, False)]) as (ta, tb):
        write_gguf(ta, marked=True)
        tb.write_text(TEXT_MARK + "FROM ./m.gguf\n")
    old = (a.read_bytes(), b.read_bytes())

    with pytest.raises(RuntimeError, match="boom"):  # a failure while writing the second
        with atomic.atomic_set([(a, False), (b, False)], force=True) as (ta, tb):
            write_gguf(ta, marked=True, n_tensors=2)
            raise RuntimeError("boom")
    assert (a.read_bytes(), b.read_bytes()) == old and siblings(a) == ["m.Modelfile", "m.gguf"]

    real_replace = os.replace

    def failing(src, dst):  # the second rename of the commit fails: the first is undone
        if Path(dst) == b:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(MlxedgeError, match="cannot write the output: I/O error"):
        with atomic.atomic_set([(a, False), (b, False)], force=True) as (ta, tb):
            write_gguf(ta, marked=True, n_tensors=3)
            tb.write_text(TEXT_MARK + "FROM ./m.gguf\nPARAMETER stop x\n")
    assert (a.read_bytes(), b.read_bytes()) == old and siblings(a) == ["m.Modelfile", "m.gguf"]


def test_outputs_are_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    from mlxedge import atomic

    flushed = []
    real = atomic._fsync
    monkeypatch.setattr(atomic, "_fsync", lambda p: (flushed.append(Path(p)), real(p)))
    with atomic_output(tmp_path / "out") as temp:
        (temp / "weights.bin").write_bytes(b"x" * 100)
    names = [p.name for p in flushed]
    assert names.index("weights.bin") < names.index(temp.name)  # files, then their folder
    assert flushed[-1] == tmp_path  # the parent, after the rename
