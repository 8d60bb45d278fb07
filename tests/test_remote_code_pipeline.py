"""`pipeline(model=<folder>, trust_remote_code=True)` in a process that cannot import the package (c3)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from instructcell.hub import save_for_hub
from modeling_instructcell import InstructCellPipeline
from modeling_instructcell.pipeline_instructcell import TASK

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_instructcell", "instructcell"):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if p not in ("", ".") and "tests" not in p]
    import numpy as np
    from transformers import pipeline

    pipe = pipeline(model=sys.argv[1], trust_remote_code=True)
    counts = np.load(sys.argv[2])
    out = pipe("What cell type is this {species} cell from {tissue}? {input}", cells=counts,
               metadata={"species": "human", "tissue": "blood"}, labels=["T cell", "B cell"],
               max_new_tokens=3, batch_size=2)
    gen = pipe("Generate a {cell_type} cell.", metadata={"cell_type": "B cell"}, num_cells=2,
               force_signal=True, max_new_tokens=2, seed=0)
    print(json.dumps({
        "modules": [type(pipe).__module__, type(pipe.model).__module__, type(pipe.processor).__module__],
        "loaded": sorted(m for m in sys.modules
                         if m.split(".")[0] in ("modeling_instructcell", "instructcell")),
        "answers": [r["answer"] for r in out],
        "probabilities": [r["label_probabilities"] for r in out],
        "generated_shape": list(gen[0]["cells"].shape),
    }))
    """
)


def test_pipeline_loads_as_remote_code_in_a_clean_process(model, tester, tmp_path):
    folder = save_for_hub(model, tester.processor, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_instructcell.InstructCellPipeline"
    assert (folder / "pipeline_instructcell.py").is_file() and (folder / "processor_config.json").is_file()
    counts = tester.make_counts(3)
    np.save(tmp_path / "counts.npy", counts)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "counts.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    child = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in child["modules"]), child["modules"]
    assert child["loaded"] == []
    assert child["generated_shape"] == [2, tester.config.n_genes]

    local = InstructCellPipeline(model=model, processor=tester.processor, task=TASK)(
        "What cell type is this {species} cell from {tissue}? {input}",
        cells=counts,
        gene_names=None,
        metadata={"species": "human", "tissue": "blood"},
        labels=["T cell", "B cell"],
        max_new_tokens=3,
    )
    assert child["answers"] == [r["answer"] for r in local]
    for theirs, ours in zip(child["probabilities"], local, strict=True):
        assert np.allclose(list(theirs.values()), list(ours["label_probabilities"].values()), atol=1e-5)
