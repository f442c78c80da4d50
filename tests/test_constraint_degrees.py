"""Graded constraint credit: each kind's degree of fulfilment (rewards/constraints.py)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.constraints import CONSTRAINTS, END_PHRASES, FORBIDDEN_WORDS, KEYWORDS, START_WORDS, degree_all

# Pieces the random answers are built from: enough of each kind's triggers (capitals,
# commas, bullets, blank lines, quotes, titles, postscripts, the argument pools' words)
# that both sides of every check come up often.
PIECES = st.sampled_from([
    "tea", "Tea", "TEA", "warm", "and", "calm", ",", ".", "!", " ", " ", "\n", "\n\n", "* ", "- ",
    '"', "“", "”", "<<Title>>", "<<>>", "P.S.", "**P.S.**", "p. s.", "'", "42", "é", "ß",
    *KEYWORDS[:3], *FORBIDDEN_WORDS[:3], *END_PHRASES[:2], *START_WORDS[:3],
])
ANSWERS = st.lists(PIECES, max_size=40).map("".join) | st.text(max_size=60)
# Each kind's arguments drawn the way the data generator draws them, plus small
# limits and counts so that meeting them is as likely as missing them.
ARG_SEEDS = st.integers(min_value=0, max_value=10_000)


def sampled_args(kind: str, seed: int) -> dict:
    args = CONSTRAINTS[kind].sample_args(random.Random(seed))
    rng = random.Random(seed + 1)
    if "limit" in args and rng.random() < 0.5:
        args["limit"] = rng.randint(1, 6)
    return args


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
@settings(max_examples=300, deadline=None)
@given(answer=ANSWERS, seed=ARG_SEEDS)
def test_degree_is_one_exactly_when_the_check_passes(kind, answer, seed):
    constraint, args = CONSTRAINTS[kind], sampled_args(kind, seed)
    degree = constraint.degree(answer, args)
    assert isinstance(degree, float)
    assert 0.0 <= degree <= 1.0
    assert (degree == 1.0) == constraint.check(answer, args)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
@given(blank=st.text(alphabet=" \t\r\n", max_size=5), seed=ARG_SEEDS)
def test_blank_answer_has_degree_zero(kind, blank, seed):
    assert CONSTRAINTS[kind].degree(blank, sampled_args(kind, seed)) == 0.0


# (kind, args, answer, its degree): each kind's rule on an answer that misses.
PARTIAL = [
    ("max_words", {"limit": 5}, "one two three four five six seven eight nine ten", 0.5),
    ("min_words", {"limit": 8}, "one two", 0.25),
    ("lowercase", {}, "abC", 2 / 3),
    ("uppercase", {}, "ABc1", 2 / 3),
    ("lowercase", {}, "123 !", 0.0),
    ("include_keyword", {"keyword": "habit"}, "no such word", 0.0),
    ("include_keyword", {"keyword": "habit"}, "Good habits help.", 0.5),
    ("forbidden_word", {"word": "very"}, "very very nice", 1 / 3),
    ("bullet_points", {"count": 4}, "* a\n* b", 0.5),
    ("bullet_points", {"count": 2}, "* a\n* b\n* c", 2 / 3),
    ("bullet_points", {"count": 3}, "no bullets", 0.0),
    ("no_commas", {}, "a, b, c", 1 / 3),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Hope this helps! Bye.", 0.5),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Bye.", 0.0),
    ("title", {}, "no title", 0.0),
    ("title", {}, "**Ode to Tea**\nTea is warm.", 0.5),
    ("title", {}, "<<>> Tea is warm.", 0.5),
    ("num_paragraphs", {"count": 3}, "one\n\ntwo", 2 / 3),
    ("num_paragraphs", {"count": 2}, "a\n\nb\n\nc\n\nd", 0.5),
    ("start_word", {"word": "Here"}, "So here it is", 0.5),
    ("start_word", {"word": "Here"}, "One two three four five six seven eight nine ten here", 0.0),
    ("postscript", {}, "Tea. P.S. mid-line", 0.5),
    ("postscript", {}, "Tea.", 0.0),
    ("quotation", {}, '"Tea is warm.', 0.5),
    ("quotation", {}, "Tea is warm.", 0.0),
]


@pytest.mark.parametrize("kind, args, answer, expected", PARTIAL, ids=[f"{c[0]}-{i}" for i, c in enumerate(PARTIAL)])
def test_partial_credit_rules(kind, args, answer, expected):
    assert CONSTRAINTS[kind].degree(answer, args) == pytest.approx(expected)
    assert not CONSTRAINTS[kind].check(answer, args)


def test_every_kind_has_a_partial_case():
    assert {case[0] for case in PARTIAL} == set(CONSTRAINTS)


def test_degree_all_matches_each_kind():
    constraints = [{"kind": "max_words", "limit": 2, "count": None}, {"kind": "include_keyword", "keyword": "tea"}]
    assert degree_all("I like tea.", constraints) == pytest.approx([2 / 3, 1.0])
    assert degree_all("x", []) == []
    with pytest.raises(ValueError, match="sparkly"):
        degree_all("hi", [{"kind": "sparkly"}])


@pytest.mark.parametrize("answer", ["Tea is warm.\n\n**P.S.** Try green tea.", "Tea.\n__P.S.__ More.",
                                    "Tea.\n* P.S. a bullet", "Tea.\n  *P. S.* more"])
def test_bold_postscript_counts(answer):
    assert CONSTRAINTS["postscript"].check(answer, {})
    assert CONSTRAINTS["postscript"].degree(answer, {}) == 1.0
