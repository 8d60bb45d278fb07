"""Perturbation response prediction: pairing, style transfer, metrics, baselines, evaluation, CLI."""

import json
from pathlib import Path

import anndata
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import GENES
from script_modules import load_script

from datasets_builder import (
    FEATURES,
    AnnDataReader,
    AnnDataSource,
    InstructCellDatasetBuilder,
    PerturbationSource,
)
from datasets_builder.perturbation_pairs import paired_cells, perturbation_names
from instructcell import cli
from instructcell.evaluation.baselines import BASELINES, PerturbationCells
from instructcell.evaluation.cells import sparse_cells
from instructcell.evaluation.metrics.generation import normalize_log1p
from instructcell.evaluation.metrics.perturbation import (
    PERTURBATION_KEYS,
    change_pearson,
    energy_distance,
    mean_r2,
    perturbation_metrics,
    top_degs,
)
from instructcell.hub import save_for_hub
from instructcell.inference.perturbation import check_perturbation, control_cells
from instructcell.tasks import CONTROL_PERTURBATION
from instructcell.training.cell_decoder import ConditionedCellCollator, FrozenConditionCellVAE
from modeling_instructcell.modeling_cell_vae import VAE_KEYS, InstructCellConditionalVAE

STIM = "IFN-beta stimulated"
TYPES = ("B cell", "T cell", "monocyte")
RESPONSE_GENES = slice(30, 36)  # induced by the perturbation, three times more in monocytes


def perturbation_anndata(n_per_group: int = 12, seed: int = 0) -> anndata.AnnData:
    """Cells of 3 types x 2 donors x (control, stimulated); stimulation multiplies genes 30-35 by 6 (18)."""
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for t, cell_type in enumerate(TYPES):
        for donor in ("d1", "d2"):
            for condition in ("control", STIM):
                means = np.full(len(GENES), 2.0)
                means[5 * t : 5 * t + 5] = 20.0  # type markers
                if condition == STIM:
                    means[RESPONSE_GENES] *= 18.0 if cell_type == "monocyte" else 6.0
                for i in range(n_per_group):
                    rows.append(rng.poisson(means))
                    obs.append((f"{cell_type[0]}{donor}{condition[:4]}{i}", cell_type, donor, condition))
    frame = pd.DataFrame(obs, columns=["name", "cell_type", "donor", "condition"]).set_index("name")
    frame["species"], frame["tissue"], frame["sequencing_method"] = "human", "blood", "10x"
    return anndata.AnnData(
        X=sp.csr_matrix(np.asarray(rows, dtype=np.int32)), obs=frame, var=pd.DataFrame(index=GENES)
    )


