"""Evaluation: one path from a saved model and a built dataset to ``metrics.json``, ``report.md`` and figures.

``instructcell evaluate``, ``make demo`` (:func:`suite.run_evaluation`) and the benchmark suite
(:func:`suite.score_pairs` with several models) share it. Tasks are dispatched by their metric family
(:data:`suite.EVALUATORS`), so a new task of an existing family needs no change here.

Modules
-------
- :mod:`.suite`: :class:`~.suite.EvaluationConfig`, :func:`~.suite.run_evaluation`, the family dispatch.
- :mod:`.context`: what the evaluators share (data, models, :class:`~.context.ScoringSettings`, report).
- :mod:`.classification_evaluator`, :mod:`.generation_evaluator`, :mod:`.perturbation_evaluator`: one
  evaluator per metric family.
- :mod:`.candidates`: the models under evaluation (label predictions, cells for requests, greedy answers).
- :mod:`.baselines`: the baselines registry (:data:`~.baselines.BASELINES`, picked from ``task.baselines``);
  :mod:`.optional_baselines`: CellTypist and scVI.
- :mod:`.metrics`: the numbers (classification and generation metrics), shared with ``metrics/*``.
- :mod:`.cells`, :mod:`.markers`: builder rows as counts; marker genes and dot-plot statistics.
- :mod:`.sections`, :mod:`.robustness`, :mod:`.saliency`: optional per-model sections.
- :mod:`.render`, :mod:`.files`, :mod:`.plotting`: the one markdown renderer, the report folder, figures.

``metrics.json``
----------------
::

    {"title": str,
     "run": {...settings, "command", "wall_seconds", "timings": {step: s}, "device", "torch_threads",
             "methods": {name: {"kind": "model" | "baseline", "title", "description" | "path", "variant"}},
             "skipped": {name: reason}, ...what the caller adds (data source, recipe, machine...)},
     "scores": {task: {dataset: {
         "n_test", "n_train",
         classification: "labels": [label],
         generation: "n_requests", "requested": {label: cells}, "markers": {label: [gene]},
         perturbation: "groups": {"<perturbation> / <cell type>": {"n_test", "top_degs": [gene],
                                                                   "methods": {name: {metric: value}}}},
         "methods": {name: {
             classification: "accuracy", "macro_f1", "weighted_f1", "answered_rate", ("method": models),
             generation: "mmd", "delta_sknn", "pknn", "pknn_k10", per-K values, "n_cells",
                         ("signal_rate": models),
             perturbation: means over groups of "r2_all", "r2_top_degs", "change_pearson_all",
                           "change_pearson_top_degs", "mmd", "e_distance"; "n_groups",
                           ("signal_rate": models),
             "seconds", ("details": {...} of a baseline, e.g. scVI's epochs)}}}}},
     "sections": {"requests": [{"task", "dataset", "instruction", "answer", "detail"}],
                  "robustness": {"method", "templates_per_group", "sd_ddof",
                                 "templates": {task: {group: [id]}},
                                 "results": {task: {dataset: {"n", "summary", "per_template"}}}},
                  "saliency": {task: {dataset: {"n_cells": {label: n},
                                                "top_genes": {label: [{"gene", "saliency"}]}}}},
                  "throughput": {...}, "training": {...}},  (each optional)
     "figures": {title: relative path}}

``methods`` holds the models (``instructcell``; ``instruct`` and ``chat`` in the suite; ``<name>_<method>``
for a second label prediction method) and the baselines side by side.
"""
