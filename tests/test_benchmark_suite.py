"""benchmarks/run_benchmarks.py on a tiny dataset and model: table formatting and every section's JSON."""

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
    table = suite.markdown_table(["name", "n", "score"], [["a", 3, 0.12345], ["b", None, float("nan")]], 1)
    assert table.splitlines() == [
        "| name | n | score |",
        "|---|---:|---:|",
        "| a | 3 | 0.123 |",
        "| b | n/a | n/a |",
    ]
    with pytest.raises(ValueError, match="columns"):
        suite.markdown_table(["a", "b"], [["only one"]])


def test_tables_put_methods_side_by_side_and_leave_out_absent_ones():
    classification = {
        "cta/toy": {
            "task": "cta",
            "dataset": "toy",
            "n_test": 4,
            "methods": {
                "instruct": {"accuracy": 0.5, "macro_f1": 0.4, "weighted_f1": 0.45},
                "logreg": {"accuracy": 1.0, "macro_f1": 1.0, "weighted_f1": 1.0},
            },
        },
    }
    lines = suite.classification_table(classification).splitlines()
    assert lines[0] == "| task | dataset | n test | metric | InstructCell instruct | logistic regression |"
    assert lines[2] == "| CTA | toy | 4 | accuracy | 0.500 | 1.000 |"
    assert len(lines) == 2 + 3  # one row per metric
    generation = {
        "toy": {
            "requested": {"A": 2, "B": 3},
            "generators": {
                "reference": {"mmd": 0.1, "delta_sknn": 0.0, "pknn": 0.9, "pknn_k10": 0.8, "n_cells": 5},
                "instruct": {"mmd": None, "delta_sknn": None, "pknn": None, "pknn_k10": None, "n_cells": 0},
            },
        }
    }
    lines = suite.generation_table(generation).splitlines()
    assert lines[0] == "| dataset | metric | InstructCell instruct | reference (real training cells) |"
    assert lines[2] == "| toy | MMD | n/a | 0.100 |"
    assert lines[-1] == "| toy | cells generated / requested | 0 / 5 | 5 / 5 |"


