"""Produce items in a background thread, a bounded number ahead of their consumer (reading overlaps work)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetched"]

T = TypeVar("T")

_ITEM, _DONE, _ERROR = range(3)


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate over ``items`` while a background thread produces the next ``depth`` of them.

    Memory holds at most ``depth + 2`` items (the queue, the one being produced, the one being consumed),
    whatever the length of ``items``. An exception raised while producing is raised in the consumer at the
    position where it happened; stopping the iteration early stops the producer.

    Parameters
    ----------
    items : iterable
        Produced in the background thread (e.g. chunks read from a file).
    depth : int
        How many produced items may wait for the consumer.

    Yields
    ------
    The items, in order.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}.")
    waiting: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                waiting.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((_ITEM, item)):
                    return
            put((_DONE, None))
        except BaseException as err:  # handed to the consumer, which raises it
            put((_ERROR, err))

    thread = threading.Thread(target=produce, name="instructcell-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = waiting.get()
            if kind == _DONE:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
