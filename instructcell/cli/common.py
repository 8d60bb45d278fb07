"""What the sub-commands share: the model arguments, the label-set flags and loading the pipeline."""

from __future__ import annotations

import argparse

import anndata

from instructcell import inference


def label_set(args, adata: anndata.AnnData | None = None) -> list[str] | None:
    """The label set of ``--labels`` or ``--labels-from-obs COLUMN`` (None when neither is given)."""
    if getattr(args, "labels", None):
        return [label.strip() for label in args.labels.split(",") if label.strip()]
    column = getattr(args, "labels_from_obs", None)
    if column:
        if adata is None:
            adata = anndata.read_h5ad(args.input, backed="r")
        if column not in adata.obs.columns:
            raise SystemExit(f"error: obs has no column {column!r}; columns: {list(adata.obs.columns)}")
        values = adata.obs[column]
        return [
            str(v)
            for v in (values.cat.categories if hasattr(values, "cat") else sorted(set(values.astype(str))))
        ]
    return None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the positional model and the loading / batching flags."""
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="bf16: language model in bfloat16"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, 0, ... (default: GPU if available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="use the model folder's own code")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per model call")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="CPU: int8 dynamic quantization of the language model's linear layers",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the language model (slow first calls)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_pipeline(args):
    """The pipeline of ``args.model`` with the dtype, device and remote-code flags."""
    speed = inference.SpeedOptions(threads=args.threads, int8=args.int8, compile=args.compile)
    return inference.load_pipeline(
        args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        speed=speed,
    )


def generation_kwargs(args) -> dict:
    """``max_new_tokens`` when the flag was given."""
    return {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
