"""The demo's evaluation (run_evaluation with both label methods and the requests) on a tiny dataset.

Model predictions and generated cells are fixed by hand, so the scores in metrics.json are known; the
baselines, the embedding (a PCA stand-in), the report and the figures run for real. No training.
"""

import dataclasses
import json
import re
import time

import datasets
import numpy as np
import pytest
from builder_rows import builder_rows
from conftest import GENES
from script_modules import load_script
from stubs import PCAEmbedding

pytest.importorskip("matplotlib")
pytest.importorskip("scanpy")

from datasets_builder import FEATURES, TemplateBank, write_gene_vocab  # noqa: E402
from instructcell.evaluation import classification_evaluator, generation_evaluator  # noqa: E402
from instructcell.evaluation.candidates import GeneratedCells  # noqa: E402
from instructcell.evaluation.cells import sparse_cells  # noqa: E402
from instructcell.evaluation.classification_evaluator import classification_entry  # noqa: E402
from instructcell.evaluation.suite import run_evaluation  # noqa: E402
from instructcell.hub import save_for_hub  # noqa: E402

demo = load_script("examples/demo.py", "demo")

LABELS = {"cta": ["T cell", "B cell"], "dsp": ["sensitive", "resistant"], "cpcg": ["T cell", "B cell"]}
N_TEST = {"cta": 6, "dsp": 6, "cpcg": 22}
SETTINGS = {**demo.DEMO_DEFAULTS, "max_test_cells": 50}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-data")
    rng = np.random.default_rng(0)
    bank = TemplateBank.load()
    for split in ("train", "test"):
        rows = [
            row
            for task, labels in LABELS.items()
            for row in builder_rows(
                task,
                split,
                12 if split == "train" else N_TEST[task],
                rng,
                bank,
                labels,
                len(GENES),
                id_prefix=split,
            )
        ]
        datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(root / f"{split}.parquet"))
    write_gene_vocab(GENES, root / "gene_vocab.txt")
    return root


@pytest.fixture
def fixed_model(monkeypatch, model, processor, tmp_path):
    """A saved tiny model whose label predictions and generated cells are fixed by hand."""

    def predictions(model, processor, rows, method="score", **kwargs):
        rows = list(rows)
        other = [next(c for c in row["choices"] if c != row["label"]) for row in rows]
        if method == "score":  # the third cell wrong
            return [other[i] if i == 2 else row["label"] for i, row in enumerate(rows)]
        # greedy answers: the second names no label, the sixth a label outside the label set
        return [None if i == 1 else "T cell?" if i == 5 else row["label"] for i, row in enumerate(rows)]

    def cells(model, processor, requests, **kwargs):
        """The requests' own target cells, the last two requests unanswered."""
        answered = requests.select(range(len(requests) - 2))
        example = {
            "instruction": requests[0]["instruction"],
            "answer": "<SIGNAL>",
            "label": requests[0]["label"],
            "n_cells": 1,
            "mean_total_counts": 42.0,
        }
        counts = sparse_cells(answered, "target", len(GENES))
        n = len(answered)
        return GeneratedCells(counts, list(answered["label"]), list(range(n)), n, example)

    monkeypatch.setattr(classification_evaluator, "model_predictions", predictions)
    monkeypatch.setattr(
        classification_evaluator, "greedy_answer", lambda *args, **kwargs: "This is a T cell."
    )
    monkeypatch.setattr(generation_evaluator, "generate_for_requests", cells)
    return save_for_hub(model, processor, tmp_path / "model")


