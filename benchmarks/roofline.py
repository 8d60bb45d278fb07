"""Inference and training speed against the matrix-multiply roofline of this machine.

For two model sizes, the ``small`` preset and a 20M-parameter original-format configuration (T5 d_model 256
with 4+4 layers, d_ff 1024, t5-base's 32,112-token vocabulary; a 2-layer Q-Former over 2,000 genes, 8 query
tokens, 2 key/value tokens; built from the original-format ``config.json`` of
``../shared/reference/original_tiny`` through ``InstructCellConfig.from_dict``), with random weights:

* the FLOPs of one annotation, counted from the config (:func:`annotation_flops`) and checked against
  ``torch.utils.flop_counter.FlopCounterMode`` on the same call;
* an sgemm probe (``torch.mm`` of two 2048x2048 float32 matrices) measured in this process right before
  every path, so each path's achieved GFLOP/s is divided by the probe's speed of the same moment;
* cells/s, GFLOP/s, fraction of the probe and peak RSS of each path: ``model.generate`` (batched, exactly
  ``--new-tokens`` tokens), ``model.score_labels``, the pipeline scoring (``generate=False``), answering
  (greedy, no probabilities) and answering with probabilities, ``instructcell annotate`` on an .h5ad file,
  and one cell per call (processor + ``generate``);
* thread count and batch size of the batched ``generate`` path, to choose defaults;
* training: examples/s and GFLOP/s of one optimizer step (CTA answers, AdamW) at ``--train-batch``.

Repeats are interleaved (every path once, then again) and medians are reported, with the load average and
the CPU share the process got (CPU time / (wall time x threads)): on a shared machine read the fractions.
Cells come from ``zheng2017_sorted_pbmc`` (2,000 most expressed genes, its 9 cell-type labels).

Example::

    python benchmarks/roofline.py                      # both sizes, about 10 minutes on 2 quiet cores
    python benchmarks/roofline.py --configs 20m --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anndata
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference_throughput import build_processor, reset_peak_rss, status_mb  # noqa: E402  (benchmarks/)

from instructcell import cli  # noqa: E402
from instructcell.tasks import CELL_TYPE_ANNOTATION  # noqa: E402
from instructcell.training import config_for_processor  # noqa: E402
from modeling_instructcell import (  # noqa: E402
    InstructCellConfig,
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import DEFAULT_BATCH_SIZE, TASK  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "zheng2017_sorted_pbmc" / "zheng2017_sorted_pbmc.h5ad"
ORIGINAL_CONFIG = ROOT.parent / "shared" / "reference" / "original_tiny" / "checkpoint" / "config.json"
RESULTS = ROOT / "benchmarks" / "results"
TEMPLATE = CELL_TYPE_ANNOTATION.default_instruction
PROBE_SIZE = 2048
# Reference figures of the original InstructCell code on this machine type, 20M configuration.
ORIGINAL = {"generate_batched_cells_per_s": 80.0, "one_cell_ms": 64.0, "train_steps_per_s_batch32": 1.05}


# ------------------------------------------------------------------------------------------------ models
def original_20m_config(processor: InstructCellProcessor) -> InstructCellConfig:
    """Write the 20M-parameter configuration in the original code's config format and translate it."""
    config = json.loads(ORIGINAL_CONFIG.read_text())
    ids = processor.special_token_ids
    config["base_model_config"].update(
        d_model=256,
        d_kv=64,
        d_ff=1024,
        num_heads=4,
        num_layers=4,
        num_decoder_layers=4,
        vocab_size=32112,
        special_tokens_index_dict={
            "start_tag": ids["cell_start_token_index"],
            "end_tag": ids["cell_end_token_index"],
            "placeholder": ids["cell_token_index"],
            "first_signal_token": ids["signal_token_index"],
        },
    )
    config["feature_encoder_config"].update(
        count_dim=processor.feature_extractor.vocab_size,
        num_query_tokens=8,
        num_hidden_layers=2,
        num_key_value_tokens=2,
    )
    config["feature_decoder_config"].update(n_latent=32, n_hidden=128, n_layers=2, condition_input_dim=64)
    return InstructCellConfig.from_dict(config)


def build_model(name: str, processor: InstructCellProcessor) -> InstructCellForConditionalGeneration:
    """Random-weight model of configuration ``name`` (``small`` or ``20m``), eval mode, frozen."""
    config = original_20m_config(processor) if name == "20m" else config_for_processor(name, processor)
    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(config).eval()
    return model.requires_grad_(False)


# ------------------------------------------------------------------------------------------------ FLOPs
def _attention_flops(queries: int, keys: int, width: int) -> int:
    """Scores and weighted values of one attention: ``2 x 2 x queries x keys x width``."""
    return 4 * queries * keys * width


