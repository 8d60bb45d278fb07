"""CPU speed options for inference: thread count, dynamic int8 linear layers, ``torch.compile``.

Every option is off by default; ``docs/speed.md`` gives each one's measured speed and its accuracy change on
the demo's test split. The cell encoder and the VAE always stay float32 (their inputs are count vectors whose
scale spans orders of magnitude); the options change the language model, where the work is. bfloat16 is
chosen at loading (``load_pipeline(dtype="bf16")``); :func:`bf16_is_fast` says whether it pays off here.

ONNX Runtime through ``optimum`` is not offered: ``optimum-onnx`` (0.1.0, the release that carries the ONNX
export) requires ``transformers<4.58``, and installing it would replace this package's ``transformers`` 5.x.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from modeling_instructcell import InstructCellForConditionalGeneration

__all__ = ["SpeedOptions", "apply_speed_options", "bf16_is_fast"]


@dataclass(frozen=True)
class SpeedOptions:
    """Inference speed settings of a loaded model.

    Attributes
    ----------
    threads : int, optional
        ``torch.set_num_threads`` for the process (default: torch's choice, one per core).
    int8 : bool
        Dynamic int8 quantization of the language model's ``nn.Linear`` layers (weights int8, activations
        quantized per batch): ``torch.ao.quantization.quantize_dynamic``. CPU only.
    compile : bool
        ``torch.compile`` the language model's encoder and decoder stacks (dynamic shapes). The first calls
        of each new shape compile (minutes on a CPU); worth it for long runs only.
    """

    threads: int | None = None
    int8: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}.")


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix multiplies run natively on ``device`` (CUDA, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def apply_speed_options(
    model: InstructCellForConditionalGeneration, options: SpeedOptions
) -> InstructCellForConditionalGeneration:
    """Apply ``options`` to an inference model (in place) and return it.

    Parameters
    ----------
    model : InstructCellForConditionalGeneration
        In eval mode; with ``int8`` it must be on the CPU.
    options : SpeedOptions

    Returns
    -------
    InstructCellForConditionalGeneration
        The same object, no longer trainable when ``int8`` or ``compile`` is set.
    """
    if model.training:
        raise ValueError("Speed options are for inference: call model.eval() first.")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.int8:
        if model.device.type != "cpu":
            raise ValueError(f"int8 dynamic quantization runs on the CPU; the model is on {model.device}.")
        if model.language_model.dtype != torch.float32:
            raise ValueError(
                "int8 dynamic quantization starts from float32 weights: load without dtype=bf16."
            )
        with warnings.catch_warnings():  # torch marks eager-mode quantization deprecated in favour of torchao
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.ao.quantization.quantize_dynamic(
                model.language_model, {nn.Linear}, dtype=torch.qint8, inplace=True
            )
    if options.compile:
        language_model = model.language_model
        for stack in (language_model.get_encoder(), language_model.get_decoder()):
            stack.forward = torch.compile(stack.forward, dynamic=True)
    return model
