"""Presets, training recipes and launch configs: package data, installed as ``instructcell.configuration``.

This folder is data: ``presets/*.json`` (model sizes), ``recipes/*.yaml`` (training recipes) and
``accelerate/*.yaml`` (``accelerate launch --config_file`` configs). The functions below are the one way to
read them, from a source checkout and from an installed wheel alike.

A recipe is a YAML file of ``examples/train.py`` / ``instructcell train`` arguments. ``extends: <recipe>``
starts from another recipe and overrides its keys; a mapping value (e.g. the demo's ``demo:`` settings) is
a section that is not a training argument. ``default`` is our training recipe, ``paper`` the published one.
"""

from __future__ import annotations

import json
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

__all__ = [
    "accelerate_config",
    "load_preset",
    "load_recipe",
    "preset_names",
    "recipe_names",
]

_ROOT = files(__name__)


def _names(folder: str, suffix: str) -> list[str]:
    return sorted(
        entry.name[: -len(suffix)]
        for entry in _ROOT.joinpath(folder).iterdir()
        if entry.name.endswith(suffix)
    )


def _resolve(kind: str, name: str | os.PathLike, folder: str, suffix: str) -> Traversable | Path:
    """Find a shipped file by name, or a user's file by path; a clear error names the choices otherwise."""
    path = Path(name)
    if path.suffix:
        if not path.is_file():
            raise ValueError(f"No {kind} file {path}.")
        return path
    entry = _ROOT.joinpath(folder, f"{name}{suffix}")
    if not entry.is_file():
        raise ValueError(
            f"No {kind} {str(name)!r}; use one of {_names(folder, suffix)} or a path to a {suffix} file."
        )
    return entry


def preset_names() -> list[str]:
    """Names of the shipped model presets (``tiny``, ``small``, ``base``)."""
    return _names("presets", ".json")


def recipe_names() -> list[str]:
    """Names of the shipped training recipes."""
    return _names("recipes", ".yaml")


def load_preset(preset: str | os.PathLike) -> dict[str, Any]:
    """Read a model preset by name or JSON path; keys starting with ``_`` are notes and are dropped."""
    entry = _resolve("preset", preset, "presets", ".json")
    return {key: value for key, value in json.loads(entry.read_text()).items() if not key.startswith("_")}


def load_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """Read a training recipe by name or YAML path, with its ``extends`` chain resolved.

    Parameters
    ----------
    recipe : str or PathLike
        A shipped recipe name (:func:`recipe_names`) or the path of a YAML file. A user's file may extend a
        shipped recipe (``extends: default``).

    Returns
    -------
    dict
        Training arguments (``key: scalar``) and sections (``key: mapping``), the file's keys over the ones
        it extends. Sections are merged key by key.
    """
    import yaml  # only the recipes need it

    chain: list[str] = []
    merged: dict[str, Any] = {}
    while recipe is not None:
        entry = _resolve("recipe", recipe, "recipes", ".yaml")
        name = str(recipe)
        if name in chain:
            raise ValueError(f"Recipe {chain[0]!r} extends itself through {' -> '.join([*chain, name])}.")
        chain.append(name)
        values = yaml.safe_load(entry.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Recipe {name!r} must be a YAML mapping of `key: value` arguments.")
        recipe = values.pop("extends", None)
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**value, **merged[key]}
            else:
                merged.setdefault(key, value)
    return merged


def accelerate_config(name: str) -> Path:
    """Path of a shipped ``accelerate launch --config_file`` config (``single_cpu``, ``multi_gpu_ddp``...)."""
    entry = _resolve("accelerate config", name, "accelerate", ".yaml")
    return Path(str(entry))
