"""Where results are written: the overwrite rules every writer follows, and atomic writes.

Every command and function of this package that writes a user's file goes through this module:

* :func:`check_destination` decides whether a destination may be written, before any expensive work. A new
  file is fine (missing parent folders are created). Writing over the input itself (``-o`` = the input) is
  fine: the input is replaced in one step by a copy that holds the results. Replacing any *other* existing
  file or folder needs ``overwrite=True`` (``--overwrite``). A destination that is a folder where a file is
  expected (or a file where a ``.zarr`` folder is expected), or one in a folder that cannot be written, is
  refused with a ``ValueError`` that says what to do.
* :func:`atomic_output` writes through a temporary sibling and moves it onto the destination only when the
  write has finished, so a failure or a ``kill -9`` never leaves a half-written result and never touches the
  previous file. Temporaries are named ``.<name>.<pid>.instructcell-tmp``; one left behind by a killed
  process is removed by the next write to the same destination.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "check_destination", "is_zarr_path", "same_path"]

_TEMPORARY = "instructcell-tmp"
_PREVIOUS = "instructcell-previous"


def is_zarr_path(path: str | os.PathLike) -> bool:
    """Tell whether ``path`` names a Zarr store (a folder ending in ``.zarr``) rather than a file."""
    return Path(path).suffix.lower() == ".zarr"


def same_path(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Tell whether two paths name the same file or folder (links and relative paths resolved)."""
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def _nearest_existing_folder(path: Path) -> Path:
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    return folder


def check_destination(
    path: str | os.PathLike,
    overwrite: bool = False,
    in_place_of: str | os.PathLike | None = None,
    flag: str | None = "--overwrite (Python: overwrite=True)",
) -> Path:
    """Check that ``path`` may be written, before any work is done; return it as a ``Path``.

    Parameters
    ----------
    path : str or PathLike
        The destination: a file, or a folder for a ``.zarr`` store.
    overwrite : bool
        Allow replacing an existing destination that is not ``in_place_of``.
    in_place_of : str or PathLike, optional
        The input the result is computed from. Writing the result onto it is always allowed (it is
        replaced atomically by a copy that holds the results).
    flag : str or None
        How the caller spells ``overwrite`` in the error message; None for a writer that never replaces an
        existing file (``overwrite`` is then ignored).

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        The destination is the wrong kind (a folder for a file, a file for a ``.zarr`` store), exists and
        may not be replaced, or its folder cannot be written.
    """
    path = Path(path).expanduser()
    wants_folder = is_zarr_path(path)
    if path.exists():
        if path.is_dir() and not wants_folder:
            raise ValueError(
                f"The output {path} is a folder; name a file inside it, e.g. {path / 'out.h5ad'}."
            )
        if not path.is_dir() and wants_folder:
            raise ValueError(
                f"The output {path} is a file, but a .zarr output is a folder; name another path."
            )
        in_place = in_place_of is not None and same_path(path, in_place_of)
        if flag is None:
            raise ValueError(f"{path} already exists and is never replaced here; name a new file.")
        if not in_place and not overwrite:
            raise ValueError(
                f"The output {path} already exists; pass {flag} to replace it, or name a new file."
            )
    folder = _nearest_existing_folder(path)
    if not folder.is_dir():
        raise ValueError(f"Cannot write {path}: {folder} is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{_TEMPORARY}", dir=folder)
    except OSError as err:
        raise ValueError(
            f"Cannot write {path}: the folder {folder} is not writable ({err.strerror})."
        ) from err
    os.close(fd)
    os.unlink(probe)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(path: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """Temporaries (or previous versions) of ``path`` written by this module, with their writer's pid."""
    for candidate in path.parent.glob(glob.escape(f".{path.name}.") + f"*.{kind}"):
        pid = candidate.name[len(path.name) + 2 : -len(kind) - 1]
        if pid.isdigit():
            yield candidate, int(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clean_up_after_killed_writers(path: Path) -> None:
    """Restore a folder destination a killed writer left moved aside, and drop its temporaries."""
    for previous, pid in _leftovers(path, _PREVIOUS):
        if not _pid_alive(pid):
            if path.exists():
                _remove(previous)
            else:
                os.replace(previous, path)
    for temporary, pid in _leftovers(path, _TEMPORARY):
        if not _pid_alive(pid):
            _remove(temporary)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on failure delete it.

    A file destination is replaced with one ``os.replace``. A folder destination (a ``.zarr`` store) that
    already exists is moved aside, the new folder moved in, then the old one deleted; a process killed
    between the two moves leaves the old folder as ``.<name>.<pid>.instructcell-previous``, and the next
    write to the same destination puts it back first. The caller decides whether the destination may be
    replaced (:func:`check_destination`).

    Parameters
    ----------
    path : str or PathLike
        The destination; its parent folders are created.

    Yields
    ------
    Path
        Where to write (nothing exists there yet).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_up_after_killed_writers(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{_TEMPORARY}"
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            previous = path.parent / f".{path.name}.{os.getpid()}.{_PREVIOUS}"
            os.replace(path, previous)
            os.replace(tmp, path)
            _remove(previous)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)
