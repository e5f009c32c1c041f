"""Atomic writes: a file is either its old self or wholly the new one, and a failed write leaves nothing."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cosconvert.atomic import atomic_folder, atomic_write, remove_partial


def test_a_finished_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path
        tmp.write_text("new")
        assert path.read_text() == "old"  # untouched until the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_folder_write_is_removed_with_what_is_left_in_it(tmp_path):
    with atomic_folder(tmp_path / "model.onnx") as folder:
        (folder / "model.onnx").write_text("graph")
        (folder / "model.onnx.data").write_text("weights")
        os.replace(folder / "model.onnx", tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_killed_write_leaves_a_temporary_that_remove_partial_finds(tmp_path):
    """SIGKILL a real process in the middle of a write: the destination keeps its old content, and
    the only other thing in the folder is the temporary, which remove_partial deletes (and nothing else)."""
    path = tmp_path / "last.pt"
    path.write_text("old")
    (tmp_path / "notes.partial").write_text("mine")
    script = textwrap.dedent(f"""
        import sys, time
        from cosconvert.atomic import atomic_write
        with atomic_write({str(path)!r}) as tmp:
            tmp.write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert path.read_text() == "old"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and left[0].startswith(".last.pt.") and left[0].endswith(".partial"), left
    assert [p.name for p in remove_partial(tmp_path, ["last.pt", "log.json"])] == [left[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.partial"]
