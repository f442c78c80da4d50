"""Verifiable instruction-following constraints (IFEval-style).

A constraint is stored in data as a plain dict, ``{"kind": "max_words", "limit": 60}``:
the kind names an entry of ``CONSTRAINTS`` and the other keys are its arguments.
Checks ignore keys they do not use, so dicts that went through a Parquet struct
column (where every row carries every kind's keys, missing ones as None) still work.

Rule shared by every check: a blank response meets no constraint. Otherwise
"say nothing" would satisfy max_words, no_commas or forbidden_word for free and
a policy trained on this reward could learn to answer with silence.

Beside its pass/fail check each kind has a `degree` of fulfilment in [0, 1]:
exactly 1.0 when the check passes, lower the further the answer is from meeting
it, 0 for a blank answer. A reward of degrees ranks two failing answers that the
check alone would tie (README, "Graded constraint credit", lists every rule).

This module is the entry point: the registry of kinds and the dict-level API.
The rules live beside it: rewards/constraint_checks.py (pass/fail per kind),
rewards/constraint_degrees.py (degree per kind) and rewards/constraint_text.py
(word counting, paragraphs and other text helpers both use).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from rewards import constraint_checks as checks
from rewards import constraint_degrees as degrees
from rewards.constraint_text import Args, count_words, is_blank

__all__ = [
    "Args", "Constraint", "CONSTRAINTS", "KEYWORDS", "FORBIDDEN_WORDS", "END_PHRASES", "START_WORDS",
    "count_words", "get_constraint", "constraint_problem", "check_all", "degree_all", "describe_all",
    "compatible",
]


@dataclass(frozen=True)
class Constraint:
    kind: str
    describe: Callable[[Args], str]          # the instruction sentence added to a prompt
    check: Callable[[str, Args], bool]       # does the response meet it?
    degree: Callable[[str, Args], float]     # how nearly, in [0, 1]; 1.0 exactly when check passes
    sample_args: Callable[[random.Random], dict]  # arguments for the data generator
    conflicts: frozenset[str]                # kinds it must not be combined with


def _no_args(rng: random.Random) -> dict:
    return {}


# ---------------------------------------------------------------- argument pools
# Kept small and plain so a 135M chat model can follow them in ~100 tokens.

KEYWORDS = ("simple", "together", "morning", "patience", "friend",
            "careful", "journey", "surprise", "habit", "smile")
FORBIDDEN_WORDS = ("very", "really", "just", "also", "always", "great", "good", "thing")
# No commas (no_commas may be combined with end_phrase) and no forbidden word.
END_PHRASES = ("Is there anything else I can help with?", "Thank you for reading.",
               "That is all for now.", "Hope this helps!", "Let me know what you think.")
START_WORDS = ("Here", "Imagine", "First", "Today", "Sure", "Many", "Everyone", "When")


# ---------------------------------------------------------------- registry

# Pairs that contradict each other or make the instruction ambiguous, e.g. a title line
# would itself count as a paragraph, and a postscript would be one more paragraph.
_CONFLICTING_PAIRS: tuple[tuple[str, str], ...] = (
    ("max_words", "min_words"),
    ("lowercase", "uppercase"),
    ("include_keyword", "forbidden_word"),
    ("bullet_points", "num_paragraphs"),
    ("bullet_points", "quotation"),
    ("end_phrase", "quotation"),
    ("end_phrase", "postscript"),
    ("end_phrase", "lowercase"),   # the phrase has capitals
    ("end_phrase", "uppercase"),   # the phrase has lowercase letters
    ("title", "start_word"),
    ("title", "num_paragraphs"),
    ("postscript", "num_paragraphs"),
    ("postscript", "quotation"),
    ("start_word", "lowercase"),   # "Begin with 'Here'" reads as a capital letter
    ("start_word", "uppercase"),
)


def _conflicts_of(kind: str) -> frozenset[str]:
    return frozenset(b if a == kind else a for a, b in _CONFLICTING_PAIRS if kind in (a, b))


def _blank_fails(check: Callable[[str, Args], bool]) -> Callable[[str, Args], bool]:
    # Applied to every check, so the module-level rule holds without each check repeating it.
    def guarded(response: str, args: Args) -> bool:
        return not is_blank(response) and check(response, args)
    return guarded


def _blank_scores_zero(degree: Callable[[str, Args], float]) -> Callable[[str, Args], float]:
    def guarded(response: str, args: Args) -> float:
        return 0.0 if is_blank(response) else float(degree(response, args))
    return guarded


def _make(kind: str, describe: Callable[[Args], str], check: Callable[[str, Args], bool],
          sample_args: Callable[[random.Random], dict] = _no_args,
          degree: Callable[[str, Args], float] | None = None) -> Constraint:
    degree = degree if degree is not None else degrees.binary(check)
    return Constraint(kind, describe, _blank_fails(check), _blank_scores_zero(degree), sample_args,
                      _conflicts_of(kind))


_ALL: tuple[Constraint, ...] = (
    _make("max_words",
          lambda a: f"Answer in at most {a['limit']} words.",
          checks.max_words,
          lambda rng: {"limit": rng.randrange(20, 81, 5)},
          degrees.max_words),
    _make("min_words",
          lambda a: f"Answer in at least {a['limit']} words.",
          checks.min_words,
          lambda rng: {"limit": rng.randrange(20, 51, 5)},
          degrees.min_words),
    _make("lowercase",
          lambda a: "Write your entire answer in lowercase letters, with no capital letters at all.",
          checks.lowercase,
          degree=degrees.lowercase),
    _make("uppercase",
          lambda a: "Write your entire answer in capital letters.",
          checks.uppercase,
          degree=degrees.uppercase),
    _make("include_keyword",
          lambda a: f"Include the word \"{a['keyword']}\" in your answer.",
          checks.include_keyword,
          lambda rng: {"keyword": rng.choice(KEYWORDS)},
          degrees.include_keyword),
    _make("forbidden_word",
          lambda a: f"Do not use the word \"{a['word']}\" anywhere in your answer.",
          checks.forbidden_word,
          lambda rng: {"word": rng.choice(FORBIDDEN_WORDS)},
          degrees.forbidden_word),
    _make("bullet_points",
          lambda a: f"Format your answer as exactly {a['count']} bullet points, "
                    f"each on its own line starting with \"* \".",
          checks.bullet_points,
          lambda rng: {"count": rng.randint(2, 5)},
          degrees.bullet_points),
    _make("no_commas",
          lambda a: "Do not use any commas in your answer.",
          checks.no_commas,
          degree=degrees.no_commas),
    _make("end_phrase",
          lambda a: f"End your answer with the exact phrase \"{a['phrase']}\" and nothing after it.",
          checks.end_phrase,
          lambda rng: {"phrase": rng.choice(END_PHRASES)},
          degrees.end_phrase),
    _make("title",
          lambda a: "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
          checks.title,
          degree=degrees.title),
    _make("num_paragraphs",
          lambda a: f"Write exactly {a['count']} paragraphs, separated from each other by a blank line.",
          checks.num_paragraphs,
          lambda rng: {"count": rng.randint(2, 4)},
          degrees.num_paragraphs),
    _make("start_word",
          lambda a: f"Begin your answer with the word \"{a['word']}\".",
          checks.start_word,
          lambda rng: {"word": rng.choice(START_WORDS)},
          degrees.start_word),
    _make("postscript",
          lambda a: "At the end of your answer, add a postscript on its own line starting with \"P.S.\"",
          checks.postscript,
          degree=degrees.postscript),
    _make("quotation",
          lambda a: "Wrap your entire answer in double quotation marks.",
          checks.quotation,
          degree=degrees.quotation),
)

CONSTRAINTS: dict[str, Constraint] = {c.kind: c for c in _ALL}


# ---------------------------------------------------------------- dict-level API

def get_constraint(kind: str) -> Constraint:
    try:
        return CONSTRAINTS[kind]
    except KeyError:
        raise ValueError(f"unknown constraint kind {kind!r} (known: {', '.join(CONSTRAINTS)})") from None


def constraint_problem(constraint: object) -> str | None:
    """What keeps a constraint dict from being checked (an unknown kind, a missing argument), or None."""
    if not isinstance(constraint, Mapping):
        return f"a constraint must be a mapping with a 'kind', not {type(constraint).__name__}"
    kind = str(constraint.get("kind"))
    if kind not in CONSTRAINTS:
        return f"unknown constraint kind {kind!r} (known: {', '.join(CONSTRAINTS)})"
    # The generator's arguments name what the check reads.
    missing = [key for key in CONSTRAINTS[kind].sample_args(random.Random(0)) if constraint.get(key) is None]
    return f"constraint {kind!r} lacks its argument {missing[0]!r}" if missing else None


def _split(constraint: Mapping[str, object]) -> tuple[Constraint, dict]:
    args = {k: v for k, v in constraint.items() if k != "kind"}
    return get_constraint(str(constraint.get("kind"))), args


def check_all(response: str, constraints: Iterable[Mapping[str, object]]) -> list[bool]:
    """One bool per constraint dict ``{"kind": ..., **args}``, in order."""
    return [spec.check(response, args) for spec, args in map(_split, constraints)]


def degree_all(response: str, constraints: Iterable[Mapping[str, object]]) -> list[float]:
    """One degree of fulfilment in [0, 1] per constraint dict, in order (1.0 where check_all is True)."""
    return [spec.degree(response, args) for spec, args in map(_split, constraints)]


def describe_all(constraints: Iterable[Mapping[str, object]]) -> str:
    """The instruction sentences of all constraints, joined by spaces."""
    sentences = []
    for constraint in constraints:
        spec, args = _split(constraint)
        sentences.append(spec.describe(args))
    return " ".join(sentences)


def compatible(kinds: Iterable[str]) -> bool:
    """True if no kind repeats and no two kinds conflict."""
    kinds = list(kinds)
    if len(set(kinds)) != len(kinds):
        return False
    return all(b not in get_constraint(a).conflicts for i, a in enumerate(kinds) for b in kinds[i + 1:])
