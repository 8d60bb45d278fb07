"""`instructcell build-data` on files as users have them: gene names, labels, species, bad inputs."""

import copy
import hashlib
import io
import json
import re
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import GENES
from synthetic_anndata import make_counts

from datasets_builder.build import _check_shared_genes
from datasets_builder.dataset_folder import dataset_genes, load_split
from datasets_builder.splits import split_of
from instructcell.cli import main
from instructcell.hub import save_for_hub

N_GENES = 600  # enough detected genes per cell for the QC's 200-gene minimum


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    out = io.StringIO()
    status = main([str(a) for a in argv], stdout=out)
    return status, out.getvalue(), capsys.readouterr().err


def ensembl_file(path: Path, labels=("alpha cell", "beta cell"), rare: str | None = None) -> Path:
    """Human cells the CELLxGENE way: Ensembl ids in var_names, symbols in var['feature_name']."""
    adata = make_counts(n_cells=160, n_genes=N_GENES, labels=labels, prefix=path.stem)
    if rare is not None:
        adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories([rare])
        adata.obs.iloc[0, adata.obs.columns.get_loc("cell_type")] = rare
    symbols = adata.var_names.tolist()
    adata.var = pd.DataFrame(
        {"feature_name": pd.Categorical(symbols)}, index=[f"ENSG{i:011d}" for i in range(N_GENES)]
    )
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    mouse = make_counts(n_cells=120, n_genes=N_GENES, species="mouse", prefix="m", seed=1)
    mouse.write_h5ad(root / "mouse.h5ad")
    table = root / "orthologs.tsv"
    table.write_text("mouse_symbol\thuman_symbol\n" + "".join(f"Gene{i}\tGENE{i}\n" for i in range(10, 400)))
    return {
        "ensembl": ensembl_file(root / "pancreas.h5ad", rare="epsilon cell"),
        "mouse": root / "mouse.h5ad",
        "orthologs": table,
        "root": root,
    }


@pytest.fixture(scope="module")
def built(files, tmp_path_factory) -> tuple[Path, str]:
    """Two files of a sources YAML: Ensembl ids + feature_name (a rare label left out); mouse + orthologs."""
    sources = files["root"] / "sources.yaml"
    sources.write_text(
        "sources:\n"
        "  - path: pancreas.h5ad\n    tasks: [cta]\n    tissue: pancreas\n    drop_rare_labels: true\n"
        "  - path: mouse.h5ad\n    tasks: [cta, cpcg]\n"
    )
    output = tmp_path_factory.mktemp("out") / "data"
    out = io.StringIO()
    argv = ["build-data", output, "--sources", sources, "--orthologs", files["orthologs"], "--quiet"]
    assert main([str(a) for a in argv], stdout=out) == 0
    return output, out.getvalue()


def test_build_data_uses_genes_and_labels_as_users_have_them(built, files):
    output, printed = built
    assert sorted(p.name for p in output.iterdir()) == [
        "dataset_info.json",
        "gene_vocab.txt",
        "test.parquet",
        "train.parquet",
        "validation.parquet",
    ]
    assert not output.with_name("data.partial").exists()
    genes = dataset_genes(output)
    assert not any(g.startswith("ENSG") for g in genes) and "GENE100" in genes
    assert "var['feature_name']" in printed
    assert re.search(r"mouse genes: 3\d\d of 5\d\d mapped to human \(ortholog table\)", printed)
    assert "labels left out (too few cells): epsilon cell 1" in printed
    train = load_split(output, "train")
    assert {(t, d) for t, d in zip(train["task"], train["dataset"], strict=True)} == {
        ("cta", "pancreas"),
        ("cta", "mouse"),
        ("cpcg", "mouse"),
    }
    assert "epsilon cell" not in set(train["label"])
    assert all(split_of(d, c) == "train" for d, c in zip(train["dataset"], train["cell_id"], strict=True))
    info = json.loads((output / "dataset_info.json").read_text())
    assert [s["gene_names_from"] for s in info["sources"]] == ["var['feature_name']", "var_names"]


