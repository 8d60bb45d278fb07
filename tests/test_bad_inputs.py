"""Hostile inputs through every CLI command, the Python API and the pipeline.

Each case ends in either a clear error (CLI: exit status 2, ``error: ...`` and no traceback; Python: a
``ValueError`` with the expected message) or a correct result, and in both cases no file changes except the
output the case asked for (every file of the case's folder and of the model folder is hashed before and
after).
"""

import hashlib
import io
import shlex
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import CORPUS, GENES, InstructCellModelTester
from synthetic_anndata import make_counts

from instructcell import cli, inference
from instructcell.hub import save_for_hub
from instructcell.training import train_instruction_tokenizer
from modeling_instructcell import InstructCellFeatureExtractor, InstructCellPipeline, InstructCellProcessor
from modeling_instructcell.pipeline_instructcell import TASK, PromptTooLongError

LONG = "cell " * 2000  # about 2,000 tokens: over the 1,024-token default limit


def _write_inputs(folder: Path) -> None:
    """The case files: one valid dataset, hostile variants of it, conditions tables, a folder."""
    base = make_counts(n_cells=6, n_genes=50, labels=("T cell", "B cell"))
    base.obs["drug"] = "erlotinib"
    base.write_h5ad(folder / "cells.h5ad")
    base.write_h5ad(folder / "other.h5ad")  # someone's existing file
    dense = base.copy()
    dense.X = dense.X.toarray().astype(np.float32)
    variants = {
        "nan": lambda x: x.__setitem__((2, 5), np.nan),
        "inf": lambda x: x.__setitem__((1, 3), -np.inf),
        "negative": lambda x: x.__setitem__((4, 0), -1.0),
        "lognorm": lambda x: np.log1p(x, out=x),
        # genes absent from one batch of an outer join: NaN over half the cells
        "outer": lambda x: x.__setitem__((slice(0, 3), slice(30, 50)), np.nan),
    }
    for name, damage in variants.items():
        copy = dense.copy()
        damage(copy.X)
        copy.write_h5ad(folder / f"{name}.h5ad")
    raw = (folder / "cells.h5ad").read_bytes()
    (folder / "truncated.h5ad").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.h5ad").write_bytes(b"")
    (folder / "text.h5ad").write_text("cell_type,count\nB cell,3\n")
    base[:0].copy().write_h5ad(folder / "zero_cells.h5ad")
    unknown = base.copy()
    unknown.var_names = [f"X{i}" for i in range(unknown.n_vars)]
    unknown.write_h5ad(folder / "unknown_genes.h5ad")
    gaps = base.copy()
    gaps.obs["species"] = pd.Series(["human", None, "human", None, "human", "human"], index=gaps.obs_names)
    gaps.write_h5ad(folder / "species_gaps.h5ad")
    no_drug = base.copy()
    del no_drug.obs["drug"]
    no_drug.write_h5ad(folder / "no_drug.h5ad")
    (folder / "conditions.csv").write_text("cell_type,species,tissue\nB cell,human,blood\nT cell,,\n")
    (folder / "no_cell_type.csv").write_text("species\nhuman\n")
    (folder / "empty.csv").write_text("")
    (folder / "afolder").mkdir()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny preset saved in the Hub layout, and the case files to copy into each case's folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = train_instruction_tokenizer(CORPUS, vocab_size=300)
    processor = InstructCellProcessor(
        InstructCellFeatureExtractor(gene_names=GENES), tokenizer, num_query_tokens=4
    )
    model = InstructCellModelTester(processor).make_model()
    save_for_hub(model, processor, root / "model")
    # the same model answering every message with <SIGNAL>: chat then samples cells to save
    vocab_size = model.get_output_embeddings().weight.shape[0]
    signal = model.config.signal_token_index
    model.generation_config.suppress_tokens = [i for i in range(vocab_size) if i != signal]
    save_for_hub(model, processor, root / "signal_model")
    (root / "inputs").mkdir()
    _write_inputs(root / "inputs")
    return root


