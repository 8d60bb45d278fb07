r"""Annotating large files: peak memory and cells/s at 10k, 100k and 1M cells, with 1 and 2 worker processes.

The files are built by resampling (with replacement) the cells of a real dataset, by default
``../shared/datasets/kang2018_pbmc_ifnb_muscat`` (1,556 cells x 1,267 genes, CSR int32), into
``<work-dir>/cells_<n>.h5ad``; they are written chunk by chunk (``anndata.io.sparse_dataset(...).append``), so
building a million-cell file needs memory for one chunk only, and they are reused by later runs (never commit
them). Each measurement is one command in a fresh process::

    python -m instructcell annotate MODEL cells_<n>.h5ad -o <work-dir>/out.h5ad --labels-from-obs cell_type \\
        --num-workers W --threads T --quiet

A sampler thread reads the process tree (the command and its workers) every 0.1 s: the peak of the summed
resident memory (``peak RSS``, shared library pages counted once per process) and the largest single process.
``cells/s`` is the annotation phase (first to last saved chunk, from the run's chunk files); ``wall`` is the
whole command (model loading, the check of every count, the final copy of the file with the new obs columns).
The CPU cores of the machine may be shared with other jobs: the load average before each run and the run's
CPU share (CPU seconds of the tree / wall seconds, in cores) are reported, as are cells per CPU-second, which
does not depend on how much of the machine the run got. The 1-worker run at each size is the baseline for
the 2-worker speed-up; both outputs are compared label by label.

Writes ``<output>.md``, ``<output>.json`` and ``<output>.png``.

Example::

    python benchmarks/annotation_scale.py --model outputs/bench-model/final
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instructcell.inference.files import CellFile  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "kang2018_pbmc_ifnb_muscat"
_BUILD_ROWS = 50_000


def build_file(source: anndata.AnnData, n_cells: int, path: Path, seed: int) -> Path:
    """Write ``n_cells`` cells drawn with replacement from ``source`` to ``path`` (reused when it exists)."""
    if path.is_file():
        with CellFile(path) as cells:
            if cells.n_obs == n_cells:
                return path
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, source.n_obs, size=n_cells)
    X = sp.csr_matrix(source.X, dtype=np.int32)
    tmp = path.with_suffix(".building")
    first = anndata.AnnData(X=X[rows[:_BUILD_ROWS]], var=source.var.copy())
    first.write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        matrix = sparse_dataset(f["X"])
        for start in range(_BUILD_ROWS, n_cells, _BUILD_ROWS):
            matrix.append(X[rows[start : start + _BUILD_ROWS]])
        obs = source.obs.iloc[rows].reset_index(drop=True)
        obs.index = [f"cell_{i}" for i in range(n_cells)]
        del f["obs"]
        write_elem(f, "obs", obs)
    os.replace(tmp, path)
    return path


class TreeSampler(threading.Thread):
    """Sample the resident memory of a process and its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_tree_mb = 0.0
        self.peak_process_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        """Sample until stopped or the process ends."""
        while not self.stopped.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
                sizes = []
                for process in processes:
                    try:
                        sizes.append(process.memory_info().rss / 2**20)
                    except psutil.NoSuchProcess:
                        continue
                if sizes:
                    self.peak_tree_mb = max(self.peak_tree_mb, sum(sizes))
                    self.peak_process_mb = max(self.peak_process_mb, max(sizes))
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)


