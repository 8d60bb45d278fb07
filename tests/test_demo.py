"""The demo's report writer on tiny synthetic inputs: metrics.json schema, report.md, figures; no training."""

import json

import numpy as np
import pytest
from stubs import PCAEmbedding

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from instructcell.evaluation.report import (  # noqa: E402  (after the skips: needs the [eval] extra)
    ClassificationResult,
    GenerationResult,
    Request,
    check_targets,
    write_demo_report,
)

CLASSIFICATION_KEYS = {"accuracy", "macro_f1", "weighted_f1"}
GENERATION_KEYS = {"mmd", "delta_sknn", "pknn", "pknn_k10"}


def cells(labels, rng, n_genes=12):
    """Counts whose mean depends on the label, so labels separate."""
    names = sorted(set(labels))
    means = np.ones((len(labels), n_genes))
    for i, label in enumerate(labels):
        k = names.index(label)
        means[i, 3 * k : 3 * k + 3] = 20.0
    return rng.poisson(means)


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    truth = ["T", "B", "T", "NK", "B", "T"]
    cta = ClassificationResult(
        "cta",
        "toy_pbmc",
        truth,
        ["B", "NK", "T"],
        {"score": ["T", "B", "B", "NK", "B", "T"], "generate": ["T", None, "T", "NK", "B", "T cell?"]},
        ["T", "B", "T", "T", "B", "T"],
    )
    dsp = ClassificationResult(
        "dsp",
        "toy_drug",
        ["sensitive", "resistant"] * 3,
        ["resistant", "sensitive"],
        {"score": ["sensitive", "resistant"] * 3},
        ["sensitive", "sensitive"] * 3,
    )
    real_labels = ["A"] * 15 + ["B"] * 15
    gen_labels = ["A"] * 10 + ["B"] * 10
    cpcg = GenerationResult(
        "toy_gen",
        cells(real_labels, rng),
        real_labels,
        cells(gen_labels, rng),
        gen_labels,
        cells(gen_labels, rng),
        gen_labels,
        n_requests=22,
        n_answered_with_signal=20,
    )
    return [cta, dsp], [cpcg]


def test_write_demo_report_schema(tmp_path, results):
    classification, generation = results
    (tmp_path / "model").mkdir()  # other content of the folder is left alone
    requests = [Request("annotate", "toy_pbmc", "What is this cell? <CELL>", "T", "truth: T")]
    metrics = write_demo_report(
        tmp_path,
        classification,
        generation,
        requests,
        run_info={"data_source": "synthetic"},
        embedding_factory=PCAEmbedding,
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert isinstance(written["wall_seconds"], float)
    assert set(written["cta"]) == {"toy_pbmc"} and set(written["dsp"]) == {"toy_drug"}
    for task in ("cta", "dsp"):
        for entry in written[task].values():
            assert CLASSIFICATION_KEYS <= set(entry)
            assert CLASSIFICATION_KEYS <= set(entry["logreg"])
    assert written["cta"]["toy_pbmc"]["accuracy"] == pytest.approx(5 / 6)
    assert written["cta"]["toy_pbmc"]["generate"]["accuracy"] == pytest.approx(4 / 6)
    assert written["cta"]["toy_pbmc"]["logreg"]["accuracy"] == pytest.approx(5 / 6)
    assert written["dsp"]["toy_drug"]["accuracy"] == 1.0
    entry = written["cpcg"]["toy_gen"]
    assert GENERATION_KEYS <= set(entry) and GENERATION_KEYS <= set(entry["reference"])
    assert all(isinstance(entry[k], float) for k in GENERATION_KEYS)
    assert entry["n_generated"] == 20 and entry["signal_rate"] == pytest.approx(20 / 22)
    assert (tmp_path / "model").is_dir()
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "confusion_cta_toy_pbmc.png",
        "confusion_dsp_toy_drug.png",
        "umap_cpcg_toy_gen.png",
    ]
    report = (tmp_path / "report.md").read_text()
    assert "toy_pbmc" in report and "logreg" in report and "figures/umap_cpcg_toy_gen.png" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


def test_failure_leaves_no_partial_output(tmp_path, results):
    classification, generation = results
    bad = ClassificationResult("cta", "bad", ["X"], ["Y"], {"score": ["Y"]}, ["Y"])  # truth outside label set
    with pytest.raises(ValueError):
        write_demo_report(tmp_path, [*classification, bad], generation, embedding_factory=PCAEmbedding)
    assert list(tmp_path.iterdir()) == []


def test_targets_report_misses():
    metrics = {
        "dsp": {"d": {"accuracy": 0.9}},
        "cpcg": {
            "g": {
                "mmd": 0.5,
                "delta_sknn": 0.05,
                "pknn": 0.5,
                "pknn_k10": 0.55,
                "reference": {"mmd": 0.1, "delta_sknn": 0.0, "pknn": 0.6, "pknn_k10": 0.6},
            }
        },
    }
    met = {(c["task"], c["metric"]): c["met"] for c in check_targets(metrics)}
    assert met == {
        ("dsp", "accuracy"): False,
        ("cpcg", "pknn_k10"): True,
        ("cpcg", "delta_sknn"): True,
        ("cpcg", "mmd"): False,
    }
