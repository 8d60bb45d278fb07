import json
from pathlib import Path

import pytest
from script_modules import load_script

learning_curve = load_script("benchmarks/learning_curve.py", "learning_curve")


def _run(path: Path, recipes: dict, unit: str = "minutes") -> Path:
    result = {
        "logreg": {"macro_f1": 0.9, "seconds": 1.0},
        "recipes": recipes,
        "gradient_norms": {recipe: [{"step": 10, "cell MLP": 1.0}] for recipe in recipes},
    }
    path.write_text(json.dumps({"unit": unit, "split": "test", "results": {"pancreas": result}}))
    return path


def test_merge_joins_one_recipes_marks_from_several_runs(tmp_path):
    ten = _run(tmp_path / "a.json", {"anneal": [{"mark": 10.0, "macro_f1": 0.8}]})
    five = _run(
        tmp_path / "b.json",
        {"anneal": [{"mark": 5.0, "macro_f1": 0.7}], "paper": [{"mark": 5.0, "macro_f1": 0.2}]},
    )
    merged, unit, split = learning_curve.merge_runs([ten, five])
    assert (unit, split) == ("minutes", "test")
    assert [p["mark"] for p in merged["pancreas"]["recipes"]["anneal"]] == [5.0, 10.0]
    assert merged["pancreas"]["recipes"]["paper"] == [{"mark": 5.0, "macro_f1": 0.2}]
    table = learning_curve.write_outputs(merged, unit, split, tmp_path / "merged")
    assert "| pancreas | anneal | 0.700 | 0.800 |" in table
    assert "| pancreas | paper | 0.200 | - |" in table
    assert (tmp_path / "merged.png").exists() and (tmp_path / "merged_pancreas_gradients.png").exists()


def test_merge_rejects_a_mark_scored_twice_and_mixed_units(tmp_path):
    first = _run(tmp_path / "a.json", {"anneal": [{"mark": 5.0, "macro_f1": 0.7}]})
    again = _run(tmp_path / "b.json", {"anneal": [{"mark": 5.0, "macro_f1": 0.6}]})
    with pytest.raises(ValueError, match=r"mark\(s\) \[5.0\] in more than one run"):
        learning_curve.merge_runs([first, again])
    steps = _run(tmp_path / "c.json", {"anneal": [{"mark": 300.0, "macro_f1": 0.6}]}, unit="steps")
    with pytest.raises(ValueError, match="mix units or splits"):
        learning_curve.merge_runs([first, steps])


@pytest.mark.parametrize("recipe", ["demo", "small-instruct", "small-chat"])
def test_training_recipes_extend_the_default(recipe):
    """`make demo` and `make train-small` train with the default recipe the learning curve measures."""
    from instructcell.configuration import load_recipe

    default = load_recipe("default")
    shared = {key: value for key, value in load_recipe(recipe).items() if key in default}
    budget = {"max_steps", "max_train_minutes", "cell_decoder_steps", "eval_strategy", "save_steps"}
    assert {k: v for k, v in shared.items() if k not in budget} == {
        k: v for k, v in default.items() if k not in budget
    }
    assert learning_curve.RECIPES["default"] == ("default", {})


def test_budget_overrides_train_step_recipes_once_per_mark():
    assert learning_curve.budget_overrides("paper", 5.0, "minutes") is None
    assert learning_curve.budget_overrides("default", 300.0, "steps") == {"max_steps": 300}
    minutes = learning_curve.budget_overrides("default", 5.0, "minutes")
    assert minutes["max_train_minutes"] == 5.0 and minutes["anneal_to_time_limit"]
    assert minutes["max_steps"] == -1