class ChunkWatcher(threading.Thread):
    """Record when the run's first and last chunk results were written (the annotation phase).

    The times are the chunk files' modification times, so a run that writes its output and removes the
    folder between two polls is still timed to its last chunk.
    """

    def __init__(self, folder: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.folder, self.interval = folder, interval
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        """Poll the run's chunk folder until stopped."""
        while not self.stopped.is_set():
            try:
                stamps = sorted(path.stat().st_mtime for path in self.folder.glob("chunk-*.json"))
            except FileNotFoundError:  # removed while listed: the run has finished
                stamps = []
            if len(stamps) > self.count:
                self.first, self.last, self.count = stamps[0], stamps[-1], len(stamps)
            time.sleep(self.interval)


def annotate_once(args, path: Path, n_cells: int, workers: int, output: Path) -> dict:
    """Run the annotate command once and measure it (see the module docstring)."""
    command = [
        sys.executable, "-m", "instructcell", "annotate", str(args.model), str(path), "-o", str(output),
        "--labels-from-obs", args.label_column, "--num-workers", str(workers),
        "--threads", str(args.threads), "--quiet",
        "--chunk-size", str(args.chunk_size), "--batch-size", str(args.batch_size), "--overwrite",
    ]  # fmt: skip
    partial = output.parent / f"{output.name}.instructcell-partial"
    shutil.rmtree(partial, ignore_errors=True)  # never resume an earlier, interrupted measurement
    load_before = os.getloadavg()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeSampler(process.pid)
    watcher = ChunkWatcher(partial)
    sampler.start()
    watcher.start()
    stdout, stderr = process.communicate()
    wall = time.monotonic() - start
    sampler.stopped.set()
    watcher.stopped.set()
    sampler.join()
    watcher.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    phase = None
    if watcher.count > 1 and watcher.last > watcher.first:  # cells annotated after the first chunk was saved
        phase = (watcher.count - 1) * args.chunk_size / (watcher.last - watcher.first)
    return {
        "cells": n_cells,
        "workers": workers,
        "wall_s": wall,
        "cells_per_s": phase,
        "cells_per_s_whole_command": n_cells / wall,
        "peak_rss_tree_mb": sampler.peak_tree_mb,
        "peak_rss_process_mb": sampler.peak_process_mb,
        "cpu_s": cpu,
        "cpu_share_cores": cpu / wall,
        "cells_per_cpu_s": n_cells / cpu if cpu else None,
        "load_before": load_before[0],
        "load_after": os.getloadavg()[0],
        "stdout": stdout.strip().splitlines(),
    }


def _labels(path: Path, column: str) -> pd.Series:
    with CellFile(path) as cells:
        return cells.obs_columns([column])[column]


def _fmt(value, digits=0) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def table(rows: list[dict]) -> str:
    """Format the results as a Markdown table."""
    lines = [
        "| cells | workers | peak RSS, tree (MB) | peak RSS, largest process (MB) | cells/s | speed-up | "
        "wall (s) | CPU share (cores) | cells per CPU-s | load before | labels = 1 worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = [
            f"{row['cells']:,}",
            str(row["workers"]),
            _fmt(row["peak_rss_tree_mb"]),
            _fmt(row["peak_rss_process_mb"]),
            _fmt(row["cells_per_s"]),
            _fmt(row.get("speed_up"), 2),
            _fmt(row["wall_s"], 1),
            _fmt(row["cpu_share_cores"], 2),
            _fmt(row["cells_per_cpu_s"]),
            f"{row['load_before']:.2f}",
            row.get("labels_agree", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Plot peak memory and cells/s against the number of cells, one line per worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for workers in sorted({row["workers"] for row in rows}):
        mine = [row for row in rows if row["workers"] == workers]
        cells = [row["cells"] for row in mine]
        memory.plot(
            cells, [row["peak_rss_tree_mb"] for row in mine], marker="o", label=f"{workers} worker(s)"
        )
        speed.plot(
            cells, [row["cells_per_s"] or np.nan for row in mine], marker="o", label=f"{workers} worker(s)"
        )
    for axis, title in ((memory, "peak RSS of the process tree (MB)"), (speed, "cells/s (annotation phase)")):
        axis.set_xscale("log")
        axis.set_xlabel("cells in the file")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Build the files, run every (size, workers) pair, print the table and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="trained model folder (Hub layout)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder or .h5ad to resample")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--label-column", default="cell_type")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "annotation_scale")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "annotation_scale")
    args = parser.parse_args(argv)
    data = args.data / f"{args.data.name}.h5ad" if args.data.is_dir() else args.data
    source = anndata.read_h5ad(data)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(n) for n in args.sizes.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    rows = []
    for n_cells in sizes:
        path = build_file(source, n_cells, args.work_dir / f"cells_{n_cells}.h5ad", args.seed)
        outputs = {}
        for workers in worker_counts:
            outputs[workers] = args.work_dir / f"out_{n_cells}_{workers}.h5ad"
            row = annotate_once(args, path, n_cells, workers, outputs[workers])
            baseline = next(
                (r for r in rows if r["cells"] == n_cells and r["workers"] == worker_counts[0]), None
            )
            if baseline is not None and row["cells_per_s"] and baseline["cells_per_s"]:
                row["speed_up"] = row["cells_per_s"] / baseline["cells_per_s"]
                first = _labels(outputs[worker_counts[0]], "instructcell_label")
                row["labels_agree"] = (
                    "yes" if first.equals(_labels(outputs[workers], "instructcell_label")) else "no"
                )
            rows.append(row)
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        for output in outputs.values():
            output.unlink()
    text = table(rows)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        ["python", "benchmarks/annotation_scale.py", *(argv if argv is not None else sys.argv[1:])]
    )
    header = (
        f"# Annotation of large files\n\n`{command}`\n\nModel: {args.model}; input: {data.name} resampled; "
        f"chunk size {args.chunk_size}, batch size {args.batch_size}, {args.threads} torch thread(s) per "
        f"worker; {os.cpu_count()} CPU cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB.\n\n"
    )
    args.output.with_suffix(".md").write_text(header + text + "\n")
    args.output.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    plot(rows, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
