import random

import pytest

from rewards.constraints import (
    CONSTRAINTS,
    check_all,
    compatible,
    count_words,
    describe_all,
    get_constraint,
)

# (kind, args, a response that meets it, a response that does not)
CASES = [
    ("max_words", {"limit": 5}, "Tea is warm and calm.", "Tea is warm and calm and kind."),
    ("min_words", {"limit": 5}, "Tea is warm and calm.", "Tea is warm."),
    ("lowercase", {}, "tea is warm, and calm.", "Tea is warm."),
    ("uppercase", {}, "TEA IS WARM, AND CALM 100%.", "TEA IS Warm."),
    ("include_keyword", {"keyword": "habit"}, "A daily Habit helps.", "Good habits help."),
    ("forbidden_word", {"word": "very"}, "Everyone loves tea.", "Tea is Very nice."),
    ("bullet_points", {"count": 2}, "Tips:\n* drink water\n- sleep well", "* drink water\n* sleep\n* eat"),
    ("no_commas", {}, "Tea is warm and calm.", "Tea is warm, and calm."),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Drink tea. Hope this helps!\n  ", "Hope this helps! Bye."),
    ("title", {}, "<<Ode to Tea>>\nTea is warm.", "<<>> Tea is warm."),
    ("num_paragraphs", {"count": 2}, "First part.\n\n\nSecond part.\n", "First part.\nStill first."),
    ("start_word", {"word": "Here"}, '"**Here** is my answer."', "So here is my answer."),
    ("postscript", {}, "Tea is warm.\n\np.s. Try green tea.", "Tea is warm. P.S. mid-line."),
    ("quotation", {}, '  "Tea is warm."\n', 'Tea is "warm".'),
]


def test_every_kind_has_a_case():
    assert {case[0] for case in CASES} == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 10


@pytest.mark.parametrize("kind, args, good, bad", CASES, ids=[case[0] for case in CASES])
def test_check_passes_and_fails(kind, args, good, bad):
    constraint = CONSTRAINTS[kind]
    assert constraint.check(good, args) is True
    assert constraint.check(bad, args) is False


@pytest.mark.parametrize("kind, args, good, bad", CASES, ids=[case[0] for case in CASES])
def test_blank_response_meets_no_constraint(kind, args, good, bad):
    for blank in ("", "   \n\t"):
        assert CONSTRAINTS[kind].check(blank, args) is False


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_describe_and_sample_args(kind):
    constraint = CONSTRAINTS[kind]
    args = constraint.sample_args(random.Random(0))
    assert args == constraint.sample_args(random.Random(0))  # deterministic under a seed
    text = constraint.describe(args)
    assert text.strip() and text[0].isupper()
    assert constraint.kind == kind


def test_sampled_word_limits_are_small_model_friendly():
    rng = random.Random(1)
    for _ in range(200):
        assert 20 <= CONSTRAINTS["max_words"].sample_args(rng)["limit"] <= 80
        assert 20 <= CONSTRAINTS["min_words"].sample_args(rng)["limit"] <= 80


def test_conflicts_are_symmetric_and_known():
    for kind, constraint in CONSTRAINTS.items():
        assert kind not in constraint.conflicts
        for other in constraint.conflicts:
            assert kind in CONSTRAINTS[other].conflicts


def test_compatible():
    assert compatible(["max_words", "title"])
    assert not compatible(["max_words", "min_words"])
    assert not compatible(["title", "title"])


def test_count_words_ignores_markdown_markers():
    assert count_words("* don't stop - well-known tips") == 4
    assert count_words("") == 0


def test_check_all_and_describe_all():
    constraints = [{"kind": "max_words", "limit": 3}, {"kind": "include_keyword", "keyword": "tea"}]
    assert check_all("I like tea.", constraints) == [True, True]
    assert check_all("I like coffee a lot.", constraints) == [False, False]
    assert check_all("x", []) == []
    assert describe_all(constraints) == 'Answer in at most 3 words. Include the word "tea" in your answer.'


def test_check_all_ignores_unused_keys():
    # Parquet struct columns give every dict every kind's keys, unused ones as None.
    constraint = {"kind": "max_words", "limit": 3, "keyword": None, "count": None}
    assert check_all("I like tea.", [constraint]) == [True]


def test_unknown_kind_names_it():
    with pytest.raises(ValueError, match="sparkly"):
        check_all("hi", [{"kind": "sparkly"}])
    with pytest.raises(ValueError, match="sparkly"):
        describe_all([{"kind": "sparkly"}])
    with pytest.raises(ValueError, match="sparkly"):
        get_constraint("sparkly")
