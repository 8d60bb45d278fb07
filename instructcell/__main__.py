"""``python -m instructcell`` (and ``accelerate launch -m instructcell``): the ``instructcell`` command."""

import sys

from instructcell.cli import main

sys.exit(main())
