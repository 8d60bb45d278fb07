import hashlib
from collections import Counter

from datasets_builder.splits import SPLITS, bucket_to_split, split_of, template_split_of


def test_split_rule_matches_the_documented_formula():
    for obs_name in ["AAAC-1", "cell_7", "x"]:
        bucket = int(hashlib.sha1(f"ds/{obs_name}".encode()).hexdigest(), 16) % 10
        assert split_of("ds", obs_name) == bucket_to_split(bucket)
    assert [bucket_to_split(b) for b in range(10)] == ["train"] * 8 + ["validation", "test"]


def test_split_is_deterministic_and_close_to_8_1_1():
    names = [f"cell_{i}" for i in range(20000)]
    first = [split_of("ds", n) for n in names]
    assert first == [split_of("ds", n) for n in names]
    counts = Counter(first)
    assert set(counts) == set(SPLITS)
    assert abs(counts["train"] / len(names) - 0.8) < 0.015
    assert abs(counts["validation"] / len(names) - 0.1) < 0.01
    assert abs(counts["test"] / len(names) - 0.1) < 0.01


def test_split_depends_on_dataset_name_too():
    names = [f"cell_{i}" for i in range(200)]
    assert [split_of("a", n) for n in names] != [split_of("b", n) for n in names]


def test_template_split_uses_the_same_rule():
    counts = Counter(template_split_of(f"cta-{i:05d}") for i in range(5000))
    assert abs(counts["train"] / 5000 - 0.8) < 0.03
    assert template_split_of("cta-00001") == bucket_to_split(
        int(hashlib.sha1(b"cta-00001").hexdigest(), 16) % 10
    )
