"""benchmarks/run_benchmarks.py on a tiny dataset and model: the shared renderer and every section's JSON."""

import copy
import json
import math
import signal
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from builder_rows import builder_rows
from conftest import GENES
from script_modules import load_script
from stubs import PCAEmbedding

from datasets_builder import (
    FEATURES,
    TemplateBank,
    write_gene_vocab,
)
from instructcell.evaluation.render import load_note, machine_line, markdown_table, method_rows, render_report
from instructcell.hub import save_for_hub
from instructcell.training import config_for_processor
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

LABELS = {"cta": ["T cell", "B cell"], "dsp": ["sensitive", "resistant"], "cpcg": ["T cell", "B cell"]}
N_ROWS = {"train": 8, "validation": 2, "test": 6}


suite = load_script("benchmarks/run_benchmarks.py", "run_benchmarks")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    bank = TemplateBank.load()
    for split, n in N_ROWS.items():
        rows = [
            row
            for task in LABELS
            for row in builder_rows(
                task,
                split,
                n,
                rng,
                bank,
                LABELS[task],
                len(GENES),
                variants=("instruct", "chat"),
                id_prefix=f"{task}-{split}",
            )
        ]
        datasets.Dataset.from_list(rows, features=FEATURES).to_parquet(str(root / f"{split}.parquet"))
    write_gene_vocab(GENES, root / "gene_vocab.txt")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, base_tokenizer) -> Path:
    processor = InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), copy.deepcopy(base_tokenizer), num_query_tokens=4
    )
    model = InstructCellForConditionalGeneration(config_for_processor("tiny", processor)).eval()
    return save_for_hub(model, processor, tmp_path_factory.mktemp("model") / "tiny")


def _argv(dataset_dir, model_dir, tmp_path, *extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "tokenizer_vocab_size": 200,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "variant": "instruct",
                "extends": "demo",  # a user's recipe on top of a shipped one; its budget: --train-steps
                "demo": {"ignored": 1},
            }
        )
    )
    return [
        "--dataset-dir",
        str(dataset_dir),
        "--instruct-model",
        str(model_dir),
        "--chat-model",
        str(model_dir),
        "--output",
        str(tmp_path / "out" / "suite"),
        "--baselines",
        "cheap",
        "--max-test-cells",
        "5",
        "--batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--throughput-cells",
        "6",
        "--throughput-single-cells",
        "2",
        "--train-recipe",
        str(recipe),
        "--train-preset",
        "tiny",
        "--train-steps",
        "3",
        *extra,
    ]


def test_markdown_table_formats_values_and_checks_widths():
    table = markdown_table(["name", "n", "score"], [["a", 3, 0.12345], ["b", None, float("nan")]], 1)
    assert table.splitlines() == [
        "| name | n | score |",
        "|---|---:|---:|",
        "| a | 3 | 0.123 |",
        "| b | n/a | n/a |",
    ]
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["a", "b"], [["only one"]])


def test_family_tables_list_every_method_and_leave_out_absent_ones():
    methods = {
        "instruct": {"kind": "model", "title": "InstructCell instruct"},
        "logistic_regression": {"kind": "baseline", "title": "logistic regression"},
        "reference": {"kind": "baseline", "title": "reference (real training cells)"},
        "scvi": {"kind": "baseline", "title": "scVI"},
    }
    classification = {
        "cta": {
            "toy": {
                "n_test": 4,
                "methods": {
                    "instruct": {"accuracy": 0.5, "macro_f1": 0.4, "weighted_f1": 0.45, "method": "score"},
                    "logistic_regression": {
                        "accuracy": 1.0,
                        "macro_f1": 1.0,
                        "weighted_f1": 1.0,
                        "seconds": 0.21,
                    },
                },
            }
        }
    }
    header, rows = method_rows("classification", classification, methods)
    assert header == [
        "task",
        "dataset",
        "n test",
        "method",
        "accuracy",
        "macro F1",
        "weighted F1",
        "answered",
        "s",
    ]
    assert rows[0] == ["CTA", "toy", 4, "InstructCell instruct (score)", 0.5, 0.4, 0.45, None, None]
    assert rows[1][3:] == ["logistic regression", 1.0, 1.0, 1.0, None, "0.2"]
    generation = {
        "cpcg": {
            "toy": {
                "n_test": 6,
                "requested": {"A": 2, "B": 3},
                "methods": {
                    "instruct": {"mmd": None, "pknn": None, "n_cells": 0, "signal_rate": 0.0},
                    "reference": {"mmd": 0.1, "delta_sknn": 0.0, "pknn": 0.9, "pknn_k10": 0.8, "n_cells": 5},
                },
            }
        }
    }
    header, rows = method_rows("generation", generation, methods)
    assert header[4:7] == ["cells / requested", "answered `<SIGNAL>`", "MMD"]
    assert rows == [
        ["CPCG", "toy", 6, "InstructCell instruct", "0 / 5", 0.0, None, None, None, None, None],
        ["CPCG", "toy", 6, "reference (real training cells)", "5 / 5", None, 0.1, 0.0, 0.9, 0.8, None],
    ]
    generation["cpcg"]["toy"]["methods"]["scvi"] = {"mmd": 0.2, "n_cells": 5, "details": {"epochs": 2}}
    report = render_report(
        {
            "title": "T",
            "run": {"methods": methods, "skipped": {"celltypist": "not installed"}},
            "scores": generation,
        }
    )
    assert "| CPCG | toy | 6 | reference (real training cells) | 5 / 5 | n/a | 0.100 |" in report
    assert "- scVI on toy: epochs 2" in report and "Skipped: celltypist: not installed." in report
    assert "## Conditional pseudo-cell generation (test split)" in report


