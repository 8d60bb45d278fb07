"""`instructcell train --init_from MODEL`: fine-tune a saved model on data built with its gene vocabulary."""

import io
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GENES
from test_build_data import ensembl_file, tiny_model_folder

from datasets_builder.dataset_folder import dataset_genes
from instructcell.cli import main
from instructcell.hub import load_processor
from instructcell.training import DataArguments, InstructCellTrainingArguments, ModelArguments, run_training


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, base_tokenizer) -> Path:
    return tiny_model_folder(base_tokenizer, tmp_path_factory.mktemp("model") / "final")


@pytest.fixture(scope="module")
def aligned(saved_model, tmp_path_factory) -> tuple[Path, str]:
    """A CELLxGENE-style file built with the saved model's vocabulary (a new cell type, 'gamma cell')."""
    root = tmp_path_factory.mktemp("own")
    path = ensembl_file(root / "islets.h5ad", labels=("alpha cell", "gamma cell"))
    output = root / "data"
    out = io.StringIO()
    argv = ["build-data", output, "--h5ad", path, "--gene-vocab-from", saved_model, "--variant", "instruct"]
    assert main([str(a) for a in [*argv, "--tissue", "pancreas", "--quiet"]], stdout=out) == 0
    return output, out.getvalue()


def test_gene_vocab_from_keeps_the_model_vocabulary_and_reports_the_overlap(aligned):
    output, printed = aligned
    assert dataset_genes(output) == GENES
    # GENE10-GENE39 of the model's 40 genes are in the file (its first 10 genes are MT-G0...)
    assert "vocabulary genes in this file: 30 of 40 (75.0%)" in printed
    assert "accepts files holding 50.0% of them or more" in printed


def _training_args(data: Path, output: Path, init_from: Path | None, **overrides):
    training = dict(
        output_dir=str(output),
        max_steps=12,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        report_to="none",
    )
    training.update(overrides)
    model = ModelArguments(preset="tiny", init_from=None if init_from is None else str(init_from))
    return model, DataArguments(dataset_dir=str(data), tasks="cta"), InstructCellTrainingArguments(**training)


def test_init_from_learns_a_new_label_and_keeps_vocabulary_tokenizer_and_cell_decoder(
    aligned, saved_model, tmp_path
):
    output, _ = aligned
    from modeling_instructcell import InstructCellForConditionalGeneration

    before = InstructCellForConditionalGeneration.from_pretrained(saved_model)
    trainer, tuned_processor, interrupted = run_training(
        *_training_args(output, tmp_path / "run", saved_model)
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert not interrupted and trainer.state.global_step == 12
    assert tuned_processor.feature_extractor.gene_names == GENES
    assert tuned_processor.tokenizer.get_vocab() == load_processor(saved_model).tokenizer.get_vocab()
    tuned = trainer.model
    for name, value in before.cell_vae.state_dict().items():  # CTA data: the cell decoder is untouched
        torch.testing.assert_close(tuned.cell_vae.state_dict()[name], value)
    pairs = zip(tuned.cell_encoder.parameters(), before.cell_encoder.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)  # ... while the cell encoder learns
    losses = [entry["lm_loss"] for entry in trainer.state.log_history if "lm_loss" in entry]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])  # "gamma cell" is an answer it learns to write


def test_init_from_with_lora_trains(aligned, saved_model, tmp_path):
    model_args, data_args, training_args = _training_args(
        aligned[0], tmp_path / "run", saved_model, max_steps=2
    )
    model_args.use_lora = True
    trainer, _, _ = run_training(model_args, data_args, training_args)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert trainer.state.global_step == 2 and hasattr(trainer.model, "merge_and_unload")


def test_init_from_refuses_data_built_with_another_vocabulary(aligned, saved_model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(aligned[0], other)
    (other / "gene_vocab.txt").write_text("".join(f"{g}\n" for g in reversed(GENES)))
    with pytest.raises(ValueError, match="not the 40 genes of .*--gene-vocab-from"):
        run_training(*_training_args(other, tmp_path / "run", saved_model))


def test_init_from_refuses_a_folder_without_processor(aligned, saved_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((saved_model / name).read_bytes())
    with pytest.raises(ValueError, match="has no processor"):
        run_training(*_training_args(aligned[0], tmp_path / "run", bare))


def test_init_from_refuses_a_new_tokenizer(aligned, saved_model, tmp_path):
    model_args, data_args, training_args = _training_args(aligned[0], tmp_path / "run", saved_model)
    model_args.backbone = "google-t5/t5-small"
    with pytest.raises(ValueError, match="drop --backbone"):
        run_training(model_args, data_args, training_args)


def test_init_from_is_a_flag_of_instructcell_train():
    from instructcell.training import parse_training_arguments

    model_args, _, _, _ = parse_training_arguments("default", ["--init-from", "outputs/demo/model"])
    assert model_args.init_from == "outputs/demo/model"
    assert parse_training_arguments("default")[0].init_from is None
