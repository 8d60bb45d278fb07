"""Per-module gradient norms: grouping of parameter names and the norms themselves."""

import math

import pytest

from instructcell.training.diagnostics import (
    GradientNormRecorder,
    gradient_norms,
    module_group,
    plot_gradient_norms,
)


def test_parameter_names_map_to_module_groups(model):
    groups = {module_group(name) for name, _ in model.named_parameters()}
    assert {
        "query tokens",
        "cell MLP",
        "Q-Former",
        "projection",
        "cell VAE",
        "LM encoder",
        "LM decoder",
    } <= groups
    assert module_group("cell_encoder.query_tokens") == "query tokens"
    assert module_group("language_model.decoder.block.0.layer.0.SelfAttention.q.weight") == "LM decoder"
    assert module_group("something_else.weight") is None


def test_gradient_norms_are_the_l2_norm_of_each_group(model, tester, tmp_path):
    model.train()
    model(**tester.task_batch()).loss.backward()
    norms = gradient_norms(model)
    mlp = [
        p.grad
        for n, p in model.named_parameters()
        if n.startswith("cell_encoder.mlp.") and p.grad is not None
    ]
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in mlp))
    assert norms["cell MLP"] == pytest.approx(expected)
    assert norms["query tokens"] == pytest.approx(float(model.cell_encoder.query_tokens.grad.norm()))
    recorder = GradientNormRecorder(every=2)
    state = type("State", (), {"global_step": 0})()
    recorder.on_pre_optimizer_step(None, state, None, model=model)
    state.global_step = 2  # step 3: not recorded
    recorder.on_pre_optimizer_step(None, state, None, model=model)
    assert [r["step"] for r in recorder.records] == [1]
    plot_gradient_norms({"recipe": recorder.records * 2}, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0
