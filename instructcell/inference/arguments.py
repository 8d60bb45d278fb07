"""Checks of the numbers users pass to the inference functions, with messages that say what is expected."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_whole_number"]


def check_whole_number(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as an int; raise a ``ValueError`` unless it is a whole number of at least ``minimum``.

    ``True``, ``2.0`` and ``"3"`` are refused: a flag, a float or a string where a count is expected is a
    mistake worth reporting, not converting.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")
    return int(value)
