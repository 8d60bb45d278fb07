"""Reproducible train/validation/test assignment by hashing.

A cell's split depends only on its dataset name and AnnData ``obs_name``:
``int(sha1(f"{dataset}/{obs_name}").hexdigest(), 16) % 10`` gives a bucket; buckets 0-7 are
``"train"``, 8 is ``"validation"``, 9 is ``"test"``. Templates are split 8:1:1 by the same rule
applied to their id, so no test template is ever used for training.
"""

from __future__ import annotations

import hashlib

SPLITS: tuple[str, str, str] = ("train", "validation", "test")


def hash_bucket(key: str, n_buckets: int = 10) -> int:
    """Map a string to a bucket in ``[0, n_buckets)`` with SHA-1 (stable across runs and machines).

    Parameters
    ----------
    key
        Any string.
    n_buckets
        Number of buckets.

    Returns
    -------
    int
        ``int(sha1(key).hexdigest(), 16) % n_buckets``.
    """
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % n_buckets


def bucket_to_split(bucket: int) -> str:
    """Turn a bucket in ``[0, 10)`` into a split name: 0-7 train, 8 validation, 9 test."""
    if not 0 <= bucket < 10:
        raise ValueError(f"bucket must be in [0, 10), got {bucket}.")
    if bucket < 8:
        return "train"
    return "validation" if bucket == 8 else "test"


def split_of(dataset: str, obs_name: str) -> str:
    """Split of one cell.

    Parameters
    ----------
    dataset
        Dataset name (e.g. ``"zheng2017_sorted_pbmc"``).
    obs_name
        The cell's AnnData ``obs_name``.

    Returns
    -------
    str
        ``"train"``, ``"validation"`` or ``"test"``.

    Examples
    --------
    >>> split_of("toy", "cell_0") in SPLITS
    True
    """
    return bucket_to_split(hash_bucket(f"{dataset}/{obs_name}"))


def template_split_of(template_id: str) -> str:
    """Split of one template, from ``sha1(template_id)`` with the same 8:1:1 rule as cells."""
    return bucket_to_split(hash_bucket(template_id))
