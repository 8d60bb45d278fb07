"""Every benchmark and example script starts: its imports resolve and ``--help`` prints its usage.

Most scripts need real data or a trained model to run, so the suite runs only a few of them; this catches a
script left behind when a module it imports moves.
"""

import runpy
import sys

import pytest
from script_modules import REPO

SCRIPTS = sorted(
    str(path.relative_to(REPO))
    for folder in ("benchmarks", "examples")
    for path in (REPO / folder).glob("*.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_prints_its_usage(script, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts that put the repository first undo nothing
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
