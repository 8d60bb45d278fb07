"""Annotating files of any size: chunks saved as they finish, resumed runs, worker ranks, Zarr, prefetch."""

import hashlib
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
import time

import anndata
import pandas as pd
import pytest
import torch
from synthetic_anndata import make_counts

from instructcell import cli, inference
from instructcell.hub import save_for_hub
from instructcell.inference.heap import release_freed_memory
from instructcell.inference.prefetch import prefetched
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK

LABELS = ["T cell", "B cell"]


@pytest.fixture
def pipe(tester, model):
    return InstructCellPipeline(model=model, processor=tester.processor, task=TASK)


@pytest.fixture
def model_dir(model, tester, tmp_path):
    return save_for_hub(model, tester.processor, tmp_path / "model")


@pytest.fixture
def h5ad(tmp_path):
    path = tmp_path / "cells.h5ad"
    make_counts(n_cells=11, n_genes=50, labels=("T cell", "B cell")).write_h5ad(path)
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _annotate(pipe, data, output, **kwargs):
    return inference.annotate(
        pipe, data, labels=LABELS, output=output, chunk_size=3, batch_size=2, progress=False, **kwargs
    )


def _same_annotation(first, second):
    """Same labels; probabilities equal up to float rounding (thread counts may differ between runs)."""
    pd.testing.assert_frame_equal(anndata.read_h5ad(first).obs, anndata.read_h5ad(second).obs, atol=1e-6)


def _stop_at_call(monkeypatch, n):
    """Make the ``n``-th model call raise KeyboardInterrupt (a Ctrl-C); returns the list of calls made."""
    calls = []
    original = InstructCellPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InstructCellPipeline, "__call__", counted)
    return calls


def test_stopped_run_resumes_where_it_stopped(pipe, h5ad, tmp_path, monkeypatch):
    straight = _annotate(pipe, h5ad, tmp_path / "straight.h5ad")
    before = _digest(h5ad)
    calls = _stop_at_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _annotate(pipe, h5ad, tmp_path / "out.h5ad")
    partial = tmp_path / "out.h5ad.instructcell-partial"
    assert not (tmp_path / "out.h5ad").exists() and len(list(partial.glob("chunk-*.json"))) == 2
    calls.clear()
    _annotate(pipe, h5ad, tmp_path / "out.h5ad")
    assert len(calls) == 2  # 4 chunks of 3 rows: only the two unfinished ones ran again
    _same_annotation(straight, tmp_path / "out.h5ad")
    assert not partial.exists() and _digest(h5ad) == before


def test_a_stopped_run_is_not_mixed_with_other_settings_or_a_changed_input(pipe, h5ad, tmp_path, monkeypatch):
    _stop_at_call(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _annotate(pipe, h5ad, tmp_path / "out.h5ad")
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"other settings or input \(template differ\).*delete the folder"):
        _annotate(pipe, h5ad, tmp_path / "out.h5ad", template="Which cell is this? {input}")
    changed = anndata.read_h5ad(h5ad)
    changed.X = changed.X * 2
    changed.write_h5ad(h5ad)
    with pytest.raises(ValueError, match=r"input_file differ"):
        _annotate(pipe, h5ad, tmp_path / "out.h5ad")
    assert not (tmp_path / "out.h5ad").exists()


def test_launched_ranks_split_the_chunks_and_rank_0_merges(pipe, h5ad, tmp_path, monkeypatch):
    straight = _annotate(pipe, h5ad, tmp_path / "straight.h5ad")
    partial = tmp_path / "out.h5ad.instructcell-partial"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _annotate(pipe, h5ad, tmp_path / "out.h5ad") is None  # rank 1: its chunks, no output
    assert sorted(p.name for p in partial.glob("chunk-*")) == ["chunk-00000001.json", "chunk-00000003.json"]
    monkeypatch.setenv("RANK", "0")
    assert _annotate(pipe, h5ad, tmp_path / "out.h5ad") == tmp_path / "out.h5ad"
    _same_annotation(straight, tmp_path / "out.h5ad")
    assert not partial.exists()
    with pytest.raises(ValueError, match="not both"):
        _annotate(pipe, h5ad, tmp_path / "again.h5ad", num_workers=2)


@pytest.mark.slow
def test_worker_processes_give_the_single_process_result(pipe, model_dir, h5ad, tmp_path):
    straight = _annotate(pipe, h5ad, tmp_path / "straight.h5ad")
    _annotate(str(model_dir), h5ad, tmp_path / "two.h5ad", num_workers=2)
    _same_annotation(straight, tmp_path / "two.h5ad")
    with pytest.raises(ValueError, match="pass the model folder"):
        _annotate(pipe, h5ad, tmp_path / "three.h5ad", num_workers=2)  # built in memory: no folder


