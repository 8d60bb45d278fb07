"""A built wheel carries everything a non-editable install needs: presets, recipes, the template bank."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs with the unpacked wheel (what pip installs into site-packages) first on sys.path, from a folder outside
# the repository: every import below must resolve inside it (asserted), not in the source tree.
CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import datasets_builder, instructcell, instructcell.configuration as configuration
from datasets_builder.templates import TemplateBank
from instructcell.training import parse_training_arguments
for module in (datasets_builder, instructcell, configuration):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
assert configuration.preset_names() == ["base", "small", "tiny"], configuration.preset_names()
assert configuration.load_preset("small")["text_config"]["d_model"] == 128
model_args, data_args, training_args, sections = parse_training_arguments("demo")
assert training_args.max_steps > 0 and model_args.preset == "small" and "demo" in sections
assert configuration.accelerate_config("single_cpu").name == "single_cpu.yaml"
assert len(TemplateBank.load().select("cta", "instruct", "test")) > 0
print("ok")
"""


@pytest.mark.slow
def test_wheel_loads_presets_recipes_and_templates_outside_the_source_tree(tmp_path):
    # setuptools writes build/ and *.egg-info next to the sources: build from a copy, not the checkout
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "outputs", "build", "*.egg-info", "__pycache__", "*.h5ad"
        ),
    )
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("instructcell_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "instructcell/configuration/presets/tiny.json",
        "instructcell/configuration/recipes/default.yaml",
        "instructcell/configuration/accelerate/single_cpu.yaml",
        "datasets_builder/template_bank/cta.jsonl",
        "modeling_instructcell/original_gene_vocab.txt",
    ):
        assert shipped in names
    installed = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", CHECK, str(installed)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
