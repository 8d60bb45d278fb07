"""Small helpers shared by the report writers (``demo_report``, ``evaluate_suite``).

Number formatting for markdown tables, file-name-safe names, JSON conversion of numpy values, and an atomic
"write into a temporary folder, then move into place" step so that a failed run never leaves a partial
report behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fmt", "json_default", "publish", "safe_name", "staging_dir", "write_json"]


def fmt(value: Any, digits: int = 3) -> str:
    """Format a metric for a markdown table: ``digits`` decimals, ``n/a`` for None or NaN.

    Parameters
    ----------
    value : float, int, str or None
    digits : int
        Decimals of floats.

    Returns
    -------
    str
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    return str(value)


def safe_name(name: str) -> str:
    """Replace every character other than letters, digits, ``-``, ``_`` and ``.`` by ``_`` (file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy scalars and arrays, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (numpy values converted) with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, default=json_default) + "\n")


def publish(tmp: Path, out_dir: Path, names: Sequence[str]) -> None:
    """Move ``names`` from ``tmp`` into ``out_dir``, replacing older results; ``metrics.json`` goes last."""
    for name in sorted(names, key=lambda n: n == "metrics.json"):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)


@contextmanager
def staging_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Create ``out_dir`` and yield a temporary folder inside it, deleted afterwards whatever happens.

    Write the results into the yielded folder and :func:`publish` them at the end of the ``with`` block;
    an exception before that leaves ``out_dir`` as it was.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
