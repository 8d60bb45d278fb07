"""The saved folder loads as Hub remote code in a process that cannot import this package (STYLE c3)."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from instructcell.hub import save_for_hub

CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_instructcell", "instructcell", "datasets_builder"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import modeling_instructcell  # noqa: F401
        raise SystemExit("the package should not be importable here")
    except ImportError:
        pass

    import numpy as np, torch
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoProcessor

    folder, request_file = sys.argv[1], sys.argv[2]
    request = json.load(open(request_file))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    seq2seq = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=request["texts"], cells=np.array(request["cells"]), metadata=request["metadata"])
    generated = model.generate(**inputs, max_new_tokens=8)
    cells = model.generate_cells(
        **inputs, max_new_tokens=8, num_cells=2, seed=0, suppress_tokens=request["suppress"]
    )
    print(json.dumps({
        "modules": [
            type(obj).__module__ for obj in (config, model, seq2seq, processor, processor.feature_extractor)
        ],
        "same_class": type(model) is type(seq2seq),
        "generated": generated.tolist(),
        "cell_values": cells.cell_values.tolist(),
    }))
    """
)


def test_remote_code_loads_without_the_package(model, processor, tester, tmp_path):
    folder = save_for_hub(model, processor, tmp_path / "hub")
    saved = sorted(p.name for p in folder.iterdir())
    for name in [
        "modeling_instructcell.py",
        "modeling_cell_vae.py",
        "modeling_cell_encoder.py",
        "configuration_instructcell.py",
        "processing_instructcell.py",
        "feature_extraction_instructcell.py",
        "model.safetensors",
    ]:
        assert name in saved
    counts = tester.make_counts(2, seed=5)
    request = {
        "texts": [
            "What cell type is this {species} cell from {tissue}? {input}",
            "Generate a {cell_type} cell.",
        ],
        "cells": counts[:1].tolist(),
        "metadata": [{"species": "human", "tissue": "liver"}, {"cell_type": "B cell"}],
    }
    # An untrained model rarely says <SIGNAL>: allow only that token so that cells are sampled.
    request["suppress"] = [
        i for i in range(tester.config.text_config.vocab_size) if i != tester.config.signal_token_index
    ]
    (tmp_path / "request.json").write_text(json.dumps(request))
    inputs = processor(text=request["texts"], cells=counts[:1], metadata=request["metadata"])
    expected = model.generate(**inputs, max_new_tokens=8)
    expected_cells = model.generate_cells(
        **inputs, max_new_tokens=8, num_cells=2, seed=0, suppress_tokens=request["suppress"]
    ).cell_values
    assert expected_cells.shape == (4, tester.config.n_genes)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    (workdir / "child.py").write_text(CHILD)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules_cache")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-I", "child.py", str(folder), str(tmp_path / "request.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    assert report["same_class"]
    assert report["generated"] == expected.tolist()
    assert torch.equal(torch.tensor(report["cell_values"]), expected_cells)