@pytest.fixture
def case_dir(workspace, tmp_path, monkeypatch):
    folder = tmp_path / "case"
    shutil.copytree(workspace / "inputs", folder)
    monkeypatch.chdir(folder)
    return folder


def _hashes(*folders: Path) -> dict[Path, str]:
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _run_cli(argv, stdin="", capsys=None):
    out = io.StringIO()
    try:
        code = cli.main(argv, stdin=io.StringIO(stdin), stdout=out)
    except SystemExit as exit_:  # argparse rejects a flag value
        code = exit_.code
    return code, out.getvalue(), capsys.readouterr().err


def case(name, command, code, expected, output=None, stdin="quit\n", model="model"):
    """One CLI case: the command line without the model, its exit status, the text expected in stderr (on an
    error) or stdout, the one file it may write, and the workspace's model folder it runs."""
    return pytest.param(shlex.split(command), stdin, code, expected, output, model, id=name)


def chat_save(name, target, expected, output=None):
    """A chat that generates three cells (its model answers ``<SIGNAL>``) and saves them to ``target``."""
    stdin = f"generate 3 B cells\nsave generated to {target}\nquit\n"
    return case(name, "chat cells.h5ad --max-new-tokens 2", 0, expected, output, stdin, model="signal_model")


L = '--labels "T cell,B cell" --quiet'
CLI_CASES = [
    case("missing input", f"annotate missing.h5ad -o out.h5ad {L}", 2, "No such file"),
    case("empty file", f"annotate empty.h5ad -o out.h5ad {L}", 2, "Cannot read"),
    case("truncated file", f"annotate truncated.h5ad -o out.h5ad {L}", 2, "Cannot read"),
    case("text as .h5ad", f"annotate text.h5ad -o out.h5ad {L}", 2, "Cannot read"),
    case("NaN counts", f"annotate nan.h5ad -o out.h5ad {L}", 2, r"must be finite.*cells \[2\]"),
    case("-inf counts", f"annotate inf.h5ad -o out.h5ad {L}", 2, "must be finite"),
    case("negative counts", f"annotate negative.h5ad -o out.h5ad {L}", 2, "non-negative"),
    case("log-normalized", f"annotate lognorm.h5ad -o out.h5ad {L}", 2, "must be integers"),
    case("outer join NaN", f"annotate outer.h5ad -o out.h5ad {L}", 2, "must be finite"),
    case("zero cells", f"annotate zero_cells.h5ad -o out.h5ad {L}", 2, "0 cells"),
    case("unknown genes", f"annotate unknown_genes.h5ad -o o.h5ad {L}", 2, "vocabulary genes"),
    case("missing layer", f"annotate cells.h5ad -o o.h5ad --layer raw {L}", 2, "Unknown layer"),
    case("output is a folder", f"annotate cells.h5ad -o afolder {L}", 2, "is a folder"),
    case("output under a file", f"annotate cells.h5ad -o cells.h5ad/o.h5ad {L}", 2, "not a folder"),
    case("output exists", f"annotate cells.h5ad -o other.h5ad {L}", 2, "already exists; pass --overwrite"),
    case(
        "--overwrite",
        f"annotate cells.h5ad -o other.h5ad --overwrite {L}",
        0,
        "wrote other.h5ad",
        "other.h5ad",
    ),
    case("in place", f"annotate cells.h5ad -o cells.h5ad {L}", 0, "wrote cells.h5ad", "cells.h5ad"),
    case("format change", f"annotate cells.h5ad -o out.zarr {L}", 2, "input's format"),
    case("chunk size 0", f"annotate cells.h5ad -o o.h5ad --chunk-size 0 {L}", 2, "at least 1"),
    case("chunk size text", f"annotate cells.h5ad -o o.h5ad --chunk-size ten {L}", 2, "whole number"),
    case("batch size -3", f"annotate cells.h5ad -o o.h5ad --batch-size -3 {L}", 2, "at least 1"),
    case("0 workers", f"annotate cells.h5ad -o o.h5ad --num-workers 0 {L}", 2, "at least 1"),
    case("0 threads", f"annotate cells.h5ad -o o.h5ad --threads 0 {L}", 2, "at least 1"),
    case("0 new tokens", f"annotate cells.h5ad -o o.h5ad --max-new-tokens 0 {L}", 2, "at least 1"),
    case("empty label", 'annotate cells.h5ad -o o.h5ad --labels "T cell,,B cell"', 2, "empty entry"),
    case("repeated label", 'annotate cells.h5ad -o o.h5ad --labels "T cell,T cell"', 2, "repeats"),
    case("one label", 'annotate cells.h5ad -o o.h5ad --labels "T cell"', 2, "at least two"),
    case(
        "confusable labels", 'annotate cells.h5ad -o o.h5ad --labels "α cell,β cell"', 2, "same to this model"
    ),
    case("two label sets", f"annotate cells.h5ad -o o.h5ad --labels-from-obs cell_type {L}", 2, "not both"),
    case("label column missing", "annotate cells.h5ad -o o.h5ad --labels-from-obs celltype", 2, "no column"),
    case(
        "labels from a truncated file",
        "annotate truncated.h5ad -o o.h5ad --labels-from-obs c",
        2,
        "Cannot read",
    ),
    case(
        "labels from obs",
        "annotate cells.h5ad -o o.h5ad --labels-from-obs cell_type --quiet",
        0,
        "wrote",
        "o.h5ad",
    ),
    case(
        "{choices} from --labels",
        f"annotate cells.h5ad -o o.h5ad --template 'Which of {{choices}}? {{input}}' {L}",
        0,
        "wrote o.h5ad",
        "o.h5ad",
    ),
    case("no cell slot", f"annotate cells.h5ad -o o.h5ad --template 'What is it?' {L}", 2, "cell slots"),
    case(
        "placeholder without a column",
        f"annotate cells.h5ad -o o.h5ad --template 'A {{organ}}? {{input}}' {L}",
        2,
        r"needs \{organ\}",
    ),
    case(
        "placeholder with gaps",
        f"annotate species_gaps.h5ad -o o.h5ad --template '{{species}} {{input}}' {L}",
        2,
        "2 cells lack it",
    ),
    case(
        "empty placeholder",
        f"annotate cells.h5ad -o o.h5ad --template 'A {{}} cell? {{input}}' {L}",
        2,
        "empty",
    ),
    case(
        "instruction too long",
        f"annotate cells.h5ad -o o.h5ad --template '{LONG}{{input}}' {L}",
        2,
        "tokens long",
    ),
    case(
        "free text",
        "annotate cells.h5ad -o o.h5ad --method generate --max-new-tokens 2 --quiet",
        0,
        "wrote",
        "o.h5ad",
    ),
    case("no {drug}", "predict-drug no_drug.h5ad -o o.h5ad --quiet", 2, r"needs \{drug\}"),
    case(
        "drug response", "predict-drug no_drug.h5ad -o o.h5ad --drug erlotinib --quiet", 0, "wrote", "o.h5ad"
    ),
    case("0 cells", "generate -o g.h5ad --cell-type 'B cell' --n-cells 0", 2, "at least 1"),
    case("library size 0", "generate -o g.h5ad --cell-type 'B cell' --library-size 0", 2, "at least 1"),
    case("library size 2.5", "generate -o g.h5ad --cell-type 'B cell' --library-size 2.5", 2, "whole number"),
    case("seed -1", "generate -o g.h5ad --cell-type 'B cell' --seed -1", 2, "at least 0"),
    case("no condition", "generate -o g.h5ad", 2, "Give --cell-type"),
    case(
        "two condition sources", "generate -o g.h5ad --cell-type T --conditions conditions.csv", 2, "not both"
    ),
    case("conditions file missing", "generate -o g.h5ad --conditions none.csv", 2, "No such conditions file"),
    case("no cell_type column", "generate -o g.h5ad --conditions no_cell_type.csv", 2, "needs a cell_type"),
    case("empty conditions file", "generate -o g.h5ad --conditions empty.csv", 2, "Cannot read"),
    case("generated output exists", "generate -o cells.h5ad --cell-type 'B cell'", 2, "already exists"),
    case("generated output is a folder", "generate -o afolder --cell-type 'B cell'", 2, "is a folder"),
    case(
        "conditions with gaps",
        "generate -o g.h5ad --conditions conditions.csv --n-cells 2 --max-new-tokens 2",
        0,
        "4 cells",
        "g.h5ad",
    ),
    case("chat on a truncated file", "chat truncated.h5ad", 2, "Cannot read"),
    case("chat label column missing", "chat cells.h5ad --labels-from-obs celltype", 2, "no column"),
    case("chat bad numbers", "chat cells.h5ad --history-turns -1", 2, "at least 0"),
    chat_save("chat saves over its dataset", "cells.h5ad", "never replaced here"),
    chat_save("chat saves over a file", "other.h5ad", "never replaced here"),
    chat_save("chat saves under a file", "cells.h5ad/g.h5ad", "not a folder"),
    chat_save("chat saves a new file", "new/g.h5ad", "Saved 3 generated cells", output="new/g.h5ad"),
    case(
        "chat message too long",
        "chat cells.h5ad --max-new-tokens 2",
        0,
        "tokens long",
        stdin=f"{LONG}\nquit\n",
    ),
    case(
        "chat history too long",
        "chat cells.h5ad --max-new-tokens 2",
        0,
        "(?s)^(?!.*Sorry).*instructcell>.*instructcell>",
        stdin=f"{'cell ' * 700}\n{'cell ' * 700}\nquit\n",
    ),
]


