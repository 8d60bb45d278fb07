"""A tiny built dataset folder (Parquet rows of the builder's schema + gene_vocab.txt) for training tests."""

from pathlib import Path

import datasets
import numpy as np
from conftest import GENES

LABELS = {"cta": ["T cell", "B cell"], "dsp": ["sensitive", "resistant"], "cpcg": ["T cell", "B cell"]}
INSTRUCTIONS = {
    "cta": "What cell type is this human cell? <CELL>",
    "dsp": "Is this cell sensitive or resistant to erlotinib? <CELL>",
    "cpcg": "Generate a {label} from human blood.",
}


def training_row(task: str, counts: np.ndarray, label: str, cell_id: str, split: str) -> dict:
    """One instruct row of ``task`` about a cell with ``counts`` (the input cell, or the target for CPCG)."""
    nonzero = np.flatnonzero(counts)
    cell = {
        "gene_indices": nonzero.astype(np.int32).tolist(),
        "gene_counts": counts[nonzero].astype(np.float32).tolist(),
    }
    empty = {"gene_indices": [], "gene_counts": []}
    return {
        "task": task,
        "variant": "instruct",
        "dataset": "toy",
        "cell_id": cell_id,
        "split": split,
        "template_id": "t0",
        "instruction": INSTRUCTIONS[task].format(label=label),
        "response": "<SIGNAL>" if task == "cpcg" else label,
        "label": label,
        "choices": [],
        "options_in_prompt": False,
        "species": "human",
        "tissue": "blood",
        "sequencing_method": "10x",
        "drug": "erlotinib" if task == "dsp" else "",
        **{f"input_{k}": v for k, v in (empty if task == "cpcg" else cell).items()},
        **{f"target_{k}": v for k, v in (cell if task == "cpcg" else empty).items()},
    }


def write_training_dataset(root: Path, n_train: int = 8, n_validation: int = 2) -> Path:
    """Write ``n_train`` / ``n_validation`` rows per task (CTA, DSP, CPCG) of Poisson cells into ``root``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("validation", n_validation)):
        rows = []
        for task, names in LABELS.items():
            for i in range(n):
                counts = rng.poisson(3.0, size=len(GENES))
                counts[0] += 1
                rows.append(training_row(task, counts, names[i % 2], f"{task}-{split}{i}", split))
        datasets.Dataset.from_list(rows).to_parquet(str(root / f"{split}.parquet"))
    (root / "gene_vocab.txt").write_text("\n".join(GENES) + "\n")
    return root
