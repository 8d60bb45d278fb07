"""The scripted five-turn conversation of benchmarks/multicell.py, answered right by a tiny trained model.

The tiny preset is trained here, for a few hundred steps, on synthetic cells of three types: cell type
annotation rows and the rows of the tasks the conversation asks (group composition, more like the first,
and this one, how sure). Every answer of the conversation is the model's own, and each is checked.
"""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import GENES
from multicell_rows import LABELS, multicell_rows, synthetic_cells
from script_modules import load_script

from datasets_builder import AnnDataSource, TemplateBank, example_key, make_example
from datasets_builder.collator import DataCollatorForInstructCell
from datasets_builder.splits import SPLITS, split_of
from instructcell.cli.chat import ChatSession
from instructcell.tasks.multicell import MAX_CELLS_PER_PROMPT
from instructcell.training import config_for_processor, train_instruction_tokenizer
from instructcell.training.build import number_token_ids
from modeling_instructcell import (
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellPipeline,
    InstructCellProcessor,
)
from modeling_instructcell.pipeline_instructcell import TASK

TASKS = ("group_composition", "follow_up_generation", "follow_up_annotation", "follow_up_confidence")
STEPS = 600


def _rows(cells, bank):
    source = AnnDataSource("toy.h5ad", task="cta", name="toy")
    rows = [row for split in SPLITS for task in TASKS for row in multicell_rows(task, split, cells, bank)]
    for cell in cells:
        split = split_of("toy", cell.obs_name)
        key = example_key("cta", "instruct", "toy", cell.obs_name)
        template = bank.choose("cta", "instruct", split, key)
        rows.append(make_example(source, "instruct", cell, split, template, sorted(LABELS), key))
    return rows


def _train(rows, steps: int, seed: int = 0):
    corpus = [row["instruction"] for row in rows] + [row["response"] for row in rows]
    tokenizer = train_instruction_tokenizer(corpus, vocab_size=600)
    processor = InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), tokenizer, num_query_tokens=4
    )
    torch.manual_seed(seed)
    config = config_for_processor(
        "tiny",
        processor,
        vae_loss_weight=0.001,
        alignment_loss_weight=1.0,
        cell_slot_token_ids=number_token_ids(processor, MAX_CELLS_PER_PROMPT),  # as the recipe
    )
    model = InstructCellForConditionalGeneration(config).train()
    collator = DataCollatorForInstructCell(processor, with_cell_captions=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        loss = model(**collator([rows[i] for i in rng.choice(len(rows), 16)])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor


@pytest.mark.slow
@pytest.mark.xfail(
    reason="the tiny model reads each cell but does not reliably tell the conversation's tasks apart: "
    "1-2 of 5 answers right after 600 steps (seeds 0 and 1), 2 of 5 after 2,000 and 3 of 5 after 4,000 "
    "steps at learning rate 2e-3; 2 of 5 with numbered cells and cell-by-cell answers after 600 and 2,000 "
    "steps; the composition never right "
    "(docs/experiments.md, entries 24, 30 and 32)",
    strict=False,
)
def test_five_turn_conversation_is_answered_right_by_the_model(tmp_path):
    cells = synthetic_cells(360, len(GENES), marker_mean=25.0)
    model, processor = _train(_rows(cells, TemplateBank.load()), STEPS)
    counts = np.zeros((len(cells), len(GENES)), np.int32)
    for i, cell in enumerate(cells):
        counts[i, cell.gene_indices] = cell.gene_counts
    obs = pd.DataFrame({"cell_type": [c.label for c in cells]}, index=[c.obs_name for c in cells])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    benchmark = load_script("benchmarks/multicell.py", "multicell_benchmark")
    session = ChatSession(InstructCellPipeline(model=model, processor=processor, task=TASK), adata)
    transcript = benchmark.scripted_chat(
        session, obs["cell_type"].tolist(), benchmark.chat_cells(adata, "toy", 6)
    )
    assert [turn["right"] for turn in transcript] == [True] * 5, transcript
    assert session.respond(f"save generated to {tmp_path / 'more.h5ad'}") == (
        f"Saved 20 generated cells to {tmp_path / 'more.h5ad'}."
    )
    assert anndata.read_h5ad(tmp_path / "more.h5ad").shape == (20, len(GENES))
