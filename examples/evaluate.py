"""Evaluate a saved model on the test split of a built dataset: ``instructcell evaluate``, as a script.

    python examples/evaluate.py outputs/demo/model outputs/demo/data -o outputs/eval-demo --robustness

See ``instructcell evaluate --help`` (:mod:`instructcell.cli.evaluate`).
"""

import sys

from instructcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
