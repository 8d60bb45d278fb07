"""Tiny, offline fixtures: a tokenizer trained on a few instructions, 40 genes, the tiny preset."""

import copy

import numpy as np
import pytest
import torch

from instructcell.training import config_for_processor, train_instruction_tokenizer
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

GENES = [f"GENE{i}" for i in range(40)]
CTA_TEMPLATE = "What cell type is this {species} cell from {tissue}? {input}"
DSP_TEMPLATE = "Is this {species} cell sensitive or resistant to {drug}? {input} Options: {choices}."
CPCG_TEMPLATE = "Generate a {cell_type} cell from {species} {tissue}, sequenced with {sequencing_method}."
CORPUS = [
    CTA_TEMPLATE,
    DSP_TEMPLATE,
    CPCG_TEMPLATE,
    "This is a T cell.",
    "This is a B cell.",
    "The cell is sensitive.",
    "The cell is resistant.",
    "Here is the cell you asked for: <SIGNAL>",
    "human mouse liver blood pancreas erlotinib 10x Genomics sensitive resistant holiday T cell B cell",
] * 8


class InstructCellModelTester:
    """Builds the tiny config, model and a batch with one example per task (as transformers' testers do)."""

    def __init__(self, processor: InstructCellProcessor):
        self.processor = processor
        self.config = config_for_processor("tiny", processor)

    def make_model(self, seed: int = 0) -> InstructCellForConditionalGeneration:
        torch.manual_seed(seed)
        return InstructCellForConditionalGeneration(self.config).eval()

    @staticmethod
    def make_counts(n_cells: int, seed: int = 0, n_genes: int = len(GENES)) -> np.ndarray:
        rng = np.random.default_rng(seed)
        counts = rng.poisson(rng.gamma(0.8, 3.0, size=(n_cells, n_genes)))
        counts[:, 0] += 1  # no empty cells
        return counts

    def task_batch(self, seed: int = 0):
        """CTA, DSP and CPCG examples: two input cells, one target cell for the <SIGNAL>."""
        counts = self.make_counts(3, seed)
        return self.processor(
            text=[CTA_TEMPLATE, DSP_TEMPLATE, CPCG_TEMPLATE],
            cells=counts[:2],
            metadata=[
                {"species": "human", "tissue": "liver"},
                {"species": "human", "drug": "erlotinib", "choices": ["sensitive", "resistant"]},
                {
                    "cell_type": "B cell",
                    "species": "human",
                    "tissue": "blood",
                    "sequencing_method": "10x Genomics",
                },
            ],
            text_target=[
                "This is a T cell.",
                "The cell is resistant.",
                "Here is the cell you asked for: <SIGNAL>",
            ],
            target_cells=counts[2:],
        )


@pytest.fixture(scope="session")
def base_tokenizer():
    return train_instruction_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def processor(base_tokenizer) -> InstructCellProcessor:
    return InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), copy.deepcopy(base_tokenizer), num_query_tokens=4
    )


@pytest.fixture
def tester(processor) -> InstructCellModelTester:
    return InstructCellModelTester(processor)


@pytest.fixture
def model(tester) -> InstructCellForConditionalGeneration:
    return tester.make_model()