@pytest.mark.parametrize("argv, stdin, code, expected, output, model_name", CLI_CASES)
def test_cli(workspace, case_dir, capsys, argv, stdin, code, expected, output, model_name):
    model = str(workspace / model_name)
    before = _hashes(case_dir, workspace / model_name)
    got, out, err = _run_cli([argv[0], model, *argv[1:]], stdin, capsys)
    assert "Traceback" not in err
    assert got == code, err
    assert pd.Series([err if code else out]).str.contains(expected, regex=True).iloc[0], (out, err)
    if code:
        assert "error:" in err
    after = _hashes(case_dir, workspace / model_name)
    changed = {path for path in {*before, *after} if before.get(path) != after.get(path)}
    assert changed == ({case_dir / output} if output else set())


def test_cli_results_are_correct(workspace, case_dir, capsys):
    """What the successful hostile cases wrote: choices filled, free text written, conditions per row."""
    model = str(workspace / "model")
    _run_cli(
        shlex.split(
            f"annotate {model} cells.h5ad -o c.h5ad --template 'Which of {{choices}}? {{input}}' {L}"
        ),
        capsys=capsys,
    )
    assert set(anndata.read_h5ad("c.h5ad").obs["instructcell_label"].dropna()) <= {"T cell", "B cell"}
    _run_cli(
        [
            "annotate",
            model,
            "cells.h5ad",
            "-o",
            "free.h5ad",
            "--method",
            "generate",
            "--max-new-tokens",
            "2",
            "--quiet",
        ],
        capsys=capsys,
    )
    free = anndata.read_h5ad("free.h5ad").obs
    assert isinstance(free["instructcell_label"].dtype, pd.CategoricalDtype)
    assert "instructcell_label_probability" not in free  # free text has no probability
    _run_cli(
        [
            "generate",
            model,
            "-o",
            "g.h5ad",
            "--conditions",
            "conditions.csv",
            "--species",
            "mouse",
            "--n-cells",
            "2",
            "--max-new-tokens",
            "2",
            "--quiet",
        ],
        capsys=capsys,
    )
    obs = anndata.read_h5ad("g.h5ad").obs
    assert list(obs["species"]) == ["human", "human", "mouse", "mouse"]  # a flag fills a row's gap
    assert obs["tissue"].isna().tolist() == [False, False, True, True]  # never the word "nan"


