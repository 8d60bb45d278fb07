"""What the sub-commands share: the model arguments, number and label-set flags, and the model source."""

from __future__ import annotations

import argparse

import anndata

from instructcell.inference import ModelSource, SpeedOptions
from modeling_instructcell.pipeline_instructcell import DEFAULT_BATCH_SIZE


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1 (an argparse type: argparse reports anything else, status 2)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """Parse a whole number of at least 0 (an argparse type)."""
    return _whole_number(text, 0)


def parse_labels(text: str) -> list[str]:
    """``"B cells, T cells"`` -> ``["B cells", "T cells"]``; refuses empty entries and repeated labels."""
    labels = [label.strip() for label in text.split(",")]
    if any(not label for label in labels):
        raise ValueError(f"--labels has an empty entry in {text!r}; separate labels with single commas.")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--labels repeats {repeated}; give each label once.")
    if len(labels) < 2:
        raise ValueError(f"--labels needs at least two labels separated by commas, got {text!r}.")
    return labels


def obs_label_set(adata: anndata.AnnData, column: str) -> list[str]:
    """Return the label set of an obs column: its categories, or its sorted distinct values (no missing)."""
    if column not in adata.obs.columns:
        raise ValueError(f"obs has no column {column!r}; its columns are {list(adata.obs.columns)}.")
    values = adata.obs[column]
    if hasattr(values, "cat"):
        return [str(v) for v in values.cat.categories]
    return sorted({str(v) for v in values.dropna()})


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the positional model and the loading / batching flags."""
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="bf16: language model in bfloat16"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, 0, ... (default: GPU if available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="use the model folder's own code")
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="prompts per model call"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per process (default: one per core, or cores / workers); 1 is often faster on a "
        "busy machine",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="CPU: int8 dynamic quantization of the language model's linear layers",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the language model (slow first calls)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def model_source(args) -> ModelSource:
    """Describe the model of ``args``: dtype, device, remote-code and speed flags (loaded when needed)."""
    device = int(args.device) if args.device is not None and args.device.isdigit() else args.device
    speed = SpeedOptions(threads=args.threads, int8=args.int8, compile=args.compile)
    return ModelSource(
        args.model, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code, speed=speed
    )


def generation_kwargs(args) -> dict:
    """``max_new_tokens`` when the flag was given."""
    return {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