def cell_encoder_flops(config: InstructCellConfig) -> int:
    """FLOPs of the cell MLP, the Q-Former and the projection for one cell."""
    q = config.qformer_config
    kv_width = config.num_kv_tokens * q.encoder_hidden_size
    queries, keys, hidden = config.num_query_tokens, config.num_kv_tokens, q.hidden_size
    flops = 2 * config.n_genes * kv_width + 2 * (config.cell_mlp_num_blocks - 1) * kv_width**2
    for layer in range(q.num_hidden_layers):
        flops += 2 * 4 * queries * hidden**2 + _attention_flops(queries, queries, hidden)
        if layer % q.cross_attention_frequency == 0:
            flops += 2 * 2 * queries * hidden**2 + 2 * 2 * keys * q.encoder_hidden_size * hidden
            flops += _attention_flops(queries, keys, hidden)
        flops += 2 * 2 * queries * hidden * q.intermediate_size
    if config.use_language_projection:
        flops += 2 * queries * hidden * config.text_config.hidden_size
    return flops


def _ffn_flops(text) -> int:
    matrices = 3 if text.is_gated_act else 2
    return 2 * matrices * text.d_model * text.d_ff


def encoder_flops(config: InstructCellConfig, prompt_length: int) -> int:
    """FLOPs of the T5 encoder over one prompt of ``prompt_length`` tokens."""
    text = config.text_config
    inner = text.num_heads * text.d_kv
    per_layer = prompt_length * (2 * 4 * text.d_model * inner + _ffn_flops(text))
    per_layer += _attention_flops(prompt_length, prompt_length, inner)
    return text.num_layers * per_layer


def decoder_flops(config: InstructCellConfig, positions: list[int], prompt_length: int, logits: int) -> int:
    """FLOPs of decoder tokens at ``positions`` (self-attention over ``position + 1`` keys), ``logits`` heads.

    The cross-attention keys and values of the prompt are counted separately (:func:`cross_kv_flops`).
    """
    text = config.text_config
    inner = text.num_heads * text.d_kv
    flops = 0
    for position in positions:
        per_layer = 2 * 6 * text.d_model * inner + _ffn_flops(text)
        per_layer += _attention_flops(1, position + 1, inner) + _attention_flops(1, prompt_length, inner)
        flops += text.num_decoder_layers * per_layer
    return flops + logits * 2 * text.d_model * text.vocab_size


def cross_kv_flops(config: InstructCellConfig, prompt_length: int) -> int:
    """FLOPs of the decoder's cross-attention keys and values of one prompt (once per decoding pass)."""
    text = config.text_config
    return text.num_decoder_layers * 2 * 2 * prompt_length * text.d_model * text.num_heads * text.d_kv


def annotation_flops(
    config: InstructCellConfig, prompt_length: int, new_tokens: int | None = None, candidates=None
) -> int:
    """FLOPs of one cell's annotation: greedy ``new_tokens`` tokens, or scoring ``candidates``.

    Parameters
    ----------
    config : InstructCellConfig
    prompt_length : int
        Prompt tokens, the ``num_query_tokens`` cell positions included.
    new_tokens : int, optional
        Greedy decoding: one decoder step per token (cached), one vocabulary projection per step.
    candidates : list of list of int, optional
        Label scoring as ``score_labels`` does it: the shared prefix once, then each bucket of equal
        length with its own cross-attention cache, one vocabulary projection per distinct prefix.
    """
    flops = cell_encoder_flops(config) + encoder_flops(config, prompt_length)
    if new_tokens is not None:
        return (
            flops
            + cross_kv_flops(config, prompt_length)
            + decoder_flops(config, list(range(new_tokens)), prompt_length, new_tokens)
        )
    shared = 0
    while shared < min(map(len, candidates)) - 1 and len({c[shared] for c in candidates}) == 1:
        shared += 1
    buckets = {len(c) - 1 - shared for c in candidates} - {0}
    positions = list(range(shared + 1))
    for candidate in candidates:
        positions += list(range(shared + 1, len(candidate)))
    prefixes = {tuple(c[:t]) for c in candidates for t in range(len(c))}
    flops += cross_kv_flops(config, prompt_length) * max(1, len(buckets))
    flops += decoder_flops(config, positions, prompt_length, len(prefixes))
    # Buckets after the first repeat the shared pass to fill their own cache.
    return flops + (max(1, len(buckets)) - 1) * decoder_flops(
        config, list(range(shared + 1)), prompt_length, 0
    )


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs ``FlopCounterMode`` sees in one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def probe_gflops() -> float:
    """float32 ``torch.mm`` of two 2048x2048 matrices: GFLOP/s now (median of 3)."""
    a = torch.randn(PROBE_SIZE, PROBE_SIZE)
    b = torch.randn(PROBE_SIZE, PROBE_SIZE)
    torch.mm(a, b)
    speeds = [2 * PROBE_SIZE**3 / timed(lambda: torch.mm(a, b))[0] / 1e9 for _ in range(3)]
    return statistics.median(speeds)


