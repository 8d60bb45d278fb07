"""The overwrite rules every writer follows and atomic writes, including a writer killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from instructcell.outputs import atomic_output, check_destination


def test_new_files_in_place_and_overwrite(tmp_path):
    source = tmp_path / "cells.h5ad"
    source.write_text("input")
    other = tmp_path / "other.h5ad"
    other.write_text("someone's data")
    assert check_destination(tmp_path / "new" / "out.h5ad") == tmp_path / "new" / "out.h5ad"
    assert check_destination(source, in_place_of=source) == source  # -o = the input
    assert check_destination(tmp_path / "." / "cells.h5ad", in_place_of=source).name == "cells.h5ad"
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        check_destination(other, in_place_of=source)
    assert check_destination(other, overwrite=True) == other
    with pytest.raises(ValueError, match="never replaced here"):
        check_destination(other, overwrite=True, flag=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "other.h5ad"]  # nothing created


def test_wrong_kinds_of_destination(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a folder; name a file inside it"):
        check_destination(tmp_path / "folder")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_destination(tmp_path / "afile" / "out.h5ad")
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(ValueError, match="a .zarr output is a folder"):
        check_destination(tmp_path / "file.zarr", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_destination(folder / "out.h5ad")
    finally:
        folder.chmod(0o700)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "out.h5ad"
    path.write_text("previous")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]
    with atomic_output(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new"


def test_folder_destination_is_replaced_whole(tmp_path):
    store = tmp_path / "out.zarr"
    store.mkdir()
    (store / "old").write_text("old")
    with atomic_output(store) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in store.iterdir()] == ["new"] and len(list(tmp_path.iterdir())) == 1


def _writer(path, ready, body):
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from instructcell.outputs import atomic_output
        with atomic_output({str(path)!r}) as tmp:
            {body}
            pathlib.Path({str(ready)!r}).write_text("ready")
            time.sleep(60)
        """
    )
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_for(path, process, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, "the writer exited early"
        assert time.monotonic() < deadline, "the writer never got ready"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_kill_9_during_a_write(tmp_path, kind):
    """SIGKILL mid-write: the previous result is intact, and the next write cleans up after the dead one."""
    out = tmp_path / ("out.h5ad" if kind == "file" else "out.zarr")
    if kind == "file":
        out.write_text("previous")
        body = "tmp.write_text('half written')"
    else:
        out.mkdir()
        (out / "data").write_text("previous")
        body = "tmp.mkdir(); (tmp / 'data').write_text('half written')"
    ready = tmp_path / "ready"
    writer = _writer(out, ready, body)
    _wait_for(ready, writer)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    ready.unlink()
    previous = out.read_text() if kind == "file" else (out / "data").read_text()
    assert previous == "previous"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in (out.name,)]
    assert leftovers == [
        f".{out.name}.{writer.pid}.instructcell-tmp"
    ]  # hidden, and only until the next write
    with atomic_output(out) as tmp:
        if kind == "file":
            tmp.write_text("next")
        else:
            tmp.mkdir()
            (tmp / "data").write_text("next")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    out = tmp_path / "out.zarr"
    aside = tmp_path / ".out.zarr.999999999.instructcell-previous"  # no process has this pid
    aside.mkdir()
    (aside / "data").write_text("previous")
    with pytest.raises(RuntimeError), atomic_output(out):
        raise RuntimeError("the next write fails too")
    assert (out / "data").read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["out.zarr"]