def test_build_data_twice_gives_the_same_rows_and_refuses_to_overwrite(built, files, tmp_path, capsys):
    output, _ = built
    status, _, err = _cli(["build-data", output, "--h5ad", files["mouse"]], capsys)
    assert status == 2 and "exists: pass --overwrite" in err
    again = tmp_path / "again"
    sources = files["root"] / "sources.yaml"
    status, _, _ = _cli(
        ["build-data", again, "--sources", sources, "--orthologs", files["orthologs"], "--quiet"], capsys
    )
    assert status == 0
    for split in ("train", "test"):
        first, second = load_split(output, split).to_pandas(), load_split(again, split).to_pandas()
        pd.testing.assert_frame_equal(first, second)


def tiny_model_folder(tokenizer, folder: Path) -> Path:
    """Save a tiny model as `instructcell train` saves one; its vocabulary is conftest's 40 GENES."""
    from instructcell.training import config_for_processor
    from modeling_instructcell import (
        InstructCellFeatureExtractor,
        InstructCellForConditionalGeneration,
        InstructCellProcessor,
    )

    processor = InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), copy.deepcopy(tokenizer), num_query_tokens=4
    )
    torch.manual_seed(0)
    model = InstructCellForConditionalGeneration(config_for_processor("tiny", processor))
    return save_for_hub(model, processor, folder)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, base_tokenizer) -> Path:
    return tiny_model_folder(base_tokenizer, tmp_path_factory.mktemp("model") / "final")


# ------------------------------------------------------------------------------------------ bad inputs
def _refused(argv: list, output: Path, inputs: list[Path], capsys) -> str:
    """Run build-data, expect `error: ...` and status 2, nothing written and the inputs untouched."""
    hashes = [_sha1(p) for p in inputs]
    status, printed, err = _cli(["build-data", output, *argv, "--quiet"], capsys)
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err, (printed, err)
    assert not output.exists() and not output.with_name(output.name + ".partial").exists()
    assert [_sha1(p) for p in inputs] == hashes
    return err


def test_no_label_column_names_the_flag(files, tmp_path, capsys):
    err = _refused(
        ["--h5ad", files["mouse"], "--label-key", "celltype"], tmp_path / "out", [files["mouse"]], capsys
    )
    assert "no obs column 'celltype'" in err and "--label-key" in err and "'cell_type'" in err


def test_a_label_with_one_cell_is_an_error_that_says_what_to_do(files, tmp_path, capsys):
    path = files["ensembl"]
    err = _refused(["--h5ad", path], tmp_path / "out", [path], capsys)
    assert "'epsilon cell': 1 cell" in err and "--drop-rare-labels" in err and "--min-cells-per-label" in err


def test_log_normalized_counts_are_refused(files, tmp_path, capsys):
    adata = make_counts(n_cells=40, n_genes=50)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    err = _refused(["--h5ad", path], tmp_path / "out", [path], capsys)
    assert "non-integer" in err and "--layer counts" in err


def test_genes_outside_the_model_vocabulary_are_refused(saved_model, tmp_path, capsys):
    adata = make_counts(n_cells=80, n_genes=N_GENES)
    adata.var_names = [f"OTHER{i}" for i in range(N_GENES)]
    path = tmp_path / "other.h5ad"
    adata.write_h5ad(path)
    err = _refused(["--h5ad", path, "--gene-vocab-from", saved_model], tmp_path / "out", [path], capsys)
    assert "holds 0 of the" in err and "--orthologs" in err and "without --gene-vocab-from" in err