def test_suite_sections_and_json(dataset_dir, model_dir, tmp_path):
    args = suite.parse_args(_argv(dataset_dir, model_dir, tmp_path, "--skip-scvi", "--skip-celltypist"))
    try:
        results = suite.run_suite(args, embedding_factory=PCAEmbedding)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    md, js = suite.write_outputs(results, args.output)
    written = json.loads(js.read_text())
    assert written == suite._plain(results)
    assert set(written) == {"run", "skipped", "classification", "generation", "throughput", "training"}
    assert written["skipped"] == {"celltypist": "--skip-celltypist", "scvi": "--skip-scvi"}
    machine = written["run"]["machine"]
    assert machine["torch_threads"] >= 1 and machine["logical_cpus"] >= 1 and "cpu" in machine
    assert written["run"]["models"] == {"instruct": str(model_dir), "chat": str(model_dir)}

    assert set(written["classification"]) == {"cta/toy", "dsp/toy"}
    for entry in written["classification"].values():
        assert entry["n_test"] == 5 and entry["n_train"] == N_ROWS["train"]
        assert set(entry["methods"]) == {"instruct", "chat", "logreg"}
        for values in entry["methods"].values():
            assert {"accuracy", "macro_f1", "weighted_f1", "answered_rate", "seconds"} <= set(values)
            assert 0.0 <= values["accuracy"] <= 1.0
        assert entry["methods"]["instruct"]["method"] == "score"
        assert entry["methods"]["instruct"]["answered_rate"] == 1.0  # scoring always names a label
        assert entry["methods"]["chat"]["method"] == "score"  # whole chat responses, one per label
        assert entry["methods"]["chat"]["answered_rate"] == 1.0
        assert entry["methods"]["logreg"]["accuracy"] == 1.0  # the toy labels separate

    entry = written["generation"]["toy"]
    assert entry["n_real"] == 5 and entry["requested"] == {"B cell": 2, "T cell": 3}
    generators = entry["generators"]
    assert set(generators) == {"instruct", "chat", "label_mean", "reference"}
    for name in ("label_mean", "reference"):
        assert generators[name]["n_cells"] == 5
        assert all(isinstance(generators[name][k], float) for k in ("mmd", "delta_sknn", "pknn", "pknn_k10"))
    for name in ("instruct", "chat"):
        values = generators[name]
        assert 0.0 <= values["signal_rate"] <= 1.0
        assert (values["mmd"] is None) == (values["n_cells"] < 2)

    throughput = written["throughput"]
    assert throughput["model"] == "instruct" and throughput["dataset"] == "toy"
    modes = [row["mode"] for row in throughput["modes"]]
    assert modes == [
        "annotate (score, batched)",
        "annotate (greedy answers, batched, no probabilities)",
        "generate, 1 cell at a time",
    ]
    assert [row["cells"] for row in throughput["modes"]] == [6, 6, 2]
    assert all(row["cells_per_s"] > 0 for row in throughput["modes"])
    assert throughput["speedup_vs_single"]["generate, 1 cell at a time"] == 1.0

    training = written["training"]
    assert training["steps"] == 3 and training["timed_steps"] == 2 and training["examples_per_step"] == 4
    assert training["tasks"] == "cta,dsp,cpcg" and training["preset"] == "tiny"
    assert math.isclose(training["examples_per_s"], training["steps_per_s"] * 4)

    report = md.read_text()
    assert report.startswith("# InstructCell benchmark suite") and "Ran on " in report
    assert suite.main(["--render", str(js), "--output", str(tmp_path / "again")]) == written
    assert (tmp_path / "again.md").read_text() == report
    for title in (
        "InstructCell instruct",
        "InstructCell chat",
        "logistic regression",
        "per-label mean",
        "reference (real training cells)",
        "annotate (score, batched)",
        "examples/s",
    ):
        assert title in report
    assert "Skipped: celltypist: --skip-celltypist; scvi: --skip-scvi." in report


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
    assert results["skipped"] == {
        "throughput": "no model given (--instruct-model / --chat-model)",
        "training": "--skip-training",
    }
    assert results["run"]["models"] == {}
    assert set(results["classification"]["cta/toy"]["methods"]) == {"logreg", "celltypist"}
    assert results["classification"]["cta/toy"]["methods"]["celltypist"]["accuracy"] == 1.0
    scvi = results["generation"]["toy"]["generators"]["scvi"]
    assert scvi["n_cells"] == 5 and scvi["epochs"] == 2 and isinstance(scvi["mmd"], float)


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
    assert suite.machine_line(info).startswith("Ran on toy CPU (2 logical CPUs, 2 usable), torch threads 1")
    run = {
        "machine": info,
        "section_cpu_share": {"throughput": 0.97, "generation": 0.12},
        "section_load": {"throughput": [2.1, 1.5, 1.0], "generation": [4.0, 4.0, 3.5]},
    }
    quiet = suite.load_note(run, "throughput")
    assert quiet == (
        "This process got 97% of a CPU during this section (load average at its end 2.10 on 2 usable CPUs)."
    )
    assert "lower bounds" in suite.load_note(run, "generation")
    assert suite.load_note(run, "training") == ""


def test_sections_record_their_cpu_share(dataset_dir, tmp_path):
    argv = [
        "--dataset-dir",
        str(dataset_dir),
        "--output",
        str(tmp_path / "suite"),
        "--skip-generation",
        "--skip-throughput",
        "--skip-training",
        "--skip-celltypist",
    ]
    run = suite.run_suite(suite.parse_args(argv))["run"]
    assert set(run["section_cpu_share"]) == {"classification"}
    assert run["section_cpu_share"]["classification"] > 0
