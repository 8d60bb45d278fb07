"""Fine-tune InstructCell on a built dataset: ``instructcell train``, runnable as a script.

    python examples/train.py small-instruct
    accelerate launch --config_file configuration/accelerate/single_cpu.yaml examples/train.py small-chat
    python examples/train.py my_recipe.yaml --max_steps 500

See ``instructcell train --help`` (:mod:`instructcell.cli.train`).
"""

import sys

from instructcell.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
