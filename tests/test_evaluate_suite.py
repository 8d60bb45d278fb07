"""The evaluation suite (instructcell evaluate): a tiny model, synthetic rows rendered with the real bank."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from stubs import PCAEmbedding

pytest.importorskip("matplotlib")
pytest.importorskip("scanpy")

from builder_rows import builder_rows  # noqa: E402

from datasets_builder import (  # noqa: E402  (after the skips: needs the [data,eval] extras)
    FEATURES,
    TemplateBank,
    template_split_of,
    write_gene_vocab,
)
from datasets_builder.collator import DataCollatorForInstructCell  # noqa: E402
from instructcell import cli  # noqa: E402
from instructcell.evaluation import classification_evaluator, robustness, sections  # noqa: E402
from instructcell.evaluation.saliency import (  # noqa: E402
    masked_saliency,
    mean_saliency_by_label,
    objective_gradients,
    row_answer_saliency,
    top_genes,
)
from instructcell.evaluation.suite import EvaluationConfig, run_evaluation  # noqa: E402
from instructcell.hub import save_for_hub  # noqa: E402

GENES = [f"GENE{i}" for i in range(40)]  # the conftest processor's vocabulary
LABELS = {"cta": ("T cell", "B cell"), "dsp": ("sensitive", "resistant"), "cpcg": ("T cell", "B cell")}
NAMES = {"cta": "toy_pbmc", "dsp": "toy_drug", "cpcg": "toy_pbmc"}
N_TEST = 8


def _rows(
    task: str, split: str, n: int, seed: int, bank: TemplateBank, variant: str = "instruct"
) -> list[dict]:
    """Rows as the builder writes them: label i % 2, five marker genes per label, a template of the split."""
    return builder_rows(
        task,
        split,
        n,
        np.random.default_rng(seed),
        bank,
        list(LABELS[task]),
        len(GENES),
        dataset=NAMES[task],
        variants=(variant,),
        marker_genes=5,
        marker_mean=15.0,
        id_prefix=f"{split}_",
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite-data")
    bank = TemplateBank.load()
    for split, n, seed in (("train", 16, 0), ("test", N_TEST, 1)):
        rows = [row for k, task in enumerate(LABELS) for row in _rows(task, split, n, seed + 10 * k, bank)]
        datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(root / f"{split}.parquet"))
    write_gene_vocab(GENES, root / "gene_vocab.txt")
    return root


@pytest.fixture(scope="module")
def chat_data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite-chat-data")
    bank = TemplateBank.load()
    for split, n, seed in (("train", 8, 0), ("test", 4, 1)):
        rows = _rows("cta", split, n, seed, bank, variant="chat")
        datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(root / f"{split}.parquet"))
    write_gene_vocab(GENES, root / "gene_vocab.txt")
    return root


@pytest.fixture
def model_dir(model, processor, tmp_path) -> Path:
    return save_for_hub(model, processor, tmp_path / "model")


def _config(model_dir, data_dir, out, **kwargs) -> EvaluationConfig:
    settings = {"max_test_cells": None, "batch_size": 4, "progress": False, "templates_per_group": 2}
    return EvaluationConfig(model=model_dir, dataset_dir=data_dir, output_dir=out, **{**settings, **kwargs})


def test_full_run_writes_consistent_metrics_report_and_figures(model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    config = _config(model_dir, data_dir, out, robustness=True, saliency=True, saliency_top_k=4)
    metrics = run_evaluation(config, embedding_factory=PCAEmbedding)

    written = json.loads((out / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert set(written) == {"title", "run", "scores", "sections", "figures"}
    scores = written["scores"]
    assert set(scores) == {"cta", "dsp", "cpcg"}
    assert set(scores["cta"]) == {"toy_pbmc"} and set(scores["dsp"]) == {"toy_drug"}
    for task in ("cta", "dsp"):
        entry = scores[task][NAMES[task]]
        assert (
            entry["n_test"] == N_TEST and entry["n_train"] == 16 and entry["labels"] == sorted(LABELS[task])
        )
        assert list(entry["methods"]) == ["instructcell", "logistic_regression"]  # the cheap baselines
        model = entry["methods"]["instructcell"]
        assert (
            model["method"] == "score" and model["answered_rate"] == 1.0 and 0.0 <= model["accuracy"] <= 1.0
        )
        assert {"accuracy", "macro_f1", "weighted_f1", "seconds"} <= set(
            entry["methods"]["logistic_regression"]
        )
        assert entry["methods"]["logistic_regression"]["accuracy"] == 1.0  # the toy labels separate
    gen = scores["cpcg"]["toy_pbmc"]
    assert gen["n_requests"] == N_TEST and gen["requested"] == {"B cell": 4, "T cell": 4}
    assert list(gen["methods"]) == ["instructcell", "label_mean", "reference"]
    for name, values in gen["methods"].items():
        assert {"mmd", "pknn", "delta_sknn", "pknn_k10", "n_cells", "seconds"} <= set(values)
        assert name == "instructcell" or (values["n_cells"] == N_TEST and isinstance(values["mmd"], float))
    assert set(gen["markers"]) == set(LABELS["cpcg"]) and all(len(g) == 3 for g in gen["markers"].values())
    run = written["run"]
    assert run["skipped"] == {} and run["methods"]["instructcell"]["kind"] == "model"
    assert run["methods"]["reference"]["title"] == "reference (real training cells)"

    # robustness: 2 + 2 held-out test templates; summary = numpy's mean / sd (ddof=1) per template
    section = written["sections"]["robustness"]
    train_ids = set(
        datasets.load_dataset("parquet", data_files=str(data_dir / "train.parquet"))["train"]["template_id"]
    )
    bank = robustness.template_lookup(TemplateBank.load())
    for task in ("cta", "dsp"):
        chosen = section["templates"][task]
        for group, ids in chosen.items():
            assert len(ids) == 2 and not set(ids) & train_ids
            assert all(template_split_of(i) == "test" for i in ids)
            assert all(bank[(i, "instruct")].has_choices == (group == "with_options") for i in ids)
        result = section["results"][task][NAMES[task]]
        assert [r["n"] for r in result["per_template"]] == [N_TEST] * 4
        for group in ("with_options", "without_options", "all"):
            values = [r for r in result["per_template"] if group == "all" or r["group"] == group]
            for metric in ("accuracy", "macro_f1"):
                column = np.array([r[metric] for r in values])
                assert result["summary"][group][metric]["mean"] == pytest.approx(column.mean())
                assert result["summary"][group][metric]["sd"] == pytest.approx(column.std(ddof=1))

    # saliency: top genes per label, normalized values, and the CSV holds the same list
    csv = (out / "saliency_top_genes.csv").read_text().strip().splitlines()
    n_listed = 0
    for task in ("cta", "dsp"):
        entry = written["sections"]["saliency"][task][NAMES[task]]
        assert entry["n_cells"] == {label: N_TEST // 2 for label in LABELS[task]}
        for items in entry["top_genes"].values():
            values = [item["saliency"] for item in items]
            assert (
                0 < len(items) <= 4
                and all(0 < v <= 1 for v in values)
                and values == sorted(values, reverse=True)
            )
            n_listed += len(items)
    assert len(csv) == n_listed + 1 and csv[0] == "task,dataset,label,rank,gene,saliency,n_cells"

    expected = (
        {f"confusion_{t}_{NAMES[t]}.png" for t in ("cta", "dsp")}
        | {f"robustness_{t}_{NAMES[t]}.png" for t in ("cta", "dsp")}
        | {f"saliency_{t}_{NAMES[t]}.png" for t in ("cta", "dsp")}
        | {"umap_cpcg_toy_pbmc.png", "markers_cpcg_toy_pbmc.png"}
    )
    figures = out / "figures"
    assert {p.name for p in figures.iterdir()} == expected
    assert all((figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in expected)
    report = (out / "report.md").read_text()
    assert all(f"figures/{name}" in report for name in expected)
    assert report.startswith("# InstructCell evaluation (test split)")
    assert "| CTA | toy_pbmc | 8 | InstructCell (score) |" in report and "with options (2)" in report
    assert "| CTA | toy_pbmc | 8 | logistic regression | 1.000 | 1.000 | 1.000 | 1.000 |" in report
    assert "| CPCG | toy_pbmc | 8 | reference (real training cells) | 8 / 8 | n/a |" in report
    assert not [p for p in out.iterdir() if p.name.startswith(".report-")]


def test_accuracy_and_template_spread_from_fixed_predictions(model_dir, data_dir, tmp_path, monkeypatch):
    """Fixed predictions: rows 0-5 right, 6 wrong, 7 unanswered; with a template, the first id % 9 right."""

    def fixed(model, processor, rows, method="score", answers=None, **kwargs):
        rows = list(rows)
        ids = {row["template_id"] for row in rows}
        other = {
            label: [c for c in row["choices"] if c != label][0] for row in rows for label in [row["label"]]
        }
        if len(ids) == 1:  # a robustness template applied to all cells
            k = int(next(iter(ids)).split("-")[1]) % (len(rows) + 1)
            return [row["label"] if i < k else other[row["label"]] for i, row in enumerate(rows)]
        return [row["label"] for row in rows[:6]] + [other[rows[6]["label"]], None]

    monkeypatch.setattr(classification_evaluator, "model_predictions", fixed)
    monkeypatch.setattr(sections, "model_predictions", fixed)
    config = _config(model_dir, data_dir, tmp_path / "eval", tasks=["cta", "dsp"], robustness=True)
    metrics = run_evaluation(config)
    assert set(metrics["scores"]) == {"cta", "dsp"}
    for task in ("cta", "dsp"):
        entry = metrics["scores"][task][NAMES[task]]["methods"]["instructcell"]
        # refs alternate a, b; answered pairs (a,a) (b,b) x3 and (a, b): F1 = 6/7 for both labels
        assert entry["accuracy"] == pytest.approx(6 / 8)
        assert entry["answered_rate"] == pytest.approx(7 / 8)
        assert entry["macro_f1"] == pytest.approx(6 / 7)
        result = metrics["sections"]["robustness"]["results"][task][NAMES[task]]
        per_template = {r["template_id"]: r["accuracy"] for r in result["per_template"]}
        hand = {tid: (int(tid.split("-")[1]) % 9) / 8 for tid in per_template}
        assert per_template == pytest.approx(hand)
        for group, ids in metrics["sections"]["robustness"]["templates"][task].items():
            values = np.array([hand[i] for i in ids])
            assert result["summary"][group]["accuracy"]["mean"] == pytest.approx(values.mean())
            assert result["summary"][group]["accuracy"]["sd"] == pytest.approx(values.std(ddof=1))


def test_chat_variant_scores_whole_responses_and_parses_greedy_answers(model_dir, chat_data_dir, tmp_path):
    rows = list(datasets.load_dataset("parquet", data_files=str(chat_data_dir / "test.parquet"))["train"])
    lookup = robustness.template_lookup(TemplateBank.load())
    for row in rows:
        texts = robustness.answer_texts(row, lookup[(row["template_id"], "chat")])
        assert texts[row["choices"].index(row["label"])] == row["response"]  # the stored chat answer
        assert all(choice in text for choice, text in zip(row["choices"], texts, strict=True))
    config = _config(model_dir, chat_data_dir, tmp_path / "score", variant="chat", robustness=True)
    metrics = run_evaluation(config)
    entry = metrics["scores"]["cta"]["toy_pbmc"]
    assert entry["methods"]["instructcell"]["answered_rate"] == 1.0 and entry["n_test"] == 4
    ids = metrics["sections"]["robustness"]["templates"]["cta"]
    assert all(lookup[(i, "chat")].response != "{output}" for group in ids.values() for i in group)
    config = _config(
        model_dir, chat_data_dir, tmp_path / "generate", variant="chat", method="generate", baselines="none"
    )
    methods = run_evaluation(config)["scores"]["cta"]["toy_pbmc"]["methods"]
    assert list(methods) == ["instructcell"]
    assert (
        methods["instructcell"]["method"] == "generate"
        and 0.0 <= methods["instructcell"]["answered_rate"] <= 1.0
    )


def test_masked_saliency_hand_made_case():
    loss_gradients = np.array([[-2.0, 1.0, -1.0, -0.5], [0.3, -4.0, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    counts = np.array([[1, 5, 0, 3], [2, 1, 1, 0], [1, 1, 1, 1]])
    # cell 0: gene 1 raises the loss, gene 2 is not expressed; cell 1: gene 0 raises it, gene 2 has zero
    # gradient, gene 3 zero count; cell 2: every gene raises the loss -> all zero
    expected = np.array([[1.0, 0.0, 0.0, 0.25], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(masked_saliency(loss_gradients, counts), expected)
    in_vocabulary = np.array([True, True, True, False])
    np.testing.assert_allclose(
        masked_saliency(loss_gradients, counts, in_vocabulary)[0], [1.0, 0.0, 0.0, 0.0]
    )
    # min-max over the cell: when every gene passes, the smallest becomes 0
    np.testing.assert_allclose(
        masked_saliency(np.array([[-1.0, -3.0, -2.0]]), np.ones((1, 3))), [[0.0, 1.0, 0.5]]
    )
    with pytest.raises(ValueError, match="n_cells, n_genes"):
        masked_saliency(loss_gradients, counts[:, :3])

    table = mean_saliency_by_label(expected, ["b", "a", "b"], ["g0", "g1", "g2", "g3"])
    np.testing.assert_allclose(table.loc["b"], [0.5, 0.0, 0.0, 0.125])
    assert table.attrs["n_cells"] == {"a": 1, "b": 2}
    assert top_genes(table, k=3) == {"a": [("g1", 1.0)], "b": [("g0", 0.5), ("g3", 0.125)]}


def test_objective_gradients_match_finite_differences(model, processor):
    torch.manual_seed(0)
    cells = np.random.default_rng(0).poisson(4.0, size=(2, len(GENES))).astype(np.float32) + 1
    batch = processor(
        text=["What cell type is this {species} cell? {input}"] * 2,
        cells=cells,
        metadata={"species": "human"},
    )
    answers = processor.tokenizer(["T cell", "B cell"], padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    candidates = (answers["input_ids"], answers["attention_mask"])
    grad = objective_gradients(model, *args, batch["cell_values"], *candidates, target_index=[0, 1])

    def objective(values):
        with torch.no_grad():
            ll = model.score_labels(*args, torch.as_tensor(values), *candidates).log_likelihoods
        return ll[0, 0].item(), ll[1, 1].item()

    gene = int(np.abs(grad[0]).argmax())
    step = np.zeros_like(cells)
    step[:, gene] = 0.25
    plus, minus = objective(cells + step), objective(cells - step)
    numeric = (plus[0] - minus[0]) / 0.5
    assert numeric == pytest.approx(grad[0, gene], rel=0.1, abs=1e-4)
    assert grad.shape == (2, len(GENES)) and np.any(grad[1] != grad[0])


def test_row_saliency_keeps_expressed_genes_that_lower_the_loss(model, processor, data_dir):
    table = datasets.load_dataset("parquet", data_files=str(data_dir / "test.parquet"))["train"]
    rows = [row for row in table if row["task"] == "cta"]
    saliency, counts = row_answer_saliency(model, processor, rows, batch_size=3, progress=False)
    # the same gradients in one batch of all rows (other padding): per-cell results do not depend on batching
    batch = DataCollatorForInstructCell(processor)(rows)
    answers = processor.tokenizer([row["label"] for row in rows], padding=True, return_tensors="pt")
    grad = objective_gradients(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["cell_values"],
        answers["input_ids"][:, None],
        answers["attention_mask"][:, None],
        target_index=[0] * len(rows),
    )
    np.testing.assert_array_equal(counts, batch["cell_values"].numpy())
    kept = saliency > 0
    assert kept.any() and not (kept & ~((grad > 0) & (counts > 0))).any()  # d loss / dx = -grad < 0
    np.testing.assert_allclose(saliency, masked_saliency(-grad, counts), atol=1e-4)
    np.testing.assert_allclose(saliency.max(axis=1), 1.0)


def test_clear_errors(model_dir, data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="Unknown task"):
        EvaluationConfig(
            model=model_dir, dataset_dir=data_dir, output_dir=tmp_path, tasks=["cta", "annotate"]
        )
    with pytest.raises(ValueError, match="Unknown method"):
        EvaluationConfig(model=model_dir, dataset_dir=data_dir, output_dir=tmp_path, method="vote")
    with pytest.raises(ValueError, match="Unknown baseline"):
        EvaluationConfig(model=model_dir, dataset_dir=data_dir, output_dir=tmp_path, baselines="forest")
    with pytest.raises(ValueError, match=r"Unknown dataset\(s\) \['nope'\].*toy_drug, toy_pbmc"):
        run_evaluation(_config(model_dir, data_dir, tmp_path / "a", datasets=["toy_pbmc", "nope"]))
    with pytest.raises(ValueError, match="No train rows .*variant 'chat'"):
        run_evaluation(_config(model_dir, data_dir, tmp_path / "b", variant="chat"))

    other = tmp_path / "other-vocab"
    shutil.copytree(data_dir, other)
    write_gene_vocab([*GENES[:5], "CD3E", *GENES[6:]], other / "gene_vocab.txt")
    with pytest.raises(ValueError, match="gene vocabulary.*position 5: 'GENE5' vs 'CD3E'"):
        run_evaluation(_config(model_dir, other, tmp_path / "c"))
    assert not (tmp_path / "c" / "metrics.json").exists()

    argv = ["evaluate", str(model_dir), str(data_dir), "-o", str(tmp_path / "d")]
    assert cli.main([*argv, "--tasks", "cta,xyz"]) == 2
    assert "Unknown task 'xyz'" in capsys.readouterr().err


def test_rows_rendered_from_another_bank_are_refused(data_dir):
    rows = list(datasets.load_dataset("parquet", data_files=str(data_dir / "test.parquet"))["train"])
    lookup = robustness.template_lookup(TemplateBank.load())
    robustness.check_rows_render(rows, lookup)  # the rows were rendered from this bank
    rows[3] = {**rows[3], "instruction": rows[3]["instruction"] + " Thanks!"}
    with pytest.raises(ValueError, match="does not give its stored instruction back"):
        robustness.check_rows_render(rows, lookup)
    with pytest.raises(ValueError, match="not in the template bank"):
        robustness.check_rows_render([{**rows[0], "template_id": "cta-99999999"}], lookup)
