"""Writing a report folder: ``metrics.json``, ``report.md``, ``figures/`` and extra files, all or nothing.

Every report (``instructcell evaluate``, ``make demo``, the benchmark suite) is written through
:func:`report_folder`: figures and files go into a temporary folder inside the destination, and
:meth:`ReportFolder.publish` renders ``report.md`` from the metrics
(:func:`instructcell.evaluation.render.render_report`), writes ``metrics.json`` and moves everything into
place, ``metrics.json`` last. An exception before that
leaves the destination as it was, never a partial report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .render import render_report

__all__ = ["ReportFolder", "plain", "report_folder", "safe_name"]


def safe_name(name: str) -> str:
    """Replace every character other than letters, digits, ``-``, ``_`` and ``.`` by ``_`` (file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plain(value: Any) -> Any:
    """JSON-ready copy of ``value``: numpy scalars and arrays to Python, paths to str, NaN and inf to None."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ReportFolder:
    """A report being written into a staging folder, moved into ``out_dir`` by :meth:`publish`.

    Parameters
    ----------
    staging : Path
        The temporary folder (inside ``out_dir``) the files are written to.
    out_dir : Path
        The destination; files in it other than the report's own are left alone.
    """

    def __init__(self, staging: Path, out_dir: Path) -> None:
        self.staging = staging
        self.out_dir = out_dir
        self.figures: dict[str, str] = {}
        self._files: list[str] = []

    def figure(self, title: str, name: str) -> Path:
        """Register the figure ``title`` as ``figures/<name>.png`` and return the path to write it to."""
        relative = f"figures/{safe_name(name)}.png"
        self.figures[title] = relative
        (self.staging / "figures").mkdir(exist_ok=True)
        return self.staging / relative

    def file(self, name: str) -> Path:
        """Register an extra file of the report (e.g. a CSV) and return the path to write it to."""
        self._files.append(name)
        return self.staging / name

    def publish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Add the figures to ``metrics``, write ``report.md`` and ``metrics.json``, move all into place.

        Returns
        -------
        dict
            The metrics as written (JSON values: numpy scalars converted, NaN as None).
        """
        metrics.setdefault("figures", {}).update(self.figures)
        written = plain(metrics)
        (self.staging / "report.md").write_text(render_report(written))
        (self.staging / "metrics.json").write_text(json.dumps(written, indent=2) + "\n")
        names = [*(["figures"] if self.figures else []), *self._files, "report.md", "metrics.json"]
        for name in names:  # metrics.json last: its presence means the report is complete
            target = self.out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(self.staging / name, target)
        return written


@contextmanager
def report_folder(out_dir: str | os.PathLike) -> Iterator[ReportFolder]:
    """Create ``out_dir`` and yield a :class:`ReportFolder` staged inside it; the staging folder is removed.

    Call :meth:`ReportFolder.publish` at the end of the ``with`` block; an exception before that leaves
    ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        yield ReportFolder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
