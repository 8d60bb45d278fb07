"""Inference throughput and memory: batched annotation vs one-cell-at-a-time generate, same model.

Builds an (untrained, speed only) model of a preset whose gene vocabulary is the ``--n-genes`` most expressed
genes of a real .h5ad and whose tokenizer is trained offline on the template bank, then measures on the
first ``--n-cells`` cells:

* ``annotate (score)``: :func:`instructcell.inference.annotate` with the label set: one encoder and one
  batched decoder pass per batch, no generation;
* ``annotate (greedy answers)``: ``method="generate", return_probabilities=False``: batched greedy answers
  parsed with ``extract_label``, no label distribution;
* ``pipeline (greedy + score)``: batched greedy answers plus the label distribution (gives the arg-max vs
  greedy agreement);
* ``generate 1 cell at a time``: processor + ``model.generate`` + ``extract_label`` per cell with
  ``max_new_tokens`` = the longest label in tokens (what a trained model needs to answer).

cells/s (untraced run) and peak memory (the process's peak RSS during the mode's runs, the tracemalloc peak
of Python/numpy allocations in a second run of the block, and the process's max RSS after it) are printed as
a table (``benchmarks/run_benchmarks.py`` calls :func:`compare_modes` on a trained model).
``--memory-cells`` then annotates .h5ad files of ~2k and ``--memory-cells`` cells (the dataset concatenated
with itself) file-to-file in chunks, each in a fresh subprocess, and prints their peak RSS: flat memory means
the two agree.

Example::

    python benchmarks/inference_throughput.py --preset small
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import anndata
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets_builder.templates import TemplateBank  # noqa: E402
from instructcell import inference  # noqa: E402
from instructcell.tasks import CELL_TYPE_ANNOTATION  # noqa: E402
from instructcell.training import config_for_processor, train_instruction_tokenizer  # noqa: E402
from modeling_instructcell import (  # noqa: E402
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.answer_extraction import extract_label  # noqa: E402
from modeling_instructcell.pipeline_instructcell import TASK  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "zheng2017_sorted_pbmc"


def _h5ad(path: Path) -> Path:
    return path / f"{path.name}.h5ad" if path.is_dir() else path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mb(field: str = "VmHWM") -> float:
    """Peak (``VmHWM``) or current (``VmRSS``) resident memory of this process in MB (Linux; else NaN)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return float("nan")
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_processor(
    adata: anndata.AnnData, labels: list[str], n_genes: int, vocab_size: int
) -> InstructCellProcessor:
    """Build a processor over the ``n_genes`` most expressed genes, tokenizer trained on the template bank."""
    totals = np.asarray(adata.X.sum(0)).ravel()
    genes = [str(g) for g in adata.var_names[np.sort(np.argsort(-totals)[:n_genes])]]
    bank = TemplateBank.load()
    corpus = [t.instruction for t in bank.templates] + [t.response for t in bank.templates] + labels
    tokenizer = train_instruction_tokenizer(corpus, vocab_size=vocab_size)
    return InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=genes), tokenizer, num_query_tokens=8
    )


def build(args, adata: anndata.AnnData, labels: list[str]) -> InstructCellPipeline:
    """Return the annotation pipeline of ``args.model`` (or a random small model) for ``labels``."""
    processor = build_processor(adata, labels, args.n_genes, args.vocab_size)
    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(config_for_processor(args.preset, processor)).eval()
    if args.dtype == "bf16":
        model.language_model.to(torch.bfloat16)
        model.language_projection.to(torch.bfloat16)
    return InstructCellPipeline(model=model, processor=processor, task=TASK, device=-1)


def measure(name: str, n_cells: int, fn, repeats: int = 2) -> dict:
    """Time ``fn`` (best of ``repeats`` untraced runs), then run it once under tracemalloc.

    ``py_peak_mb`` is the tracemalloc peak of Python/numpy allocations.
    ``peak_rss_mb`` is the process's peak resident memory during these runs (the kernel's counter is reset
    first, Linux; NaN elsewhere): unlike tracemalloc it includes torch's tensors. ``rss_before_mb`` is the
    resident memory before them (model, data): the difference is what the mode itself needs.
    """
    before = status_mb("VmRSS")
    reset = reset_peak_rss()
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "mode": name,
        "cells": n_cells,
        "seconds": seconds,
        "cells_per_s": n_cells / seconds,
        "py_peak_mb": peak / 2**20,
        "rss_before_mb": before,
        "peak_rss_mb": status_mb() if reset else float("nan"),
        "max_rss_mb": _rss_mb(),
    }


