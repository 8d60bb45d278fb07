"""Training in several processes: check that the launcher really started them, and make them agree.

``accelerate launch --config_file configuration/accelerate/multi_cpu.yaml`` (CPU, gloo, with the training flag
``--use_cpu true``), ``accelerate launch --config_file configuration/accelerate/multi_gpu_ddp.yaml`` or
``torchrun --nproc_per_node N`` start one process per device; the Trainer then runs data-parallel (DDP).

In DDP every process must take the same number of optimizer steps: a process that stops one step earlier
leaves the others waiting in a gradient all-reduce forever. So every decision that ends training is made
once for all processes: the wall-clock stop by the main process (:func:`main_process_value`), an interrupt
by any process (:func:`any_process`).
"""

import os

import torch
from transformers import TrainingArguments

# Variables through which a launcher tells each process how many were started (torchrun, MPI).
LAUNCHED_PROCESSES_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MULTI_CPU_LAUNCH = (
    "accelerate launch --config_file configuration/accelerate/multi_cpu.yaml -m instructcell train RECIPE "
    "--use_cpu true"
)


def launched_processes() -> int | None:
    """Return the number of processes the launcher started, or None when no launcher said so."""
    for name in LAUNCHED_PROCESSES_VARIABLES:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def check_launch(args: TrainingArguments) -> None:
    """Refuse a run whose processes are not the ones the launcher was asked for.

    Raises
    ------
    ValueError
        ``accelerate launch --cpu --num_processes N`` (or a ``MULTI_CPU`` accelerate config) without mpirun:
        accelerate then starts a single process; or a launcher started several processes that did not join
        one process group (on a machine without GPUs: ``--use_cpu true`` was not given), so each would train
        alone on all the data and write the same files.
    """
    launched = launched_processes()
    if launched is None and "MASTER_PORT" in os.environ and "ACCELERATE_USE_CPU" in os.environ:
        raise ValueError(
            "`accelerate launch --cpu --num_processes N` (and a MULTI_CPU accelerate config) starts a single "
            "process unless mpirun runs it (--mpirun_hostfile). To train in N processes on the CPU, run "
            f"`{MULTI_CPU_LAUNCH}` (its num_processes, or --num_processes N) or `torchrun --nproc_per_node N "
            "-m instructcell train RECIPE --use_cpu true`; for one process, leave out --num_processes."
        )
    if launched is not None and launched != args.world_size:
        raise ValueError(
            f"The launcher started {launched} processes but they did not join one training group (this "
            f"process sees {args.world_size}). On a machine without GPUs add `--use_cpu true` to the "
            f"training flags, so that the processes train together on the CPU (gloo): `{MULTI_CPU_LAUNCH}`."
        )


def main_process_value(value: float, args: TrainingArguments) -> float:
    """Return the main process's ``value`` in every process (``value`` itself in a single process)."""
    if args.world_size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=args.device)
    torch.distributed.broadcast(tensor, src=0)
    return float(tensor.item())


def any_process(flag: bool, args: TrainingArguments) -> bool:
    """Return True in every process when ``flag`` is True in at least one."""
    if args.world_size <= 1:
        return flag
    tensor = torch.tensor([float(flag)], device=args.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def sum_over_processes(values: torch.Tensor, args: TrainingArguments) -> torch.Tensor:
    """Return the element-wise sum of ``values`` (any shape, on the CPU) over all processes, on the CPU."""
    if args.world_size <= 1:
        return values
    tensor = values.to(args.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.cpu()