def test_zarr_input_and_output(pipe, h5ad, tmp_path):
    store = tmp_path / "cells.zarr"
    anndata.read_h5ad(h5ad).write_zarr(store)
    _annotate(pipe, h5ad, tmp_path / "straight.h5ad")
    _annotate(pipe, store, tmp_path / "out.zarr")
    expected = anndata.read_h5ad(tmp_path / "straight.h5ad").obs
    pd.testing.assert_frame_equal(anndata.read_zarr(tmp_path / "out.zarr").obs, expected, atol=1e-6)
    _annotate(pipe, store, store)  # in place
    pd.testing.assert_frame_equal(anndata.read_zarr(store).obs, expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cells.h5ad",
        "cells.zarr",
        "out.zarr",
        "straight.h5ad",
    ]
    with pytest.raises(ValueError, match="must have the input's format"):
        _annotate(pipe, store, tmp_path / "out.h5ad")


def test_threads_apply_to_the_run_only(pipe, h5ad, tmp_path):
    before = torch.get_num_threads()
    _annotate(pipe, h5ad, tmp_path / "one.h5ad", num_threads=1)
    _annotate(pipe, h5ad, tmp_path / "default.h5ad")
    _same_annotation(tmp_path / "one.h5ad", tmp_path / "default.h5ad")
    assert torch.get_num_threads() == before


def test_progress_bar_reports_cells_per_second(pipe, h5ad, tmp_path, capsys):
    inference.annotate(pipe, h5ad, labels=LABELS, output=tmp_path / "out.h5ad", chunk_size=4)
    err = capsys.readouterr().err
    assert "instructcell annotate" in err and "11/11" in err and "cell/s" in err


def test_prefetch_stays_a_bounded_number_of_items_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = prefetched(items(), depth=2)
    consumed = [next(stream) for _ in range(3)]
    time.sleep(0.3)  # give the producer every chance to run ahead
    assert consumed == [0, 1, 2] and len(produced) <= len(consumed) + 2 + 1
    stream.close()  # stopping the consumer stops the producer thread
    assert not any(t.name == "instructcell-prefetch" for t in threading.enumerate())


def test_prefetch_raises_a_producer_error_where_it_happened():
    def items():
        yield 1
        raise ValueError("bad chunk")

    stream = prefetched(items(), depth=1)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="bad chunk"):
        next(stream)


_SLOW_ANNOTATION = """
import sys, time
from modeling_instructcell import InstructCellPipeline
from instructcell import cli
original = InstructCellPipeline.__call__
def slow(self, *args, **kwargs):
    time.sleep(0.2)
    return original(self, *args, **kwargs)
InstructCellPipeline.__call__ = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_during_annotation_then_rerun(model_dir, tmp_path):
    """SIGKILL mid-run: the input is intact, no output exists, and the same command finishes the job."""
    path = tmp_path / "cells.h5ad"
    make_counts(n_cells=40, n_genes=50, labels=("T cell", "B cell")).write_h5ad(path)
    before = _digest(path)
    argv = [
        "annotate",
        str(model_dir),
        str(path),
        "-o",
        str(tmp_path / "out.h5ad"),
        "--labels",
        "T cell,B cell",
    ]
    argv += ["--chunk-size", "1", "--quiet"]
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_ANNOTATION), *argv])
    partial = tmp_path / "out.h5ad.instructcell-partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("chunk-*.json"))) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert _digest(path) == before and not (tmp_path / "out.h5ad").exists()
    assert 3 <= len(list(partial.glob("chunk-*.json"))) < 40
    assert cli.main(argv) == 0
    assert cli.main([*argv[:4], str(tmp_path / "straight.h5ad"), *argv[5:]]) == 0
    _same_annotation(tmp_path / "straight.h5ad", tmp_path / "out.h5ad")
    assert _digest(path) == before and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "model", "out.h5ad", "straight.h5ad"]


def test_every_chunk_hands_freed_memory_back(pipe, h5ad, tmp_path, monkeypatch):
    """Without a trim per chunk, glibc's heaps grow with the number of chunks (docs/scaling.md, Measured)."""
    calls = []
    monkeypatch.setattr("instructcell.inference.annotation.release_freed_memory", lambda: calls.append(1))
    _annotate(pipe, h5ad, tmp_path / "out.h5ad")
    assert len(calls) == 4  # 11 cells in chunks of 3


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is a glibc call")
def test_freed_memory_is_handed_back_on_glibc():
    assert release_freed_memory() is True