def one_at_a_time(pipe, adata, labels, max_new_tokens):
    """Annotate cell by cell: processor + ``generate`` (exactly ``max_new_tokens``) + ``extract_label``."""
    processor, model = pipe.processor, pipe.model
    extractor = processor.feature_extractor
    alignment = extractor.align_genes([str(g) for g in adata.var_names])
    answers = []
    with torch.inference_mode():
        for i in range(adata.n_obs):
            values = extractor(adata.X[i : i + 1], alignment=alignment, return_tensors="np")["cell_values"]
            batch = processor(text=CELL_TYPE_ANNOTATION.default_instruction, cells=values)
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
            text = processor.post_process_generation(ids)[0]["text"]
            answers.append(extract_label(text, labels))
    return {}


MODES = ("score", "greedy", "greedy+score", "single")


def label_token_length(pipe: InstructCellPipeline, labels: list[str]) -> int:
    """Median label length in tokens (EOS included): the answer length a trained model writes.

    The generating modes are forced to write exactly that many tokens (``min_new_tokens``), so an untrained
    model, which would stop at once, and a trained one are timed on answers of the same length.
    """
    return int(np.median([len(pipe.processor.tokenizer(label)["input_ids"]) for label in labels]))


def compare_modes(
    pipe: InstructCellPipeline,
    adata: anndata.AnnData,
    labels: list[str],
    batch_size: int,
    n_single: int,
    label_tokens: int,
    modes: tuple[str, ...] = MODES,
) -> tuple[list[dict], dict]:
    """Time batched annotation against one-cell-at-a-time generation on the same cells and model.

    Parameters
    ----------
    pipe : InstructCellPipeline
    adata : anndata.AnnData
        Raw counts; the batched modes annotate all of its cells.
    labels : list of str
        The label set.
    batch_size : int
        Prompts per model call in the batched modes.
    n_single : int
        Cells of the one-at-a-time mode (its first cells).
    label_tokens : int
        Answer length of the generating modes (:func:`label_token_length`).
    modes : tuple of str
        Any of ``score`` (batched label scoring), ``greedy`` (batched greedy answers, no probabilities),
        ``greedy+score`` (pipeline: both), ``single`` (processor + ``generate`` per cell), in this order.

    Returns
    -------
    rows : list of dict
        :func:`measure` results, one per mode.
    agreement : dict
        :func:`instructcell.inference.argmax_agreement` of the ``greedy+score`` mode (empty without it).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown modes {sorted(unknown)}; choose from {MODES}.")
    # Warm-up at the measured batch size (first-call allocations, lazy imports).
    inference.annotate(pipe, adata[:batch_size].copy(), labels=labels, progress=False, batch_size=batch_size)
    rows, agreement = [], {}
    if "score" in modes:
        rows.append(
            measure(
                "annotate (score, batched)",
                adata.n_obs,
                lambda: (
                    inference.annotate(
                        pipe, adata.copy(), labels=labels, batch_size=batch_size, progress=False
                    )
                    and None
                ),
            )
        )
    if "greedy" in modes:
        rows.append(
            measure(
                "annotate (greedy answers, batched, no probabilities)",
                adata.n_obs,
                lambda: inference.annotate(
                    pipe,
                    adata.copy(),
                    labels=labels,
                    method="generate",
                    batch_size=batch_size,
                    progress=False,
                    return_probabilities=False,
                    max_new_tokens=label_tokens,
                    generate_kwargs={"min_new_tokens": label_tokens},
                ),
            )
        )
    if "greedy+score" in modes:

        def greedy_and_score():
            results = pipe(
                CELL_TYPE_ANNOTATION.default_instruction,
                cells=adata,
                labels=labels,
                batch_size=batch_size,
                max_new_tokens=label_tokens,
                generate_kwargs={"min_new_tokens": label_tokens},
            )
            agreement.update(inference.argmax_agreement(results))

        rows.append(measure("pipeline (greedy + score, batched)", adata.n_obs, greedy_and_score))
    if "single" in modes:
        single = adata[:n_single].copy()
        rows.append(
            measure(
                "generate, 1 cell at a time",
                single.n_obs,
                lambda: one_at_a_time(pipe, single, labels, label_tokens),
            )
        )
    return rows, agreement


def throughput_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_modes` rows; speed-ups relative to the last row."""
    base = rows[-1]["cells_per_s"]
    lines = [
        "| mode | cells | s | cells/s | x vs last row | RSS before MB | peak RSS MB "
        "| py peak MB (tracemalloc) | max RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['cells']} | {r['seconds']:.2f} | {r['cells_per_s']:.1f} | "
            f"{r['cells_per_s'] / base:.1f} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['py_peak_mb']:.1f} | "
            f"{r['max_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def memory_child(args) -> None:
    """Measure one mode's peak memory in this (child) process and print it as JSON."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(args.model_dir).eval()
    processor = AutoProcessor.from_pretrained(args.model_dir)
    pipe = InstructCellPipeline(model=model, processor=processor, task=TASK, device=-1)
    labels = json.loads((Path(args.model_dir) / "labels.json").read_text())
    base = _rss_mb()
    reset = reset_peak_rss()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        inference.annotate(
            pipe,
            args.memory_child,
            labels=labels,
            output=Path(tmp) / "out.h5ad",
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            progress=False,
        )
    n = anndata.read_h5ad(args.memory_child, backed="r").n_obs
    print(
        json.dumps(
            {
                "cells": n,
                "seconds": time.perf_counter() - start,
                "rss_after_load_mb": base,
                "peak_rss_mb": _rss_mb(),
                "annotate_peak_rss_mb": status_mb() if reset else float("nan"),
            }
        )
    )


def main() -> None:
    """Parse the arguments, run the modes and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=".h5ad file or dataset folder")
    parser.add_argument("--label-column", default="cell_type")
    parser.add_argument("--n-genes", type=int, default=2000, help="gene vocabulary: most expressed genes")
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary")
    parser.add_argument("--n-cells", type=int, default=512, help="cells for the batched modes")
    parser.add_argument("--n-single", type=int, default=64, help="cells for the one-at-a-time mode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory-cells", type=int, default=10000, help="0 skips the flat-memory check")
    parser.add_argument("--skip-throughput", action="store_true", help="only the flat-memory check")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    path = _h5ad(args.data)
    full = anndata.read_h5ad(path)
    labels = [str(c) for c in full.obs[args.label_column].astype("category").cat.categories]
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(full.n_obs, size=min(args.n_cells, full.n_obs), replace=False))
    adata = full[rows].copy()
    pipe = build(args, full, labels)
    n_params = sum(p.numel() for p in pipe.model.parameters())
    label_tokens = label_token_length(pipe, labels)
    print(
        f"# {path.name}: {full.n_obs} cells x {full.n_vars} genes; {len(labels)} labels; "
        f"preset {args.preset} "
        f"({n_params / 1e6:.1f}M params, {args.n_genes} genes, dtype {args.dtype}); torch threads "
        f"{torch.get_num_threads()}; generated answers: {label_tokens} tokens (median label length)"
    )

    if not args.skip_throughput:
        rows_out, agreement = compare_modes(pipe, adata, labels, args.batch_size, args.n_single, label_tokens)
        print()
        print(throughput_table(rows_out))
        print()
        print(
            f"arg-max of the label distribution == label parsed from the greedy answer: "
            f"{agreement['agreement']:.1%} of {int(agreement['n'])} cells (greedy answer names a label for "
            f"{agreement['answered']:.1%}; agreement among those {agreement['agreement_answered']:.1%}). "
            "Untrained model: read this as a check of the metric, not of the model."
        )

    if args.memory_cells:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            pipe.model.save_pretrained(tmp / "model")
            pipe.processor.save_pretrained(tmp / "model")
            (tmp / "model" / "labels.json").write_text(json.dumps(labels))
            copies = -(-args.memory_cells // full.n_obs)
            big = anndata.concat([full] * copies, index_unique="-")[: args.memory_cells].copy()
            small_path, big_path = tmp / "small.h5ad", tmp / "big.h5ad"
            full.write_h5ad(small_path)
            big.write_h5ad(big_path)
            del big
            print()
            print(
                f"| flat-memory check: file-to-file annotate, chunk {args.chunk_size}, fresh process "
                f"| cells | "
                "s | cells/s | process peak RSS MB | peak RSS during annotate MB | peak RSS before MB |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for name, file in (("dataset", small_path), (f"dataset x{copies}", big_path)):
                run = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-child",
                        str(file),
                        "--model-dir",
                        str(tmp / "model"),
                        "--chunk-size",
                        str(args.chunk_size),
                        "--batch-size",
                        str(args.batch_size),
                    ]
                    + (["--threads", str(args.threads)] if args.threads else []),
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(run.stdout.strip().splitlines()[-1])
                print(
                    f"| {name} | {r['cells']} | {r['seconds']:.1f} | {r['cells'] / r['seconds']:.1f} | "
                    f"{r['peak_rss_mb']:.0f} | {r['annotate_peak_rss_mb']:.0f} | "
                    f"{r['rss_after_load_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()