@pytest.fixture
def pipe(tester, model):
    return InstructCellPipeline(model=model, processor=tester.processor, task=TASK)


def _cells(n=4, seed=0):
    adata = make_counts(n_cells=n, n_genes=50, labels=("T cell", "B cell"), seed=seed)
    adata.X = adata.X.toarray().astype(np.float32)
    return adata


def _with(value, at=(1, 2)):
    adata = _cells()
    adata.X[at] = value
    return adata


CTA = "What is the cell type of this cell? {input}"
TWO = ["T cell", "B cell"]


def call(name, message, error=ValueError, instruction=CTA, **kwargs):
    """One pipeline case: the call's instruction and keyword arguments, the error and its message."""
    return pytest.param(instruction, kwargs, error, message, id=name)


PIPELINE_CASES = [
    call("NaN cell", "finite", cells=_with(np.nan), labels=TWO),
    call("negative cell", "non-negative", cells=_with(-2.0), labels=TWO),
    call("confusable labels", "same to this model", cells=_cells(), labels=["α cell", "β cell"]),
    call("labels as one string", "not one string", cells=_cells(), labels="T cell"),
    call("batch size 0", "at least 1", cells=_cells(), labels=TWO, batch_size=0),
    call("batch size 2.5", "whole", cells=_cells(), labels=TWO, batch_size=2.5),
    call("too long", "tokens long", PromptTooLongError, LONG + "{input}", cells=_cells()),
    call("no cells for a slot", "cell slots"),
    call("NaN metadata", "needs values", instruction="A {species} cell.", metadata={"species": np.nan}),
    call("0 cells sampled", "num_cells", instruction="Generate a B cell.", num_cells=0, force_signal=True),
]