def test_classification_entry_scores_every_method():
    truth = ["T", "B", "T", "NK", "B", "T"]
    entry = classification_entry(
        truth,
        ["B", "NK", "T"],
        {
            "instructcell": ["T", "B", "B", "NK", "B", "T"],
            "instructcell_generate": ["T", None, "T", "NK", "B", "T cell?"],
            "logistic_regression": ["T", "B", "T", "T", "B", "T"],
        },
        {"instructcell": {"method": "score"}, "instructcell_generate": {}, "logistic_regression": {}},
        n_train=12,
    )
    methods = entry["methods"]
    assert (entry["n_test"], entry["n_train"], entry["labels"]) == (6, 12, ["B", "NK", "T"])
    assert methods["instructcell"]["accuracy"] == pytest.approx(5 / 6)
    assert methods["instructcell"]["method"] == "score"
    assert methods["instructcell_generate"]["accuracy"] == pytest.approx(4 / 6)
    assert methods["instructcell_generate"]["answered_rate"] == pytest.approx(4 / 6)
    assert methods["logistic_regression"]["accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="not in `labels`"):
        classification_entry(["X"], ["Y"], {"instructcell": ["Y"]}, {"instructcell": {}}, n_train=1)


def test_demo_evaluation_writes_scores_requests_and_figures(fixed_model, data_dir, tmp_path):
    out = tmp_path / "demo"
    (out / "model").mkdir(parents=True)  # other content of the folder is left alone
    config = demo.evaluation_config(
        fixed_model, data_dir, out, SETTINGS, 0, time.time() - 100, {"data_source": "synthetic"}
    )
    metrics = run_evaluation(config, embedding_factory=PCAEmbedding)

    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert written["title"] == "InstructCell demo" and written["run"]["wall_seconds"] >= 100
    assert written["run"]["data_source"] == "synthetic"
    for task in ("cta", "dsp"):
        entry = written["scores"][task]["toy"]
        assert entry["n_test"] == N_TEST[task] and entry["n_train"] == 12
        methods = entry["methods"]
        assert list(methods) == ["instructcell", "instructcell_generate", "logistic_regression"]
        assert methods["instructcell"]["accuracy"] == pytest.approx(5 / 6)
        assert methods["instructcell"]["answered_rate"] == 1.0
        assert methods["instructcell_generate"]["method"] == "generate"
        assert methods["instructcell_generate"]["accuracy"] == pytest.approx(4 / 6)
        assert methods["instructcell_generate"]["answered_rate"] == pytest.approx(4 / 6)
        assert methods["logistic_regression"]["accuracy"] == 1.0  # the toy labels separate
    entry = written["scores"]["cpcg"]["toy"]
    assert entry["n_requests"] == N_TEST["cpcg"] and entry["requested"] == {"B cell": 11, "T cell": 11}
    methods = entry["methods"]
    assert list(methods) == ["instructcell", "label_mean", "reference"]
    assert methods["instructcell"]["n_cells"] == 20
    assert methods["instructcell"]["signal_rate"] == pytest.approx(20 / 22)
    assert all(methods[name]["n_cells"] == 22 for name in ("label_mean", "reference"))
    for values in methods.values():
        assert all(isinstance(values[k], float) for k in ("mmd", "delta_sknn", "pknn", "pknn_k10"))

    requests = written["sections"]["requests"]
    assert [(r["task"], r["dataset"]) for r in requests] == [("cta", "toy"), ("dsp", "toy"), ("cpcg", "toy")]
    assert requests[0]["answer"] == "This is a T cell." and requests[2]["answer"] == "<SIGNAL>"
    assert "total counts 42" in requests[2]["detail"]

    assert (out / "model").is_dir()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "confusion_cta_toy.png",
        "confusion_dsp_toy.png",
        "markers_cpcg_toy.png",
        "umap_cpcg_toy.png",
    ]
    report = (out / "report.md").read_text()
    assert report.startswith("# InstructCell demo") and "## Requests in natural language" in report
    assert (
        "**conditional pseudo-cell generation** (toy)" in report
        and "> " + requests[0]["instruction"] in report
    )
    assert "| CTA | toy | 6 | InstructCell (generate) | 0.667 | " in report
    assert "| CPCG | toy | 22 | InstructCell | 20 / 22 | 0.909 |" in report
    assert "figures/umap_cpcg_toy.png" in report
    assert not re.search(r"\b(targets?|issues?)\b", report, flags=re.IGNORECASE)  # scores, no verdicts
    assert not [p for p in out.iterdir() if p.name.startswith(".report-")]


def test_failure_leaves_no_partial_output(fixed_model, data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(generation_evaluator, "plot_umap", broken)
    out = tmp_path / "demo"
    config = demo.evaluation_config(fixed_model, data_dir, out, SETTINGS, 0, time.time(), {})
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_evaluation(config, embedding_factory=PCAEmbedding)
    assert list(out.iterdir()) == []


def test_a_new_task_of_an_existing_family_needs_no_evaluation_change(
    fixed_model, data_dir, tmp_path, monkeypatch
):
    """A task registered with an existing metric family is scored, tabled and plotted like the others."""
    from instructcell.tasks import CELL_TYPE_ANNOTATION, TASKS

    task = dataclasses.replace(CELL_TYPE_ANNOTATION, name="ctb", title="cell type bisection")
    monkeypatch.setitem(TASKS, "ctb", task)
    new_data = tmp_path / "data"
    new_data.mkdir()
    for split in ("train", "test"):
        table = datasets.load_dataset("parquet", data_files=str(data_dir / f"{split}.parquet"))["train"]
        rows = table.filter(lambda row: row["task"] == "cta").map(lambda row: {"task": "ctb"})
        rows.to_parquet(str(new_data / f"{split}.parquet"))
    write_gene_vocab(GENES, new_data / "gene_vocab.txt")
    config = demo.evaluation_config(fixed_model, new_data, tmp_path / "out", SETTINGS, 0, time.time(), {})
    metrics = run_evaluation(config, embedding_factory=PCAEmbedding)
    assert list(metrics["scores"]) == ["ctb"]
    methods = metrics["scores"]["ctb"]["toy"]["methods"]
    assert methods["instructcell"]["accuracy"] == pytest.approx(5 / 6)
    assert methods["logistic_regression"]["accuracy"] == 1.0
    assert metrics["sections"]["requests"][0]["task"] == "ctb"
    report = (tmp_path / "out" / "report.md").read_text()
    assert (
        "## Cell type bisection (test split)" in report
        and "| CTB | toy | 6 | InstructCell (score) |" in report
    )
    assert (tmp_path / "out" / "figures" / "confusion_ctb_toy.png").is_file()
