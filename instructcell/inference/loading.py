"""Load a model folder or Hub id as the ``single-cell-instruction`` pipeline, with dtype and device."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from instructcell.hub import check_processor_files
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK

from .speed import SpeedOptions, apply_speed_options, bf16_is_fast

__all__ = ["ModelSource", "load_pipeline", "model_fingerprint"]

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to load it: what a worker process needs to load the same pipeline.

    Parameters
    ----------
    path : str
        Model folder or Hub id.
    dtype : str, optional
        ``"bf16"`` (language model in bfloat16) or ``"fp32"``.
    device : str or int, optional
        ``"cpu"``, ``"cuda"``, ``0``...; default: the first GPU when there is one, else CPU.
    trust_remote_code : bool
        Load the folder's own code rather than this package's classes.
    speed : SpeedOptions, optional
        Threads, int8 linear layers, ``torch.compile`` (:mod:`.speed`).
    """

    path: str
    dtype: str | None = None
    device: str | int | None = None
    trust_remote_code: bool = False
    speed: SpeedOptions | None = None

    def load(self) -> InstructCellPipeline:
        """Load the pipeline (see :func:`load_pipeline`)."""
        return load_pipeline(self.path, self.dtype, self.device, self.trust_remote_code, self.speed)


def _looks_like_a_path(name: str) -> bool:
    """Tell a path from a Hub id (``name`` or ``owner/name``): ``./x``, ``/x``, ``a/b/c``, ``~`` are paths."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_model_location(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a model folder (no config.json); pass the folder written by "
                "save_for_hub / training (<output_dir>/final) or a Hub id."
            )
    elif _looks_like_a_path(name):
        raise ValueError(f"No model folder at {path}; check the path (a Hub id looks like 'owner/name').")


def load_pipeline(
    model: str | os.PathLike | ModelSource | InstructCellPipeline,
    dtype: torch.dtype | str | None = None,
    device: str | int | None = None,
    trust_remote_code: bool = False,
    speed: SpeedOptions | None = None,
) -> InstructCellPipeline:
    """Build an :class:`InstructCellPipeline` for a model folder or Hub id (a pipeline is returned as is).

    Parameters
    ----------
    model : str, PathLike, ModelSource or InstructCellPipeline
    dtype : torch.dtype or {"bf16", "bfloat16", "fp32", "float32"}, optional
        ``bf16`` runs the language model in bfloat16 (cell encoder and VAE stay float32).
    device : str or int, optional
        ``"cpu"``, ``"cuda"``, ``0``...; default: the first GPU when there is one, else CPU.
    trust_remote_code : bool
        Load the folder's own code rather than this package's classes.
    speed : SpeedOptions, optional
        Threads, int8 linear layers, ``torch.compile`` (:mod:`.speed`); applied to a given pipeline too.

    Raises
    ------
    ValueError
        No model at that path, a folder that is not a model, a Hub id that cannot be loaded, an unknown dtype.
    """
    if isinstance(model, InstructCellPipeline):
        if speed is not None:
            apply_speed_options(model.model, speed)
        return model
    if isinstance(model, ModelSource):
        return model.load()
    from transformers import AutoModel, AutoProcessor

    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        dtype = _DTYPES[dtype.lower()]
    name = str(model)
    _check_model_location(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        loaded = AutoModel.from_pretrained(name, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as err:  # transformers' "not a local folder and not found on the Hub" is an OSError
        if Path(name).expanduser().is_dir():  # a model saved without its processor: say how to fix it
            check_processor_files(Path(name).expanduser())
        raise ValueError(f"Cannot load the model {name!r}: {err}") from err
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


def model_fingerprint(pipe: InstructCellPipeline) -> str:
    """SHA-1 over the model's weights and config and the processor's settings (gene vocabulary included).

    Two pipelines with the same fingerprint give the same answers: a resumed run checks it so that it never
    mixes the results of two models.
    """
    config = pipe.model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from does not change the answers
    digest = hashlib.sha1()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(pipe.processor.to_json_string().encode())
    for name, value in sorted(pipe.model.state_dict().items()):
        digest.update(name.encode())
        _hash_state(digest, value)
    return digest.hexdigest()


def _hash_state(digest, value) -> None:
    """Add one state-dict entry to ``digest``.

    A tensor adds its bytes (a quantized tensor its integers and scales), a tuple its parts (int8 linear
    layers store tuples, ``--int8``), anything else its repr.
    """
    if isinstance(value, (tuple, list)):
        for part in value:
            _hash_state(digest, part)
    elif isinstance(value, torch.Tensor):
        digest.update(str(value.dtype).encode())
        if value.is_quantized:
            per_channel = value.qscheme() in _PER_CHANNEL
            scales = value.q_per_channel_scales().tolist() if per_channel else value.q_scale()
            digest.update(repr(scales).encode())
            value = value.int_repr()
        digest.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    else:
        digest.update(repr(value).encode())