@pytest.mark.parametrize("instruction, kwargs, error, message", PIPELINE_CASES)
def test_pipeline(pipe, instruction, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(instruction, max_new_tokens=2, **kwargs)


def test_pipeline_fills_choices_from_the_label_set(pipe, monkeypatch):
    seen = []
    original = type(pipe.processor).fill_template

    def spy(self, template, metadata=None):
        seen.append(original(self, template, metadata))
        return seen[-1]

    monkeypatch.setattr(type(pipe.processor), "fill_template", spy)
    out = pipe(
        "Which of {choices} is it? {input}", cells=_cells(2), labels=["T cell", "B cell"], generate=False
    )
    assert seen[0] == "Which of T cell, B cell is it? <CELL>" and {r["label"] for r in out} <= {
        "T cell",
        "B cell",
    }


B_CELL = [{"cell_type": "B cell"}]


def api(name, function, message, **kwargs):
    """One Python API case: the function of ``instructcell.inference``, its arguments, the error message."""
    return pytest.param(function, kwargs, message, id=name)


API_CASES = [
    api("in-memory NaN is refused, not skipped", "annotate", "finite", data=_with(np.nan), labels=TWO),
    api("chunk size 0", "annotate", "chunk_size", data=_cells(), labels=TWO, chunk_size=0),
    api("chunk size True", "annotate", "chunk_size", data=_cells(), labels=TWO, chunk_size=True),
    api("same column twice", "annotate", "must differ", data=_cells(), probability_key="instructcell_label"),
    api("file without output", "annotate", "needs output", data="cells.h5ad", labels=TWO),
    api("output exists", "annotate", "already exists", data=_cells(), labels=TWO, output="other.h5ad"),
    api("n_cells 0", "generate_cells", "n_cells", conditions=B_CELL, n_cells=0),
    api("n_cells 1.5", "generate_cells", "n_cells", conditions=B_CELL, n_cells=1.5),
    api("library size 0", "generate_cells", "library_size", conditions=B_CELL, library_size=0),
    api("library size NaN", "generate_cells", "library_size", conditions=B_CELL, library_size=float("nan")),
    api("library size 2.5", "generate_cells", "library_size", conditions=B_CELL, library_size=2.5),
    api("seed -1", "generate_cells", "seed", conditions=B_CELL, seed=-1),
    api("no conditions", "generate_cells", "at least one condition", conditions=[]),
    api("a string condition", "generate_cells", "list of dicts", conditions="B cell"),
    api("no cell type", "generate_cells", "no cell_type", conditions=[{"species": "human"}]),
    api("NaN cell type", "generate_cells", "no cell_type", conditions=[{"cell_type": np.nan}]),
    api(
        "generated output exists", "generate_cells", "already exists", conditions=B_CELL, output="other.h5ad"
    ),
]


@pytest.mark.parametrize("function, kwargs, message", API_CASES)
def test_api(pipe, case_dir, function, kwargs, message):
    before = _hashes(case_dir)
    with pytest.raises(ValueError, match=message):
        getattr(inference, function)(pipe, progress=False, **kwargs)
    assert _hashes(case_dir) == before


def test_load_pipeline_says_what_is_wrong(case_dir):
    with pytest.raises(ValueError, match="No model folder at"):
        inference.load_pipeline(case_dir / "no_model")
    with pytest.raises(ValueError, match="not a model folder"):
        inference.load_pipeline(case_dir / "cells.h5ad")
    with pytest.raises(ValueError, match="not a model folder"):
        inference.load_pipeline(case_dir / "afolder")
    with pytest.raises(ValueError, match="dtype must be one of"):
        inference.load_pipeline(case_dir / "afolder", dtype="fp16")


def test_a_model_folder_without_its_processor_is_named(case_dir, model):
    model.save_pretrained(case_dir / "bare_model")  # the weights only, as model.save_pretrained writes them
    with pytest.raises(ValueError, match="has no processor"):
        inference.load_pipeline(case_dir / "bare_model")


def test_each_condition_gets_its_own_prompt_and_no_nan(pipe, monkeypatch):
    prompts = []
    original = InstructCellPipeline.__call__

    def spy(self, instruction, *args, **kwargs):
        filled = [self.processor.fill_template(instruction, m) for m in kwargs["metadata"]]
        prompts.extend(filled)
        return original(self, instruction, *args, **kwargs)

    monkeypatch.setattr(InstructCellPipeline, "__call__", spy)
    conditions = pd.DataFrame(
        {
            "cell_type": ["naive B", "T", "naive B"],
            "species": ["human", np.nan, "mouse"],
            "tissue": [None, "blood", ""],
        }
    )
    adata = inference.generate_cells(pipe, conditions, n_cells=2, max_new_tokens=2, progress=False)
    assert sorted(prompts) == [
        "Generate a T cell from blood.",
        "Generate a naive B cell from human.",
        "Generate a naive B cell from mouse.",
    ]
    assert list(adata.obs["condition_index"]) == [0, 0, 1, 1, 2, 2]
    assert adata.obs["species"].isna().tolist() == [False, False, True, True, False, False]
    assert not any("nan" in prompt for prompt in prompts)


def test_library_size_is_the_total_of_every_generated_cell(pipe):
    def generate():
        conditions = [{"cell_type": "B cell"}, {"cell_type": "T cell"}]
        return inference.generate_cells(
            pipe, conditions, n_cells=20, library_size=5000, seed=3, max_new_tokens=2, progress=False
        )

    adata = generate()
    assert (np.asarray(adata.X.sum(axis=1)).ravel() == 5000).all()
    assert (generate().X != adata.X).nnz == 0  # the same call gives the same cells
    assert sp.issparse(adata.X) and adata.X.dtype == np.int32
