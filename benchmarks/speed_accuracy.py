"""Accuracy cost of the CPU speed options on the demo's test split.

Loads a trained model folder once per option (``fp32``: none; ``int8``: dynamic int8 linear layers of the
language model; ``compile``: ``torch.compile`` of its encoder and decoder), predicts every CTA and DSP test
row of a built dataset folder by label scoring (``score_labels``, as the demo evaluates), and prints macro-F1
and accuracy per dataset, the agreement of each option's labels with fp32's, and the seconds the predictions
took (speed itself: ``benchmarks/roofline.py``).

Example::

    python -m instructcell train demo --max_steps 1100 --dataset_dir outputs/data --output_dir MODEL_DIR
    python benchmarks/speed_accuracy.py --model MODEL_DIR/final --dataset-dir outputs/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets_builder.dataset_folder import load_split  # noqa: E402
from instructcell.evaluation.candidates import model_predictions  # noqa: E402
from instructcell.evaluation.metrics import cell_classification_metrics  # noqa: E402
from instructcell.inference import SpeedOptions, load_pipeline  # noqa: E402

OPTIONS = {"fp32": SpeedOptions(), "int8": SpeedOptions(int8=True), "compile": SpeedOptions(compile=True)}
SETS = [
    ("cta", "bastidas_ponce_2019_pancreas"),
    ("cta", "kang2018_pbmc_ifnb_muscat"),
    ("cta", "zheng2017_sorted_pbmc"),
    ("dsp", "pc9_erlotinib_day11_dsp"),
]


def main(argv: list[str] | None = None) -> dict:
    """Predict the test rows under every option; print and write the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--dataset-dir", type=Path, required=True, help="built dataset folder (test.parquet)")
    parser.add_argument("--options", default="fp32,int8", help=f"comma-separated, from {sorted(OPTIONS)}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "speed_accuracy")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.options.split(",") if name.strip()]
    if "fp32" not in names or set(names) - set(OPTIONS):
        parser.error(f"--options must include fp32 and come from {sorted(OPTIONS)}, got {args.options!r}")
    if not (args.dataset_dir / "test.parquet").is_file():
        parser.error(f"{args.dataset_dir}/test.parquet not found: build it with examples/build_dataset.py")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = {
        key: load_split(args.dataset_dir, "test", tasks=[key[0]], variant="instruct", datasets_names=[key[1]])
        for key in SETS
    }
    results = {}
    for name in names:
        pipe = load_pipeline(args.model, device="cpu", speed=OPTIONS[name])
        start = time.perf_counter()
        with torch.inference_mode():
            predictions = {
                key: model_predictions(pipe.model, pipe.processor, table, batch_size=args.batch_size)
                for key, table in rows.items()
            }
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "predictions": predictions}
    report = {"model": str(args.model), "options": {}}
    lines = [
        "| option | task | dataset | cells | macro-F1 | accuracy | agreement with fp32 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        report["options"][name] = {"seconds": result["seconds"], "sets": {}}
        for key, table in rows.items():
            predicted = result["predictions"][key]
            metrics = cell_classification_metrics(
                predicted, table["label"], labels=sorted(table["choices"][0])
            )
            agreement = float(
                np.mean([a == b for a, b in zip(predicted, results["fp32"]["predictions"][key], strict=True)])
            )
            report["options"][name]["sets"]["/".join(key)] = {**metrics, "agreement_with_fp32": agreement}
            lines.append(
                f"| {name} | {key[0]} | {key[1]} | {len(table)} | {metrics['macro_f1']:.3f} | "
                f"{metrics['accuracy']:.3f} | {agreement:.3f} |"
            )
    lines.append("")
    lines += [f"{name}: {result['seconds']:.1f} s for all test rows" for name, result in results.items()]
    text = f"Model: `{args.model}`; test split of `{args.dataset_dir}`.\n\n" + "\n".join(lines) + "\n"
    print(text)
    args.output.with_suffix(".md").write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
