"""Import a repository script (``examples/*.py``, ``benchmarks/*.py``) as a module, for its tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str) -> ModuleType:
    """Execute ``REPO / relative_path`` as module ``module_name`` (registered in ``sys.modules``, so that
    dataclasses and pickling inside it resolve) and return it."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
