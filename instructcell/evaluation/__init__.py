"""Evaluation: metrics, baselines, model predictions on the test split and the one report format."""