class Path_:
    """One measured path: a callable that processes ``cells`` cells, and its FLOPs per cell."""

    def __init__(self, name: str, cells: int, fn: Callable[[], object], flops_per_cell: float):
        self.name, self.cells, self.fn, self.flops_per_cell = name, cells, fn, flops_per_cell
        self.runs: list[dict] = []

    def run(self, threads: int) -> None:
        """Time one call next to a probe measured just before it."""
        probe = probe_gflops()
        reset = reset_peak_rss()
        wall, cpu = timed(self.fn)
        gflops = self.cells * self.flops_per_cell / wall / 1e9
        self.runs.append(
            {
                "cells_per_s": self.cells / wall,
                "gflops": gflops,
                "probe_gflops": probe,
                "fraction": gflops / probe,
                "cpu_share": cpu / (wall * threads),
                "peak_rss_mb": status_mb() if reset else float("nan"),
            }
        )

    def summary(self) -> dict:
        """Medians over the runs."""
        keys = self.runs[0].keys()
        row = {key: statistics.median(run[key] for run in self.runs) for key in keys}
        row["peak_rss_mb"] = max(run["peak_rss_mb"] for run in self.runs)
        return {"path": self.name, "gflop_per_cell": self.flops_per_cell / 1e9, "runs": len(self.runs), **row}


# ------------------------------------------------------------------------------------------------ paths
def inference_paths(model, processor, adata, labels, args, work: Path) -> tuple[list[Path_], dict]:
    """Return the measured annotation paths of one model and the FLOP check."""
    extractor = processor.feature_extractor
    alignment = extractor.align_genes([str(g) for g in adata.var_names])
    values = extractor(adata.X, alignment=alignment, return_tensors="np")["cell_values"]
    n, batch = adata.n_obs, args.batch_size
    candidates = processor.tokenizer(labels, padding=True, return_tensors="pt")
    candidate_lists = [ids[mask.bool()].tolist() for ids, mask in zip(*candidates.values(), strict=True)]
    # Random weights would stop at EOS at random steps: no EOS, so every answer has exactly `new_tokens`.
    fixed_length = {"max_new_tokens": args.new_tokens, "eos_token_id": None}
    pipe = InstructCellPipeline(model=model, processor=processor, task=TASK, device=-1)

    def batched(call):
        def run():
            with torch.inference_mode():
                for start in range(0, n, batch):
                    inputs = processor(text=TEMPLATE, cells=values[start : start + batch])
                    call(inputs)

        return run

    generate = batched(lambda inputs: model.generate(**inputs, **fixed_length))
    score = batched(lambda inputs: model.score_labels(**inputs, candidate_ids=candidates["input_ids"]))
    example = processor(text=TEMPLATE, cells=values[:batch])
    prompt_length = int(example["attention_mask"][0].sum())
    flops = {
        "generate": annotation_flops(model.config, prompt_length, new_tokens=args.new_tokens),
        "score": annotation_flops(model.config, prompt_length, candidates=candidate_lists),
    }
    with torch.inference_mode():
        counted = {
            "generate": counted_flops(lambda: model.generate(**example, **fixed_length)) / batch,
            "score": counted_flops(
                lambda: model.score_labels(**example, candidate_ids=candidates["input_ids"])
            )
            / batch,
        }
    check = {
        key: {"config": flops[key], "flop_counter": counted[key], "ratio": flops[key] / counted[key]}
        for key in flops
    }
    path = work / "cells.h5ad"
    adata.write_h5ad(path)
    folder = work / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    def cli_annotate():
        status = cli.main(
            [
                "annotate",
                str(folder),
                str(path),
                "-o",
                str(work / "annotated.h5ad"),
                "--overwrite",  # the same scratch output in every repeat
                "--labels",
                ",".join(labels),
                "--batch-size",
                str(batch),
                "--quiet",
            ],
            stdout=open(os.devnull, "w"),  # noqa: SIM115 - the CLI prints label counts
        )
        if status:
            raise RuntimeError(f"instructcell annotate exited with {status}")

    one = n if args.single_cells <= 0 else min(args.single_cells, n)

    def one_cell_at_a_time():
        with torch.inference_mode():
            for i in range(one):
                model.generate(**processor(text=TEMPLATE, cells=values[i : i + 1]), **fixed_length)

    paths = [
        Path_("model.generate, batched", n, generate, flops["generate"]),
        Path_("model.score_labels, batched", n, score, flops["score"]),
        Path_(
            "pipeline, score (generate=False)",
            n,
            lambda: pipe(TEMPLATE, cells=values, labels=labels, generate=False, batch_size=batch),
            flops["score"],
        ),
        Path_(
            "pipeline, greedy answers without probabilities",
            n,
            lambda: pipe(
                TEMPLATE,
                cells=values,
                labels=labels,
                return_probabilities=False,
                batch_size=batch,
                max_new_tokens=args.new_tokens,
                generate_kwargs={"eos_token_id": None},
            ),
            flops["generate"],
        ),
        Path_(
            "pipeline, greedy answers with probabilities",
            n,
            lambda: pipe(
                TEMPLATE,
                cells=values,
                labels=labels,
                batch_size=batch,
                max_new_tokens=args.new_tokens,
                generate_kwargs={"eos_token_id": None},
            ),
            flops["score"]
            + flops["generate"]
            - cell_encoder_flops(model.config)
            - encoder_flops(model.config, prompt_length),
        ),
        Path_("CLI annotate (score) on an .h5ad file", n, cli_annotate, flops["score"]),
        Path_("model.generate, 1 cell per call", one, one_cell_at_a_time, flops["generate"]),
    ]
    return paths, {"prompt_length": prompt_length, "flop_check": check}


