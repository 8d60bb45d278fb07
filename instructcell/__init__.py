"""The InstructCell toolkit around the Hub model: tasks, training, evaluation, inference and the CLI.

``modeling_instructcell`` is the model family that travels to the Hub; ``datasets_builder`` turns AnnData
files into instruction data. This package holds everything else, one sub-package per concern:

- :mod:`instructcell.tasks`: the task registry (what each task reads, writes, asks and is scored by).
- :mod:`instructcell.configuration`: presets, training recipes and launch configs (package data).
- :mod:`instructcell.training`: building a processor and model, the Trainer, the cell-decoder stage.
- :mod:`instructcell.evaluation`: metrics, baselines, predictions and the one report format.
- :mod:`instructcell.inference`: whole-file annotation, drug response and cell generation.
- :mod:`instructcell.cli`: the ``instructcell`` command.
"""
