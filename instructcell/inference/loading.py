"""Load a model folder or Hub id as the ``single-cell-instruction`` pipeline, with dtype and device."""

from __future__ import annotations

import os
import warnings

import torch

from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK

from .speed import SpeedOptions, apply_speed_options, bf16_is_fast


def load_pipeline(
    model: str | os.PathLike | InstructCellPipeline,
    dtype: torch.dtype | str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
    speed: SpeedOptions | None = None,
) -> InstructCellPipeline:
    """Build an :class:`InstructCellPipeline` for a model folder or Hub id (a pipeline is returned as is).

    Parameters
    ----------
    model : str, PathLike or InstructCellPipeline
    dtype : torch.dtype or {"bf16", "bfloat16", "fp32"}, optional
        ``bf16`` runs the language model in bfloat16 (cell encoder and VAE stay float32).
    device : str or int, optional
        ``"cpu"``, ``"cuda"``, ``0``...; default: the first GPU when there is one, else CPU.
    trust_remote_code : bool
        Load the folder's own code rather than this package's classes.
    speed : SpeedOptions, optional
        Threads, int8 linear layers, ``torch.compile`` (:mod:`.speed`); applied to a given pipeline too.
    """
    if isinstance(model, InstructCellPipeline):
        if speed is not None:
            apply_speed_options(model.model, speed)
        return model
    from transformers import AutoModel, AutoProcessor

    if isinstance(dtype, str):
        dtype = {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }[dtype.lower()]
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    loaded = AutoModel.from_pretrained(str(model), **kwargs).eval()
    processor = AutoProcessor.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    if device is None:
        device = 0 if torch.cuda.is_available() else -1
    pipe = InstructCellPipeline(model=loaded, processor=processor, task=TASK, device=device)
    if dtype == torch.bfloat16 and not bf16_is_fast(pipe.device):
        warnings.warn(
            "This CPU has no native bfloat16 matrix instructions (AVX512-BF16 or AMX): bf16 is emulated "
            "and slower than float32 here (docs/speed.md).",
            stacklevel=2,
        )
    if speed is not None:
        apply_speed_options(pipe.model, speed)
    return pipe
