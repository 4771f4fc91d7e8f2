"""Commands never destroy or leak what is not theirs: an output that is (or holds, or lies in) the
source, a device, a FIFO, `.`, or an unmarked file or folder is refused with one clear error and
everything is left as it was; an earlier output of ours is replaced; a side file that is a link
leading outside the model folder never reaches an artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from tiny_models import hub_cache_snapshot, make_tiny_model

from mlxedge.atomic import GGUF_MARK_KEY, MARK_FILE, TEXT_MARK
from mlxedge.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too) with what it is: a hash, a link target, a kind."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir" if p.is_dir() else "special"
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama", dtype="float32")


@pytest.fixture
def work(tmp_path, tiny) -> Path:
    """A fresh copy of the tiny model at work/models/src, per test."""
    shutil.copytree(tiny, tmp_path / "models" / "src")
    return tmp_path


def refused(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.startswith("error: ")
    assert result.output.count("error:") == 1 and "fix:" in result.output
    for w in words:
        assert w in result.output, result.output


QUANTIZE = ("--bits", 4, "--group-size", 32)


def test_outputs_that_would_touch_the_source_are_refused(work, monkeypatch):
    src = work / "models" / "src"
    (work / "link").symlink_to(src)
    before = tree(work)
    for target, how in [
        (src, "is the model"),
        (f"{src}/.", "is the model"),
        (src / "sub", "lies inside the model"),
        (src.parent, "contains the model"),
        (work / "link", "is the model"),
    ]:
        refused(run("quantize", src, "-o", target, *QUANTIZE, "--force"), how)
        gguf_args = ("export", "gguf", src, "-o", target, "--type", "Q8_0", "--force")
        refused(run(*gguf_args), how)
    monkeypatch.chdir(src)
    refused(run("quantize", ".", "-o", ".", *QUANTIZE, "--force"), "is the model")
    assert tree(work) == before


def test_a_gguf_source_and_its_hard_link_are_refused(work):
    src = work / "models" / "src"
    first = work / "first.gguf"
    assert run("export", "gguf", src, "-o", first, "--type", "Q8_0").exit_code == 0
    os.link(first, work / "same.gguf")
    before = tree(work)
    refused(run("export", "gguf", first, "-o", first, "--type", "Q4_0", "--force"), "is the model")
    refused(run("export", "gguf", first, "-o", work / "same.gguf", "--force"), "is the model")
    refused(run("import", first, "-o", first, "--force"), "is the model")
    assert tree(work) == before


def test_devices_fifos_dot_and_unmarked_outputs_are_refused(work, monkeypatch):
    src = work / "models" / "src"
    nodes = work / "nodes"
    nodes.mkdir()
    os.mkfifo(nodes / "fifo")
    targets = [nodes / "fifo"]
    try:  # a character device of our own, never the real /dev/null
        os.mknod(nodes / "null", 0o666 | 0o020000, os.makedev(1, 3))
        targets.append(nodes / "null")
    except PermissionError:
        pass  # not root; the FIFO stands for every special file
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("mine")
    (work / "mine.gguf").write_bytes(b"GGUF mine")
    (work / "m.Modelfile").write_text("FROM mine\n")
    before = tree(work)
    for target in targets:
        refused(run("quantize", src, "-o", target, *QUANTIZE, "--force"), "not a regular file")
        refused(run("export", "gguf", src, "-o", target, "--force"), "not a regular file")
    refused(run("quantize", src, "-o", work / "mine", *QUANTIZE, "--force"), "not written by")
    refused(run("export", "gguf", src, "-o", work / "mine.gguf", "--force"), "not written by")
    refused(run("import", work / "mine.gguf", "-o", work / "mine", "--force"), "not written by")
    # the GGUF is ours to write, its Modelfile is not ours to replace: refused before any work
    m = work / "m.gguf"
    refused(run("export", "gguf", src, "-o", m, "--ollama", "--force"), "m.Modelfile")
    monkeypatch.chdir(work / "mine")
    refused(run("quantize", src, "-o", ".", *QUANTIZE, "--force"), "current directory")
    assert tree(work) == before
    assert (nodes / "fifo").is_fifo()


def test_an_earlier_output_of_ours_is_replaced(work):
    src = work / "models" / "src"
    out, gguf_out = work / "out", work / "m.gguf"
    assert run("quantize", src, "-o", out, *QUANTIZE).exit_code == 0
    assert (out / MARK_FILE).is_file()
    first = tree(out)
    refused(run("quantize", src, "-o", out, "--bits", 8), "--force")
    assert run("quantize", src, "-o", out, "--bits", 8, "--force").exit_code == 0
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert tree(out) != first
    assert not [p for p in work.iterdir() if p.name.startswith(".")]

    args = ("export", "gguf", src, "-o", gguf_out, "--ollama")
    assert run(*args, "--type", "Q8_0").exit_code == 0
    assert gguf.GGUFReader(gguf_out).get_field(GGUF_MARK_KEY).contents() == "mlxedge"
    modelfile = work / "m.Modelfile"
    assert modelfile.read_text().startswith(TEXT_MARK + "FROM ./m.gguf")
    refused(run(*args, "--type", "Q4_0"), "--force")
    assert run(*args, "--type", "Q4_0", "--force").exit_code == 0
    assert gguf.GGUFReader(gguf_out).get_field("general.file_type").contents() == 2  # Q4_0

    hf = work / "hf"
    assert run("import", gguf_out, "-o", hf).exit_code == 0 and (hf / MARK_FILE).is_file()
    assert run("import", gguf_out, "-o", hf, "--force").exit_code == 0


def plant_links(src: Path, secret: Path, readme: bool = True) -> None:
    """A cloned repository's tricks: side files that are links to a private file."""
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (src / "tokenizer.model").symlink_to(secret)
    (src / "added_tokens.json").symlink_to(os.path.relpath(secret, src))
    if readme:
        (src / "README.md").symlink_to(secret)