def training_path(model, processor, adata, labels, args) -> Path_:
    """One AdamW step on CTA answers at ``--train-batch`` (cell encoder and language model trained)."""
    model.requires_grad_(True).train()
    extractor = processor.feature_extractor
    alignment = extractor.align_genes([str(g) for g in adata.var_names])
    rows = np.arange(args.train_batch) % adata.n_obs
    values = extractor(adata.X[rows], alignment=alignment, return_tensors="np")["cell_values"]
    answers = [str(label) for label in adata.obs[args.label_column].astype(str).to_numpy()[rows]]
    batch = processor(text=TEMPLATE, cells=values, text_target=answers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state allocated
    flops = counted_flops(step)
    return Path_(f"training step, batch {args.train_batch}", args.train_batch, step, flops / args.train_batch)


# ------------------------------------------------------------------------------------------------ report
def _fmt(row: dict) -> str:
    return (
        f"| {row['config']} | {row['path']} | {row['threads']} | {row['cells_per_s']:.1f} | "
        f"{row['gflop_per_cell']:.3f} | {row['gflops']:.1f} | {row['probe_gflops']:.1f} | "
        f"{row['fraction']:.2f} | {row['cpu_share']:.2f} | {row['peak_rss_mb']:.0f} |"
    )


def render(result: dict) -> str:
    """Markdown report of a :func:`main` result."""
    lines = [
        "# Roofline: inference and training speed against an sgemm probe",
        "",
        f"`{result['command']}`; torch {result['torch']}, {result['cpu']} ({result['cores']} cores); "
        f"load average before {result['loadavg_before']}, after {result['loadavg_after']}; "
        f"{result['cells']} cells, batch {result['batch_size']}, {result['new_tokens']} generated tokens, "
        f"{result['n_labels']} labels; medians of {result['repeats']} interleaved runs.",
        "",
        "cells/s for training = examples/s. fraction = achieved GFLOP/s / the sgemm probe's GFLOP/s "
        "measured just before. CPU share = CPU time / (wall time x threads): below 1 the process waited "
        "for the cores.",
        "",
        "| config | path | threads | cells/s | GFLOP/cell | GFLOP/s | probe GFLOP/s | fraction | CPU share "
        "| peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_fmt(row) for row in result["rows"]]
    lines += [
        "",
        "| config | parameters | prompt tokens | path | GFLOP/cell from the config | FlopCounterMode "
        "| ratio |",
    ]
    lines += ["|---|---:|---:|---|---:|---:|---:|"]
    for name, info in result["configs"].items():
        for path, check in info["flop_check"].items():
            lines.append(
                f"| {name} | {info['parameters'] / 1e6:.1f}M | {info['prompt_length']} | {path} | "
                f"{check['config'] / 1e9:.3f} | {check['flop_counter'] / 1e9:.3f} | {check['ratio']:.3f} |"
            )
    if result.get("sweep"):
        lines += ["", "Batched `model.generate` by threads and batch size:", ""]
        lines += [
            "| config | threads | batch | cells/s | fraction | CPU share |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['config']} | {r['threads']} | {r['batch']} | {r['cells_per_s']:.1f} | "
            f"{r['fraction']:.2f} | {r['cpu_share']:.2f} |"
            for r in result["sweep"]
        ]
    lines += ["", f"Original code, 20M configuration, same machine type: {json.dumps(ORIGINAL)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, measure every path of every configuration, print and write the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="small,20m", help="comma-separated: small, 20m (default: both)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=".h5ad with raw counts")
    parser.add_argument("--label-column", default="cell_type")
    parser.add_argument("--cells", type=int, default=256, help="cells per batched run")
    parser.add_argument("--single-cells", type=int, default=32, help="cells of the one-cell-per-call path")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="the package default")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of every path")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument(
        "--sweep", default="1,2:16,64,128,256", help="THREADS:BATCHES of the generate sweep; '' skips"
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS / "roofline", help="writes OUTPUT.md and .json"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = set(names) - {"small", "20m"}
    if unknown or not names:
        parser.error(f"--configs takes small and/or 20m, got {args.configs!r}")
    if not args.data.is_file():
        parser.error(f"{args.data} not found: pass --data with an .h5ad of raw counts")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []

    full = anndata.read_h5ad(args.data)
    labels = [str(c) for c in full.obs[args.label_column].astype("category").cat.categories]
    rows = np.sort(
        np.random.default_rng(0).choice(full.n_obs, size=min(args.cells, full.n_obs), replace=False)
    )
    adata = full[rows].copy()
    processor = build_processor(full, labels, n_genes=2000, vocab_size=2000)
    result = {
        "command": "python benchmarks/roofline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "unknown",
        )
        if Path("/proc/cpuinfo").exists()
        else "unknown",
        "cores": os.cpu_count(),
        "loadavg_before": " ".join(loadavg_before),
        "cells": adata.n_obs,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "n_labels": len(labels),
        "repeats": args.repeats,
        "configs": {},
        "rows": [],
        "sweep": [],
        "original": ORIGINAL,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model = build_model(name, processor)
            work = Path(tmp) / name
            work.mkdir()
            paths, info = inference_paths(model, processor, adata, labels, args, work)
            info["parameters"] = sum(p.numel() for p in model.parameters())
            paths.append(training_path(build_model(name, processor), processor, adata, labels, args))
            result["configs"][name] = info
            for path in paths:  # warm-up: first-call allocations, lazy imports
                path.fn()
            for _ in range(args.repeats):
                for path in paths:
                    path.run(threads)
            for path in paths:
                row = {"config": name, "threads": threads, **path.summary()}
                result["rows"].append(row)
                print(_fmt(row), flush=True)
            if args.sweep:
                thread_list, batch_list = args.sweep.split(":")
                result["sweep"] += sweep(model, processor, adata, args, name, thread_list, batch_list)
                torch.set_num_threads(threads)
    result["loadavg_after"] = (
        " ".join(Path("/proc/loadavg").read_text().split()[:3]) if loadavg_before else ""
    )
    report = render(result)
    print(report)
    args.output.with_suffix(".md").write_text(report)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def sweep(model, processor, adata, args, name: str, thread_list: str, batch_list: str) -> list[dict]:
    """Batched ``generate`` at every (threads, batch size): medians of ``--repeats`` interleaved runs."""
    extractor = processor.feature_extractor
    alignment = extractor.align_genes([str(g) for g in adata.var_names])
    values = extractor(adata.X, alignment=alignment, return_tensors="np")["cell_values"]
    prompt_length = int(processor(text=TEMPLATE, cells=values[:1])["attention_mask"].sum())
    flops = annotation_flops(model.config, prompt_length, new_tokens=args.new_tokens)
    settings = [(int(t), int(b)) for t in thread_list.split(",") for b in batch_list.split(",")]
    paths = {}
    for n_threads, batch in settings:

        def run(batch=batch):
            with torch.inference_mode():
                for start in range(0, len(values), batch):
                    inputs = processor(text=TEMPLATE, cells=values[start : start + batch])
                    model.generate(**inputs, max_new_tokens=args.new_tokens, eos_token_id=None)

        paths[(n_threads, batch)] = Path_("generate", len(values), run, flops)
    for _ in range(args.repeats):
        for (n_threads, _batch), path in paths.items():
            torch.set_num_threads(n_threads)
            path.run(n_threads)
    rows = []
    for (n_threads, batch), path in paths.items():
        summary = path.summary()
        rows.append({"config": name, "threads": n_threads, "batch": batch, **summary})
    return rows


if __name__ == "__main__":
    main()
