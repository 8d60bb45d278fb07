"""An annotation run's results, saved chunk by chunk beside its output so that a stopped run resumes.

The folder ``<output>.instructcell-partial/``, created with the first finished chunk, holds ``run.json``
(everything the results depend on: the input's size and modification time, the model's weights, the
instruction, the label set, the chunk size...) and one ``chunk-<index>.json`` per finished chunk, each written
atomically. Rerunning the same command skips the finished chunks; a rerun with other settings, or after the
input changed, is refused rather than mixing results. The folder is deleted once the output is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from instructcell.outputs import atomic_output

__all__ = ["PartialResults"]

_MANIFEST = "run.json"
_CHUNK = re.compile(r"^chunk-(\d+)\.json$")


def _normalized(settings: dict[str, Any]) -> dict[str, Any]:
    """Return ``settings`` as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(settings, sort_keys=True))


class PartialResults:
    """The per-chunk results of one run (see the module docstring).

    Parameters
    ----------
    output : Path
        The run's destination; the folder is ``<output>.instructcell-partial`` beside it.
    settings : dict
        JSON-serializable description of everything the results depend on.

    Raises
    ------
    ValueError
        The folder exists but holds another run (other settings or a changed input), or is not one.
    """

    def __init__(self, output: Path, settings: dict[str, Any]):
        self.folder = output.parent / f"{output.name}.instructcell-partial"
        self.settings = _normalized(settings)
        manifest = self.folder / _MANIFEST
        if self.folder.exists() and not manifest.is_file():
            # Empty, or only a peer process's manifest being written: a run that is starting.
            if not self.folder.is_dir() or any(not p.name.startswith(".") for p in self.folder.iterdir()):
                raise ValueError(
                    f"{self.folder} exists but is not a partial InstructCell run; move it away and rerun."
                )
        if manifest.is_file():
            self._check(json.loads(manifest.read_text()))

    def _check(self, saved: dict[str, Any]) -> None:
        settings = self.settings
        if saved != settings:
            differing = sorted(key for key in {*saved, *settings} if saved.get(key) != settings.get(key))
            raise ValueError(
                f"{self.folder} holds a stopped run with other settings or input ({', '.join(differing)} "
                "differ). Rerun the command that started it to finish it, or delete the folder to start over."
            )

    def done(self) -> set[int]:
        """Return the indices of the finished chunks."""
        if not self.folder.is_dir():
            return set()
        return {int(m.group(1)) for p in self.folder.iterdir() if (m := _CHUNK.match(p.name))}

    def _path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:08d}.json"

    def save(self, index: int, result: dict[str, Any]) -> None:
        """Write one chunk's result (JSON-serializable) atomically; the first one creates the folder."""
        manifest = self.folder / _MANIFEST
        if not manifest.is_file():  # created with the first result: a run that fails earlier leaves nothing
            with atomic_output(manifest) as tmp:
                tmp.write_text(json.dumps(self.settings, indent=1, sort_keys=True))
        self._check(json.loads(manifest.read_text()))
        with atomic_output(self._path(index)) as tmp:
            tmp.write_text(json.dumps(result))

    def load(self, index: int) -> dict[str, Any]:
        """One chunk's result."""
        return json.loads(self._path(index).read_text())

    def remove(self) -> None:
        """Delete the folder (after the output is written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