def test_a_model_folder_without_processor_is_refused(files, saved_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((saved_model / "config.json").read_bytes())
    err = _refused(
        ["--h5ad", files["mouse"], "--gene-vocab-from", bare], tmp_path / "out", [files["mouse"]], capsys
    )
    assert "has no processor" in err and "processor.save_pretrained" in err


def test_files_that_name_genes_differently_are_refused(files, tmp_path, capsys):
    adata = anndata.read_h5ad(files["mouse"])
    adata.var_names = [f"ENSMUSG{i:011d}" for i in range(adata.n_vars)]  # ids, no symbol column
    path = tmp_path / "ids.h5ad"
    adata.write_h5ad(path)
    ensembl = files["ensembl"]
    argv = ["--h5ad", ensembl, "--h5ad", path, "--drop-rare-labels", "--orthologs", files["orthologs"]]
    err = _refused(argv, tmp_path / "out", [ensembl, path], capsys)
    assert "share only" in err and "of the smaller side" in err


def test_a_gene_panel_inside_a_whole_transcriptome_is_accepted():
    whole = {f"GENE{i}" for i in range(20_000)}
    panel = {f"GENE{i}" for i in range(0, 20_000, 20)}  # 1,000 genes: 5% of the whole, all of the panel
    _check_shared_genes({"whole": whole, "panel": panel})
    with pytest.raises(ValueError, match="share only 0 genes"):
        _check_shared_genes({"whole": whole, "ids": {f"ENSG{i:011d}" for i in range(1_000)}})


def test_missing_species_and_task_errors(files, tmp_path, capsys):
    adata = make_counts(n_cells=40, n_genes=50)
    del adata.obs["species"]
    path = tmp_path / "nospecies.h5ad"
    adata.write_h5ad(path)
    assert "(--species / species=...)" in _refused(["--h5ad", path], tmp_path / "out", [path], capsys)
    assert "Unknown task 'cell_type'" in _refused(
        ["--h5ad", path, "--task", "cell_type"], tmp_path / "out", [path], capsys
    )


def test_too_few_labels_left_is_refused_before_any_work(files, tmp_path, capsys):
    adata = make_counts(n_cells=40, n_genes=50, labels=("common", "rare"))
    adata.obs["cell_type"] = pd.Categorical(["common"] * 39 + ["rare"])
    path = tmp_path / "one_label.h5ad"
    adata.write_h5ad(path)
    err = _refused(["--h5ad", path, "--drop-rare-labels"], tmp_path / "out", [path], capsys)
    assert "1 label(s) of 'cell_type' have 20 cells or more" in err and "cta needs two" in err


def test_multicell_adds_the_conversation_tasks_to_every_annotation_source(files, tmp_path, capsys):
    from instructcell.cli import build_parser
    from instructcell.cli.build_data import collect_sources
    from instructcell.tasks import tasks_of_family

    sources = files["root"] / "multicell_sources.yaml"
    sources.write_text(
        "sources:\n  - path: pancreas.h5ad\n    tasks: [cta]\n  - path: mouse.h5ad\n    tasks: [cpcg]\n"
    )
    args = build_parser().parse_args(
        ["build-data", str(tmp_path / "out"), "--sources", str(sources), "--multicell"]
    )
    by_name = {source.name: source.tasks for source in collect_sources(args)[0]}
    assert by_name == {"pancreas": ("cta", *tasks_of_family("multicell")), "mouse": ("cpcg",)}
    err = _refused(["--h5ad", files["mouse"], "--task", "cpcg", "--multicell"], tmp_path / "out", [], capsys)
    assert "--multicell adds tasks to the sources of cell type annotation" in err


def test_the_example_script_passes_multicell_on(monkeypatch):
    from script_modules import load_script

    seen = []
    script = load_script("examples/build_dataset.py", "build_dataset_example")
    monkeypatch.setattr(script, "instructcell", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr("sys.argv", ["build_dataset.py", "--data-dir", "d", "--output", "o", "--multicell"])
    assert script.main() == 0
    assert seen[0][:4] == ["build-data", "o", "--shared-datasets", "d"] and "--multicell" in seen[0]
