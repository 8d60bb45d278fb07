"""A short end-to-end InstructCell run on real data, on CPU (`make demo`).

    python examples/demo.py --data-dir ../shared/datasets --output-dir outputs/demo --train-minutes 5

1. Builds the instruct-variant multi-task dataset (CTA, DSP, CPCG) with ``examples/build_dataset.py``.
2. Trains an offline tokenizer on the training instructions and the ``small`` preset with the HF Trainer
   for a fixed wall-clock budget.
3. Saves the model in the Hub layout (safetensors, processor, remote code).
4. Answers three natural-language requests on held-out test cells (annotate, predict a drug response,
   generate cells of a requested type) and writes ``report.md`` and ``metrics.json`` with test accuracies.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from datasets_builder import read_gene_vocab
from datasets_builder.collator import DataCollatorForInstructCell
from instructcell.hub import save_for_hub
from instructcell.presets import config_for_processor
from instructcell.tokenization import train_instruction_tokenizer
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

REPO = Path(__file__).resolve().parents[1]


class WallClockLimit(TrainerCallback):
    """Stop training once ``seconds`` of wall time have passed."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True
        return control


def build_data(data_dir: Path, output: Path) -> Path:
    if not (output / "train.parquet").exists():
        subprocess.run(
            [sys.executable, str(REPO / "examples" / "build_dataset.py"), "--data-dir", str(data_dir),
             "--output", str(output), "--variant", "instruct", "--n-top-genes", "1000", "--overwrite"],
            check=True,
        )
    return output


def greedy_answers(model, processor, rows, batch_size: int = 32) -> list[dict]:
    collator = DataCollatorForInstructCell(processor)
    answers = []
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        sequences = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            cell_values=batch.get("cell_values"), max_new_tokens=24,
        )
        answers.extend(processor.post_process_generation(sequences))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument("--eval-examples", type=int, default=200, help="Test examples per task and dataset.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data_dir.is_dir():
        raise SystemExit(f"No data at {args.data_dir}: pass --data-dir with the shared datasets folder.")
    start = time.time()
    torch.manual_seed(args.seed)
    out = args.output_dir
    data_path = build_data(args.data_dir, out / "data")
    splits = datasets.load_dataset(
        "parquet", data_files={s: str(data_path / f"{s}.parquet") for s in ("train", "test")}
    )
    train = splits["train"].shuffle(seed=args.seed)

    genes = read_gene_vocab(data_path / "gene_vocab.txt")
    corpus = list(train["instruction"]) + list(train["response"])
    tokenizer = train_instruction_tokenizer(corpus, vocab_size=2000)
    processor = InstructCellProcessor(InstructCellFeatureExtractor(gene_names=genes), tokenizer)
    model = InstructCellForConditionalGeneration(config_for_processor("small", processor))
    targets = [row for row in train.select(range(min(2000, len(train)))) if row["target_gene_indices"]]
    collator = DataCollatorForInstructCell(processor)
    model.cell_vae.set_library_prior(collator(targets)["target_cell_values"])

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out / "checkpoints"), per_device_train_batch_size=32, learning_rate=1e-3,
            warmup_steps=50, num_train_epochs=50, logging_steps=20, save_strategy="no", report_to=[],
            remove_unused_columns=False, seed=args.seed, dataloader_num_workers=0,
        ),
        train_dataset=train,
        data_collator=collator,
        processing_class=processor,
        callbacks=[WallClockLimit(args.train_minutes * 60)],
    )
    trainer.train()
    model.eval()
    save_for_hub(model, processor, out / "model")

    test = splits["test"]
    metrics, examples = {}, []
    for task in ("cta", "dsp"):
        for name in sorted(set(test.filter(lambda r, t=task: r["task"] == t)["dataset"])):
            rows = list(test.filter(lambda r, t=task, d=name: r["task"] == t and r["dataset"] == d))
            rows = rows[: args.eval_examples]
            answers = greedy_answers(model, processor, rows)
            accuracy = float(np.mean([a["text"] == r["label"] for a, r in zip(answers, rows, strict=True)]))
            metrics.setdefault(task, {})[name] = {"accuracy": accuracy, "n": len(rows)}
            examples.append((task, rows[0]["instruction"], answers[0]["text"], rows[0]["label"]))
    cpcg = [row for row in test if row["task"] == "cpcg"][:1]
    batch = collator(cpcg)
    generated = model.generate_cells(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_cells=50, seed=args.seed,
        max_new_tokens=24,
    )
    metrics["cpcg"] = {
        "request": cpcg[0]["instruction"],
        "answered_with_signal": bool(generated.has_signal.all()),
        "generated_cells": int(generated.cell_values.shape[0]),
        "mean_generated_library": float(generated.cell_values.sum(-1).float().mean()) if generated.cell_values.numel() else 0.0,
        "real_library": float(batch["target_cell_values"].sum()),
    }
    metrics["wall_seconds"] = round(time.time() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = ["# InstructCell demo", "", f"Wall time: {metrics['wall_seconds']} s; model saved to `{out / 'model'}`.", ""]
    lines += ["| task | dataset | test accuracy | n |", "|---|---|---|---|"]
    for task in ("cta", "dsp"):
        for name, value in metrics[task].items():
            lines.append(f"| {task} | {name} | {value['accuracy']:.3f} | {value['n']} |")
    lines += ["", "## Requests", ""]
    for task, instruction, answer, label in examples:
        lines.append(f"- **{task}**: {instruction} -> *{answer}* (truth: {label})")
    lines.append(f"- **cpcg**: {metrics['cpcg']['request']} -> {metrics['cpcg']['generated_cells']} cells")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