def test_side_files_linked_outside_the_folder_never_reach_an_artifact(work, caplog):
    src = work / "models" / "src"
    plant_links(src, work / "id_ed25519")
    (src / "merges.txt").write_text("#version: 0.2\n")
    (src / "vocab.json").symlink_to("merges.txt")  # a link inside the folder is the folder's own
    out, gguf_out, hf = work / "out", work / "m.gguf", work / "hf"
    result = run("quantize", src, "-o", out, *QUANTIZE)
    assert result.exit_code == 0, result.output
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    for name in ("tokenizer.model", "added_tokens.json", "README.md"):
        assert any(f"src/{name}: skipped" in m and "id_ed25519" in m for m in skipped), name
    assert not (out / "tokenizer.model").exists() and not (out / "added_tokens.json").exists()
    assert (out / "vocab.json").read_text() == "#version: 0.2\n"
    assert run("export", "gguf", out, "-o", gguf_out).exit_code == 0
    assert run("import", gguf_out, "-o", hf).exit_code == 0
    for artifact in (out, hf):
        for p in artifact.rglob("*"):
            assert b"PRIVATE KEY" not in p.read_bytes(), p
            assert not p.is_symlink(), p
    assert b"PRIVATE KEY" not in gguf_out.read_bytes()


def test_a_hub_cache_snapshot_keeps_its_linked_side_files(work):
    src = work / "models" / "src"
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    cache = work / "hub"
    snap = hub_cache_snapshot(cache, src)
    plant_links(snap, work / "id_ed25519", readme=False)  # links that lead out of the cache
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = work / "out"
    cli = [sys.executable, "-m", "mlxedge.cli", "quantize", "org/tiny", "-o", str(out)]
    done = subprocess.run([*cli, "--bits", "4"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "tokenizer.model").exists() and "tokenizer.model" in done.stderr
    assert "apache-2.0" in (out / "README.md").read_text()  # the card, read through its blob
    # Asked for directly, the snapshot folder is the source: writing into it is refused.
    into = [sys.executable, "-m", "mlxedge.cli", "quantize", "org/tiny", "-o", str(snap / "q")]
    done = subprocess.run(into, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "lies inside the model" in done.stderr