def build(path: Path, tmp_path: Path, **source) -> dict[str, datasets.Dataset]:
    builder = InstructCellDatasetBuilder(
        config_name="prp-instruct",
        cache_dir=str(tmp_path / "cache"),
        sources=[PerturbationSource(str(path), task="prp", name="toy", **source)],
        gene_vocab=GENES,
        progress=False,
    )
    builder.download_and_prepare()
    return {split: builder.as_dataset(split) for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prp") / "cells.h5ad"
    perturbation_anndata().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def splits(h5ad, tmp_path_factory) -> dict[str, datasets.Dataset]:
    return build(h5ad, tmp_path_factory.mktemp("built"), pair_key="donor", perturbation="interferon beta")


def test_each_perturbed_cell_is_paired_with_a_control_of_its_type_and_donor(h5ad, splits):
    adata = anndata.read_h5ad(h5ad)
    dense = adata.X.toarray()
    by_counts = {
        tuple(np.flatnonzero(row)) + tuple(row[row > 0]): name
        for row, name in zip(dense, adata.obs_names, strict=True)
    }
    rows = datasets.concatenate_datasets(list(splits.values()))
    assert len(rows) == adata.n_obs  # one row per perturbed cell, one control row per control cell
    for row in rows:
        target = adata.obs.loc[row["cell_id"]]
        indices, counts = row["input_gene_indices"], np.asarray(row["input_gene_counts"], dtype=dense.dtype)
        control = adata.obs.loc[by_counts[tuple(indices) + tuple(counts)]]
        assert (
            control["condition"] == "control" and control["cell_type"] == row["label"] == target["cell_type"]
        )
        assert control["donor"] == target["donor"]
        if target["condition"] == "control":
            assert row["perturbation"] == CONTROL_PERTURBATION and control.name == row["cell_id"]
        else:
            assert row["perturbation"] == "interferon beta" and "interferon beta" in row["instruction"]
        assert row["response"] == "<SIGNAL>" and "<CELL>" in row["instruction"]
    assert perturbation_names(rows) == ["interferon beta", CONTROL_PERTURBATION]


def test_pairing_is_deterministic(h5ad):
    source = PerturbationSource(str(h5ad), task="prp", name="toy", pair_key="donor")

    def inputs() -> list[list[float]]:
        reader = AnnDataReader(source, GENES, progress=False)
        return [record.input_cell.gene_counts.tolist() for record in paired_cells(source, reader)]

    assert inputs() == inputs()


def test_bad_designs_get_clear_errors(tmp_path):
    adata = perturbation_anndata(n_per_group=3)
    base = tmp_path / "base.h5ad"
    adata.write_h5ad(base)
    with pytest.raises(ValueError, match="no obs column 'stim'.*condition_key"):
        build(base, tmp_path / "a", condition_key="stim")
    with pytest.raises(ValueError, match="no cell has condition == 'ctrl'.*control_value"):
        build(base, tmp_path / "b", control_value="ctrl")
    missing = adata.copy()
    missing.obs["condition"] = missing.obs["condition"].astype(object)
    missing.obs.iloc[4, missing.obs.columns.get_loc("condition")] = None
    missing.write_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(ValueError, match="1 cells have no 'condition' value"):
        build(tmp_path / "missing.h5ad", tmp_path / "c")
    orphan = adata[~((adata.obs["cell_type"] == "monocyte") & (adata.obs["condition"] == "control"))].copy()
    orphan.write_h5ad(tmp_path / "orphan.h5ad")
    with pytest.raises(ValueError, match="no control cells .* for cell_type 'monocyte', donor 'd1'"):
        build(tmp_path / "orphan.h5ad", tmp_path / "d", pair_key="donor")
    plain = InstructCellDatasetBuilder(
        config_name="prp-instruct",
        cache_dir=str(tmp_path / "e"),
        sources=[AnnDataSource(str(base), task="prp")],
        gene_vocab=GENES,
        progress=False,
    )
    with pytest.raises(ValueError, match="describe the file with datasets_builder.PerturbationSource"):
        plain.download_and_prepare()
    with pytest.raises(ValueError, match="name of the control rows"):
        PerturbationSource(str(base), task="prp", perturbation="No perturbation")


def test_vae_encodes_the_source_cell_and_keeps_its_library(model):
    vae = model.cell_vae
    counts = torch.poisson(torch.full((4, len(GENES)), 3.0))
    source = torch.poisson(torch.full((4, len(GENES)), 8.0))
    has_source = torch.tensor([True, True, False, False])
    condition = vae.map_condition(torch.randn(4, model.config.text_config.hidden_size))
    out = vae.inference(counts, condition, source, has_source)
    expected = torch.log(source.sum(-1, keepdim=True))
    assert torch.allclose(out[VAE_KEYS.library][:2], expected[:2])
    plain = vae.inference(source, condition)
    assert torch.allclose(out[VAE_KEYS.qz].loc[:2], plain[VAE_KEYS.qz].loc[:2])  # z read from the source
    loss = vae.loss(counts, out, vae.generative(out[VAE_KEYS.z], out[VAE_KEYS.library], condition))
    assert (loss.kl_library[:2] == 0).all() and (loss.kl_library[2:] > 0).all()


def test_transfer_sampling_is_seeded_and_follows_the_source():
    torch.manual_seed(0)
    vae = InstructCellConditionalVAE(
        len(GENES), 8, n_latent=4, n_hidden=16, n_layers=1, n_condition=4, adaptive_library=False
    ).eval()
    states = torch.randn(2, 8)
    low, high = torch.ones(2, len(GENES)), torch.full((2, len(GENES)), 60.0)

    def sample(source, has_source=None):
        generator = torch.Generator().manual_seed(0)
        return vae.sample(states, 50, generator=generator, source_counts=source, has_source=has_source)

    assert torch.equal(sample(high), sample(high))
    assert sample(high).sum() > 5 * sample(low).sum()  # the library comes from the source cell
    none = torch.zeros(2, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample(high, none), vae.sample(states, 50, generator=generator))  # prior, same draws


def test_only_prompts_holding_one_cell_are_transferred(model, processor, tester):
    counts = tester.make_counts(3)
    batch = processor(
        text=["What is this {input}?", "Generate a B cell.", "How would {input} respond to {perturbation}?"],
        cells=counts[:2],
        metadata=[{}, {}, {"perturbation": "interferon beta"}],
        text_target=["A T cell.", "<SIGNAL>", "<SIGNAL>"],
        target_cells=counts[1:],
    )
    rows = torch.tensor([1, 2])
    sources, has_source = model.prompt_cells(batch["input_ids"], batch["cell_values"], rows)
    assert has_source.tolist() == [False, True]
    assert torch.equal(sources[1], batch["cell_values"][1])
    transferred = model(**batch).vae_loss
    model.config.vae_encode_input_cell = False
    assert model.prompt_cells(batch["input_ids"], batch["cell_values"], rows)[1].tolist() == [False, False]
    assert not torch.isclose(model(**batch).vae_loss, transferred)


def test_metrics_on_hand_made_cells():
    rng = np.random.default_rng(0)
    control = rng.poisson(5.0, size=(40, 30)).astype(float)
    real = control.copy()
    real[:, :3] *= 8
    control, real = normalize_log1p(control), normalize_log1p(rng.poisson(real).astype(float))
    degs = top_degs(real, control, n=5)
    assert set(degs[:3]) == {0, 1, 2}
    assert mean_r2(real, real) == pytest.approx(1.0)
    assert change_pearson(control, real, control) is None  # no predicted change: undefined
    assert change_pearson(real, real, control) == pytest.approx(1.0)
    assert energy_distance(real[:, :5], real[:, :5]) == pytest.approx(0.0, abs=1e-9)
    good = perturbation_metrics(real, real, control, degs)
    bad = perturbation_metrics(control, real, control, degs)
    assert good["r2_top_degs"] > bad["r2_top_degs"] and good["e_distance"] < bad["e_distance"]
    assert good["mmd"] < bad["mmd"]


def test_additive_baseline_uses_the_other_cell_types_shift(splits):
    rows = datasets.concatenate_datasets(list(splits.values()))
    pairs = rows.filter(lambda p: p != CONTROL_PERTURBATION, input_columns=["perturbation"])
    held_out = np.asarray(pairs["label"]) == "monocyte"
    train, query = pairs.select(np.flatnonzero(~held_out)), pairs.select(np.flatnonzero(held_out))
    n = len(GENES)
    cells = PerturbationCells.from_rows(train, query, GENES)
    predicted, details = BASELINES["additive"].run(cells)
    unchanged, _ = BASELINES["no_change"].run(cells)
    assert details["shift_cell_types"] == {"interferon beta": ["B cell", "T cell"]}
    controls = normalize_log1p(sparse_cells(query, "input", n)).toarray()
    assert np.allclose(unchanged, controls)
    shifts = []
    for cell_type in ("B cell", "T cell"):  # each training type's mean response, then their average
        mine = train.select(np.flatnonzero(np.asarray(train["label"]) == cell_type))
        after = normalize_log1p(sparse_cells(mine, "target", n)).toarray().mean(0)
        shifts.append(after - normalize_log1p(sparse_cells(mine, "input", n)).toarray().mean(0))
    assert np.allclose(predicted, np.clip(controls + np.mean(shifts, axis=0), 0, None))
    assert (predicted[:, RESPONSE_GENES].mean(0) > controls[:, RESPONSE_GENES].mean(0) + 1).all()


def test_known_perturbations_and_control_cells_are_checked():
    assert check_perturbation("Interferon  Beta", ["interferon beta"]) == "interferon beta"
    with pytest.raises(ValueError, match="Unknown perturbation 'TNF'.*trained on \\['interferon beta'\\]"):
        check_perturbation("TNF", ["interferon beta"])
    with pytest.raises(ValueError, match="not trained to predict perturbation responses"):
        check_perturbation("interferon beta", None)
    obs = perturbation_anndata(n_per_group=2).obs
    assert control_cells(obs).size == len(obs)
    assert (obs["condition"].to_numpy()[control_cells(obs, "condition")] == "control").all()
    with pytest.raises(ValueError, match="obs has no column 'stim'"):
        control_cells(obs, "stim")
    no_monocyte = obs[~((obs["cell_type"] == "monocyte") & (obs["condition"] == "control"))]
    with pytest.raises(ValueError, match="No control cells of cell type\\(s\\) \\['monocyte'\\]"):
        control_cells(no_monocyte, "condition", "control", "cell_type")
    missing = obs.copy()
    missing["condition"] = missing["condition"].astype(object)
    missing.iloc[0, missing.columns.get_loc("condition")] = np.nan
    with pytest.raises(ValueError, match="1 cells have no 'condition' value"):
        control_cells(missing, "condition")


@pytest.fixture
def prp_model_dir(model, processor, tmp_path) -> Path:
    """The tiny model, told it knows interferon beta; it always answers <SIGNAL> (forced first token)."""
    model.config.perturbation_names = ["interferon beta", CONTROL_PERTURBATION]
    model.generation_config.forced_bos_token_id = model.config.signal_token_index
    return save_for_hub(model, processor, tmp_path / "model")


@pytest.mark.slow
def test_cli_predicts_integer_cells_per_control_cell_with_figures(prp_model_dir, h5ad, tmp_path, capsys):
    out, figure = tmp_path / "predicted.h5ad", tmp_path / "degs.png"
    argv = ["perturb", str(prp_model_dir), str(h5ad), "--perturbation", "Interferon beta", "-o", str(out)]
    argv += ["--condition-key", "condition", "--cell-type-key", "cell_type", "--n-per-cell", "2", "--quiet"]
    assert cli.main([*argv, "--compare-value", STIM, "--figure", str(figure)]) == 0
    predicted = anndata.read_h5ad(out)
    n_controls = int((anndata.read_h5ad(h5ad).obs["condition"] == "control").sum())
    assert predicted.n_obs == 2 * n_controls and list(predicted.var_names) == GENES
    assert predicted.X.dtype == np.int32 and predicted.X.sum() > 0
    assert set(predicted.obs["perturbation"]) == {"interferon beta"}
    assert predicted.obs["source_cell"].value_counts().eq(2).all()
    assert figure.stat().st_size > 0 and (tmp_path / "degs_counts.png").stat().st_size > 0
    before = out.read_bytes()
    assert cli.main(argv) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main([*argv[:4], "TNF", *argv[5:], "--overwrite"]) == 2
    assert "Unknown perturbation 'TNF'" in capsys.readouterr().err
    assert cli.main([*argv[:5], "-o", str(h5ad), *argv[7:]]) == 2
    assert "is the input file" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_scores_the_model_next_to_the_baselines_per_cell_type(prp_model_dir, splits, tmp_path):
    from stubs import PCAEmbedding

    from datasets_builder import write_gene_vocab
    from instructcell.evaluation.suite import EvaluationConfig, run_evaluation

    data = tmp_path / "data"
    data.mkdir()
    rows = datasets.concatenate_datasets(list(splits.values()))
    for split, selected in (("train", rows), ("test", rows)):  # the hand-made data is too small to split
        datasets.Dataset.from_list(list(selected), features=FEATURES).to_parquet(
            str(data / f"{split}.parquet")
        )
    write_gene_vocab(GENES, data / "gene_vocab.txt")
    config = EvaluationConfig(
        model=prp_model_dir,
        dataset_dir=data,
        output_dir=tmp_path / "eval",
        tasks=["prp"],
        progress=False,
        max_test_cells=None,
    )
    metrics = run_evaluation(config, embedding_factory=PCAEmbedding)
    entry = metrics["scores"]["prp"]["toy"]
    assert set(entry["groups"]) == {f"interferon beta / {t}" for t in TYPES}
    assert entry["methods"]["instructcell"]["signal_rate"] == 1.0
    assert entry["methods"]["instructcell"]["r2_all"] is not None
    assert entry["methods"]["additive"]["r2_top_degs"] > entry["methods"]["no_change"]["r2_top_degs"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert (
        "Perturbation response prediction (test split)" in report and "interferon beta / monocyte" in report
    )
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (tmp_path / "eval" / next(iter(written["figures"].values()))).is_file()


def test_benchmark_chooses_the_design_on_validation_and_reports_test():
    benchmark = load_script("benchmarks/perturbation.py", "perturbation_benchmark")

    def entry(r2: dict[str, float]) -> dict:
        methods = {
            name: {**dict.fromkeys(PERTURBATION_KEYS, 0.5), "r2_top_degs": v, "change_pearson_top_degs": v}
            for name, v in r2.items()
        }
        return {"n_perturbed": 10, "methods": methods}

    validation = {"transfer": 0.9, "prior": 0.5, "no_change": 0.1, "additive": 0.7}
    test = {"transfer": 0.6, "prior": 0.95, "no_change": 0.1, "additive": 0.8}
    results = {t: {"validation": entry(validation), "test": entry(test)} for t in ("B", "T")}
    # the design is chosen on validation, even though the other one is better on test
    assert benchmark.choose_design(results, ["prior", "transfer"]) == "transfer"
    assert benchmark.wins(results, "test", "transfer") == {
        "r2_top_degs": "0 of 2",
        "change_pearson_top_degs": "0 of 2",
    }
    rows = benchmark.summary_rows(results, "test", ["transfer", "additive"])
    assert rows[-2][2:4] == ["transfer", "0.500 ± 0.000"] and rows[-2][4] == "0.600 ± 0.000"


def test_cell_decoder_stage_decodes_prp_targets_from_their_control_cells(model, splits):
    rows = [
        dict(row, condition_states=[0.1] * model.config.text_config.hidden_size) for row in splits["train"]
    ]
    batch = ConditionedCellCollator(len(GENES))(rows[:6])
    assert batch["has_source"].all() and batch["source_cell_values"].shape == (6, len(GENES))
    torch.manual_seed(0)
    transferred = FrozenConditionCellVAE(model.cell_vae, 1.0, encode_input_cell=True)(**batch)["loss"]
    torch.manual_seed(0)
    prior = FrozenConditionCellVAE(model.cell_vae, 1.0, encode_input_cell=False)(**batch)["loss"]
    assert not torch.isclose(transferred, prior)
    cpcg_like = [dict(row, input_gene_indices=[], input_gene_counts=[]) for row in rows[:3]]
    assert "source_cell_values" not in ConditionedCellCollator(len(GENES))(cpcg_like)
