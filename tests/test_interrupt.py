"""Interrupted runs: SIGTERM cleans up like SIGINT; what SIGKILL leaves, the next run to the same
output removes (never a live run's), and an old output a killed `--force` swap moved aside is put
back."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlxedge.atomic import atomic_output, is_ours, mark_folder, sweep_stale
from mlxedge.errors import MlxedgeError
from tests.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[1]

# Runs `mlxedge quantize` and stops inside the pipeline, after the first tensor is written: the
# partial output then holds shards and the mark. It says so on stdout and waits to be signalled.
_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import mlxedge.pipeline as pipeline
    real = pipeline.convert

    def convert(model, plans, writer, report, method, on_tensor=None):
        def hold(plan):
            if on_tensor is not None:
                on_tensor(plan)
            print("WRITING", flush=True)
            time.sleep(60)
        return real(model, plans, writer, report, method, hold)

    pipeline.convert = convert
    from mlxedge.cli import main
    main(sys.argv[1:])
    """
)


def _start(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "quantize", str(model), "-o", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    if line.strip() != "WRITING":
        proc.kill()
        raise AssertionError(f"the run did not reach the pipeline: {line!r} {proc.stderr.read()}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", layers=1)


def test_sigterm_cleans_up_like_sigint(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _start(tiny, out)
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated; nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_after_sigkill_the_next_run_removes_the_stale_partial(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _start(tiny, out)
    proc.kill()
    proc.wait(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(stale) == 1 and is_ours(stale[0]) and any(stale[0].glob("*.safetensors"))
    result = subprocess.run(
        [sys.executable, "-m", "mlxedge.cli", "quantize", str(tiny), "-o", str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "removed" in result.stderr and "interrupted run" in result.stderr


def test_a_live_runs_partial_is_never_swept(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _start(tiny, out)  # alive, holding its partial's lock
    try:
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert sweep_stale(out) == []
        with atomic_output(tmp_path / "out2"):  # another output's sweep leaves it alone too
            pass
        assert partial.is_dir() and is_ours(partial)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert [line for line in sweep_stale(out) if "removed" in line]
    assert not partial.exists()


def test_sweep_keeps_what_is_not_ours_and_what_another_process_locks(tmp_path):
    out = tmp_path / "out"
    foreign = tmp_path / ".out.partial-user"  # a name like ours, but not marked and not empty
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    locked = tmp_path / ".out.partial-live"
    locked.mkdir()
    mark_folder(locked)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(locked)!r}, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("LOCKED", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        assert sweep_stale(out) == []
        assert (foreign / "notes.txt").read_text() == "mine" and is_ours(locked)
    finally:
        holder.kill()
        holder.wait()
    assert sweep_stale(out) == [f"removed {locked}, left by an interrupted run"]
    assert foreign.is_dir()


def test_a_killed_force_swap_gets_its_old_output_back(tmp_path):
    out = tmp_path / "out"
    # What a kill between moving the old folder aside and renaming the new one in leaves.
    aside = tmp_path / ".out.old-abc123"
    (aside / "old").mkdir(parents=True)
    mark_folder(aside / "old")
    (aside / "old" / "weights.txt").write_text("previous")
    with pytest.raises(MlxedgeError, match="already exists"):
        with atomic_output(out):  # the sweep puts it back; then out exists, without --force
            pass
    assert (out / "weights.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Killed after the new one was in place: the aside is only removed.
    (aside / "old").mkdir(parents=True)
    mark_folder(aside / "old")
    assert sweep_stale(out) == [f"removed {aside}, left by an interrupted --force"]
    assert (out / "weights.txt").read_text() == "previous"


def test_an_empty_stale_partial_is_removed(tmp_path):
    out = tmp_path / "out.gguf"
    (tmp_path / ".out.gguf.partial-x1").write_bytes(b"")  # killed before the writer marked it
    (tmp_path / ".out.gguf.partial-x2").write_bytes(b"data")  # unmarked and not empty: kept
    sweep_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.gguf.partial-x2"]


def test_lock_is_released_after_the_commit(tmp_path):
    with atomic_output(tmp_path / "out") as temp:
        fd = os.open(temp, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # held by the run while it writes
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)
