"""Several processes over one job: ranks spawned here (``num_workers``) or launched by ``accelerate launch``.

Rank ``r`` of ``n`` takes every ``n``-th chunk starting at ``r``; rank 0 is the calling process and merges.
Spawned workers share the machine's cores (each gets ``cores // n`` torch threads), stop after their current
chunk when the calling process dies, and report an error back to it, where it is raised.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "WorkerProcesses",
    "launched_rank",
    "orphaned",
    "rank_device",
    "threads_per_worker",
    "torch_threads",
]

_parent_pid: int | None = None  # set in spawned workers: the process that started them


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` of a process started by ``accelerate launch`` or torchrun, else ``(0, 1)``."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as err:
        raise ValueError(f"RANK and WORLD_SIZE must be whole numbers ({err}).") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process of a launch.")
    return rank, world


def rank_device(device: str | int | None, rank: int) -> str | int | None:
    """Pick rank ``rank``'s device: the given one, or GPU ``rank % n_gpus`` when unset and GPUs exist."""
    if device is None and torch.cuda.is_available():
        return rank % torch.cuda.device_count()
    return device


def threads_per_worker(num_workers: int) -> int:
    """Torch threads for each of ``num_workers`` processes sharing this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // num_workers)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (unchanged when None), then restore the previous count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def orphaned() -> bool:
    """Tell whether this is a spawned worker whose starting process has died (it should stop)."""
    return _parent_pid is not None and os.getppid() != _parent_pid


def _run(
    target: Callable[[Any, int, int], None], job: Any, rank: int, world: int, threads: int, errors
) -> None:
    global _parent_pid
    _parent_pid = os.getppid()
    torch.set_num_threads(threads)
    try:
        target(job, rank, world)
    except BaseException as err:
        errors.put((rank, isinstance(err, ValueError), str(err), traceback.format_exc()))
        raise SystemExit(1) from None


class WorkerProcesses:
    """Ranks ``1 .. num_workers - 1`` of ``target(job, rank, num_workers)``, each in a spawned process.

    Parameters
    ----------
    target : callable
        A module-level function (spawned processes import it).
    job : picklable
        Its first argument.
    num_workers : int
        Ranks in all, the caller (rank 0) included.
    threads : int
        Torch threads of each worker.
    """

    def __init__(self, target: Callable[[Any, int, int], None], job: Any, num_workers: int, threads: int):
        context = multiprocessing.get_context("spawn")
        self._errors = context.Queue()
        self._processes = [
            context.Process(
                target=_run,
                args=(target, job, rank, num_workers, threads, self._errors),
                name=f"instructcell-worker-{rank}",
                daemon=True,
            )
            for rank in range(1, num_workers)
        ]
        for process in self._processes:
            process.start()

    def check(self) -> None:
        """Raise the error of a worker that failed (``ValueError`` for bad input, else ``RuntimeError``)."""
        for rank, process in enumerate(self._processes, start=1):
            if process.exitcode in (None, 0):
                continue
            try:  # a failed worker put its error on the queue before exiting
                failed_rank, bad_input, message, trace = self._errors.get(timeout=5)
            except queue.Empty:
                raise RuntimeError(
                    f"Worker {rank} stopped (exit code {process.exitcode}); rerun the same command to resume."
                ) from None
            if bad_input:
                raise ValueError(message)
            raise RuntimeError(f"Worker {failed_rank} failed:\n{trace}")

    def running(self) -> bool:
        """Tell whether any worker is still running."""
        return any(process.is_alive() for process in self._processes)

    def stop(self) -> None:
        """Terminate the workers that still run (their finished chunks are kept)."""
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