def test_suite_sections_and_json(dataset_dir, model_dir, tmp_path):
    args = suite.parse_args(_argv(dataset_dir, model_dir, tmp_path))
    try:
        results = suite.run_suite(args, embedding_factory=PCAEmbedding)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    folder = Path(args.output)
    written = json.loads((folder / "metrics.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written) == {"title", "run", "scores", "sections", "figures"}
    run = written["run"]
    assert run["skipped"] == {}
    machine = run["machine"]
    assert machine["torch_threads"] >= 1 and machine["logical_cpus"] >= 1 and "cpu" in machine
    assert run["models"] == {"instruct": str(model_dir), "chat": str(model_dir)}
    assert set(run["section_cpu_share"]) == {"classification", "generation", "throughput", "training"}
    assert run["methods"]["chat"] == {
        "kind": "model",
        "title": "InstructCell chat",
        "path": str(model_dir),
        "variant": "chat",
    }

    scores = written["scores"]
    assert set(scores) == {"cta", "dsp", "cpcg"}
    for task in ("cta", "dsp"):
        entry = scores[task]["toy"]
        assert entry["n_test"] == 5 and entry["n_train"] == N_ROWS["train"]
        assert list(entry["methods"]) == ["instruct", "chat", "logistic_regression"]
        for values in entry["methods"].values():
            assert {"accuracy", "macro_f1", "weighted_f1", "answered_rate", "seconds"} <= set(values)
            assert 0.0 <= values["accuracy"] <= 1.0
        assert entry["methods"]["instruct"]["method"] == "score"
        assert entry["methods"]["instruct"]["answered_rate"] == 1.0  # scoring always names a label
        assert entry["methods"]["chat"]["method"] == "score"  # whole chat responses, one per label
        assert entry["methods"]["chat"]["answered_rate"] == 1.0
        assert entry["methods"]["logistic_regression"]["accuracy"] == 1.0  # the toy labels separate

    entry = scores["cpcg"]["toy"]
    assert entry["n_test"] == 5 and entry["requested"] == {"B cell": 2, "T cell": 3}
    generators = entry["methods"]
    assert list(generators) == ["instruct", "chat", "label_mean", "reference"]
    for name in ("label_mean", "reference"):
        assert generators[name]["n_cells"] == 5
        assert all(isinstance(generators[name][k], float) for k in ("mmd", "delta_sknn", "pknn", "pknn_k10"))
    for name in ("instruct", "chat"):
        values = generators[name]
        assert 0.0 <= values["signal_rate"] <= 1.0
        assert (values["mmd"] is None) == (values["n_cells"] < 2)

    throughput = written["sections"]["throughput"]
    assert (
        throughput["model"] == "instruct" and throughput["task"] == "cta" and throughput["dataset"] == "toy"
    )
    modes = [row["mode"] for row in throughput["modes"]]
    assert modes == [
        "annotate (score, batched)",
        "annotate (greedy answers, batched, no probabilities)",
        "generate, 1 cell at a time",
    ]
    assert [row["cells"] for row in throughput["modes"]] == [6, 6, 2]
    assert all(row["cells_per_s"] > 0 for row in throughput["modes"])
    assert throughput["speedup_vs_single"]["generate, 1 cell at a time"] == 1.0

    training = written["sections"]["training"]
    assert training["steps"] == 3 and training["timed_steps"] == 2 and training["examples_per_step"] == 4
    assert training["tasks"] == "cta,dsp,cpcg" and training["preset"] == "tiny"
    assert math.isclose(training["examples_per_s"], training["steps_per_s"] * 4)

    assert {p.name for p in (folder / "figures").iterdir()} == {
        "confusion_cta_toy.png",
        "confusion_dsp_toy.png",
        "umap_cpcg_toy.png",
        "markers_cpcg_toy.png",
    }
    report = (folder / "report.md").read_text()
    assert report.startswith("# InstructCell benchmark suite") and "Ran on " in report
    assert (
        suite.main(["--render", str(folder / "metrics.json"), "--output", str(tmp_path / "again")]) == written
    )
    assert (tmp_path / "again" / "report.md").read_text() == report
    for title in (
        "InstructCell instruct (score)",
        "InstructCell chat (score)",
        "logistic regression",
        "per-label mean",
        "reference (real training cells)",
        "annotate (score, batched)",
        "examples/s",
        "figures/umap_cpcg_toy.png",
    ):
        assert title in report


def test_baseline_columns_appear_when_installed(dataset_dir, tmp_path):
    pytest.importorskip("celltypist")
    pytest.importorskip("scvi")
    argv = [
        "--dataset-dir",
        str(dataset_dir),
        "--output",
        str(tmp_path / "suite"),
        "--skip-training",
        "--max-test-cells",
        "5",
        "--scvi-epochs",
        "2",
    ]
    results = suite.run_suite(suite.parse_args(argv), embedding_factory=PCAEmbedding)
    assert results["run"]["skipped"] == {
        "throughput": "no model given (--instruct-model / --chat-model)",
        "training": "--skip-training",
    }
    assert results["run"]["models"] == {}
    methods = results["scores"]["cta"]["toy"]["methods"]
    assert list(methods) == ["logistic_regression", "celltypist"]
    assert methods["celltypist"]["accuracy"] == 1.0 and methods["celltypist"]["details"] == {"mode": "lr"}
    scvi = results["scores"]["cpcg"]["toy"]["methods"]["scvi"]
    assert scvi["n_cells"] == 5 and scvi["details"]["epochs"] == 2 and isinstance(scvi["mmd"], float)
    assert "- scVI on toy: epochs 2, train seconds" in (tmp_path / "suite" / "report.md").read_text()


def test_models_must_share_the_dataset_gene_vocabulary(dataset_dir, model_dir, tmp_path):
    args = suite.parse_args(["--dataset-dir", str(dataset_dir), "--instruct-model", str(model_dir)])
    with pytest.raises(ValueError, match="gene vocabulary"):
        suite.load_candidates(args, GENES[::-1])


def test_load_note_flags_starved_sections():
    info = {
        "cpu": "toy CPU",
        "logical_cpus": 2,
        "usable_cpus": 2,
        "torch_threads": 1,
        "torch_interop_threads": 1,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "nice": 19,
        "load_average_1_5_15": [0.5, 0.4, 0.3],
    }
    assert machine_line(info).startswith("Ran on toy CPU (2 logical CPUs, 2 usable), torch threads 1")
    run = {
        "machine": info,
        "section_cpu_share": {"throughput": 0.97, "generation": 0.12},
        "section_load": {"throughput": [2.1, 1.5, 1.0], "generation": [4.0, 4.0, 3.5]},
    }
    quiet = load_note(run, "throughput")
    assert quiet == (
        "This process got 97% of a CPU during this section (load average at its end 2.10 on 2 usable CPUs)."
    )
    assert "lower bounds" in load_note(run, "generation")
    assert load_note(run, "training") == ""


def test_sections_record_their_cpu_share(dataset_dir, tmp_path):
    argv = [
        "--dataset-dir",
        str(dataset_dir),
        "--output",
        str(tmp_path / "suite"),
        "--skip-generation",
        "--skip-throughput",
        "--skip-training",
        "--baselines",
        "logistic_regression",
    ]
    run = suite.run_suite(suite.parse_args(argv))["run"]
    assert set(run["section_cpu_share"]) == {"classification"}
    assert run["section_cpu_share"]["classification"] > 0
