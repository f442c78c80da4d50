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
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

Args = Mapping[str, object]


@dataclass(frozen=True)
class Constraint:
    kind: str
    describe: Callable[[Args], str]          # the instruction sentence added to a prompt
    check: Callable[[str, Args], bool]       # does the response meet it?
    degree: Callable[[str, Args], float]     # how nearly, in [0, 1]; 1.0 exactly when check passes
    sample_args: Callable[[random.Random], dict]  # arguments for the data generator
    conflicts: frozenset[str]                # kinds it must not be combined with


# ---------------------------------------------------------------- text helpers

# A word is a run of letters/digits, joined across inner apostrophes and hyphens
# ("don't", "well-known"), so markdown markers like "*" or "-" are not words.
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _is_blank(text: str) -> bool:
    return not text.strip()


def _paragraphs(text: str) -> list[str]:
    # Any run of blank lines separates two paragraphs; extra blank lines are not paragraphs.
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _occurrences(text: str, word: str) -> int:
    # Lookarounds instead of \b so a word with punctuation at its edge still matches whole.
    pattern = rf"(?<![^\W_]){re.escape(word)}(?![^\W_])"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def _contains_word(text: str, word: str) -> bool:
    return _occurrences(text, word) > 0


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


# ---------------------------------------------------------------- checks

def _check_max_words(response: str, args: Args) -> bool:
    return count_words(response) <= args["limit"]


def _check_min_words(response: str, args: Args) -> bool:
    return count_words(response) >= args["limit"]


def _check_lowercase(response: str, args: Args) -> bool:
    # Needs at least one letter: digits-only or punctuation-only text is not "lowercase".
    return any(c.islower() for c in response) and not any(c.isupper() for c in response)


def _check_uppercase(response: str, args: Args) -> bool:
    return any(c.isupper() for c in response) and not any(c.islower() for c in response)


def _check_include_keyword(response: str, args: Args) -> bool:
    return _contains_word(response, str(args["keyword"]))


def _check_forbidden_word(response: str, args: Args) -> bool:
    return not _contains_word(response, str(args["word"]))


def _check_bullet_points(response: str, args: Args) -> bool:
    bullets = [line for line in response.splitlines() if line.lstrip().startswith(("* ", "- "))]
    return len(bullets) == args["count"]


def _check_no_commas(response: str, args: Args) -> bool:
    return "," not in response


def _check_end_phrase(response: str, args: Args) -> bool:
    phrase = str(args["phrase"])
    return bool(phrase) and response.rstrip().endswith(phrase)


def _check_title(response: str, args: Args) -> bool:
    # The title must be on one line and hold at least one letter or digit: "<<>>" is no title.
    return re.search(r"<<[^<>\n]*[^\W_][^<>\n]*>>", response) is not None


def _check_num_paragraphs(response: str, args: Args) -> bool:
    return len(_paragraphs(response)) == args["count"]


def _check_start_word(response: str, args: Args) -> bool:
    # Skip leading quotes, markdown and spaces: '"Here is...' and '**Here** is' both start with "Here".
    first = _WORD.search(response)
    if first is None or response[: first.start()].strip("\"'“‘*_#>`([- \t\r\n"):
        return False
    return first.group(0).casefold() == str(args["word"]).casefold()


def _check_postscript(response: str, args: Args) -> bool:
    # A line of its own that starts with "P.S." (any case, optional space: "p.s.", "P. S."),
    # markdown emphasis allowed in front, as chat models write it: "**P.S.** ...".
    return re.search(r"^\s*[*_]*\s*p\.\s?s\.", response, flags=re.IGNORECASE | re.MULTILINE) is not None


_OPENING_QUOTES = ('"', "“")
_CLOSING_QUOTES = ('"', "”")


def _check_quotation(response: str, args: Args) -> bool:
    text = response.strip()
    return len(text) >= 2 and text.startswith(_OPENING_QUOTES) and text.endswith(_CLOSING_QUOTES)


# ---------------------------------------------------------------- degrees
# One rule per kind: 1.0 exactly when its check passes (test_constraints checks
# that equivalence on random text), otherwise a share that grows toward 1 as the
# answer nears the constraint.

def _count_ratio(have: int, want: int) -> float:
    """1 - |have - want| / max(have, want): 1 only at have == want, 0 at have == 0 < want."""
    return 1.0 if have == want else 1.0 - abs(have - want) / max(have, want)


def _cased_share(response: str, lower: bool) -> float:
    # The share of cased letters in the wanted case; text without cased letters meets neither.
    lowers = sum(c.islower() for c in response)
    uppers = sum(c.isupper() for c in response)
    if lowers + uppers == 0:
        return 0.0
    return (lowers if lower else uppers) / (lowers + uppers)


def _degree_max_words(response: str, args: Args) -> float:
    words, limit = count_words(response), int(args["limit"])
    return 1.0 if words <= limit else limit / words


def _degree_min_words(response: str, args: Args) -> float:
    words, limit = count_words(response), int(args["limit"])
    return 1.0 if words >= limit else words / limit


def _degree_forbidden_word(response: str, args: Args) -> float:
    return 1.0 / (1 + _occurrences(response, str(args["word"])))


def _degree_bullet_points(response: str, args: Args) -> float:
    bullets = [line for line in response.splitlines() if line.lstrip().startswith(("* ", "- "))]
    return _count_ratio(len(bullets), int(args["count"]))


def _degree_no_commas(response: str, args: Args) -> float:
    return 1.0 / (1 + response.count(","))


def _half_when_written(check: Callable[[str, Args], bool], key: str) -> Callable[[str, Args], float]:
    """Half for the argument's text written in the wrong place: a closing phrase with more
    after it, a keyword inside a longer word ("habits" for "habit")."""
    def degree(response: str, args: Args) -> float:
        if check(response, args):
            return 1.0
        text = str(args[key])
        return 0.5 if text and text.casefold() in response.casefold() else 0.0
    return degree


_degree_end_phrase = _half_when_written(_check_end_phrase, "phrase")
_degree_include_keyword = _half_when_written(_check_include_keyword, "keyword")


def _degree_num_paragraphs(response: str, args: Args) -> float:
    return _count_ratio(len(_paragraphs(response)), int(args["count"]))


def _degree_quotation(response: str, args: Args) -> float:
    text = response.strip()
    if _check_quotation(response, args):
        return 1.0
    return 0.5 * (text.startswith(_OPENING_QUOTES) + text.endswith(_CLOSING_QUOTES)) if len(text) >= 2 else 0.0


def _degree_title(response: str, args: Args) -> float:
    # Half for a title in another shape: angle brackets that do not make one, or a short
    # heading line on top ("**Tea**", "# Tea") before the text.
    if _check_title(response, args):
        return 1.0
    lines = response.strip().splitlines()
    heading = (len(lines) > 1 and 0 < count_words(lines[0]) <= 10
               and not lines[0].rstrip().endswith((".", ",", "!", "?", ":")))
    return 0.5 if heading or "<<" in response or ">>" in response else 0.0


def _degree_start_word(response: str, args: Args) -> float:
    # Half when the word comes early (within the first ten words) but not first.
    if _check_start_word(response, args):
        return 1.0
    early = [w.casefold() for w in _WORD.findall(response)[:10]]
    return 0.5 if str(args["word"]).casefold() in early else 0.0


def _degree_postscript(response: str, args: Args) -> float:
    # Half for a "P.S." that is not on a line of its own.
    if _check_postscript(response, args):
        return 1.0
    return 0.5 if re.search(r"p\.\s?s\.", response, flags=re.IGNORECASE) else 0.0


def _binary(check: Callable[[str, Args], bool]) -> Callable[[str, Args], float]:
    def degree(response: str, args: Args) -> float:
        return 1.0 if check(response, args) else 0.0
    return degree


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
        return not _is_blank(response) and check(response, args)
    return guarded


def _blank_scores_zero(degree: Callable[[str, Args], float]) -> Callable[[str, Args], float]:
    def guarded(response: str, args: Args) -> float:
        return 0.0 if _is_blank(response) else float(degree(response, args))
    return guarded


def _make(kind: str, describe: Callable[[Args], str], check: Callable[[str, Args], bool],
          sample_args: Callable[[random.Random], dict] = _no_args,
          degree: Callable[[str, Args], float] | None = None) -> Constraint:
    degree = degree if degree is not None else _binary(check)
    return Constraint(kind, describe, _blank_fails(check), _blank_scores_zero(degree), sample_args,
                      _conflicts_of(kind))


_ALL: tuple[Constraint, ...] = (
    _make("max_words",
          lambda a: f"Answer in at most {a['limit']} words.",
          _check_max_words,
          lambda rng: {"limit": rng.randrange(20, 81, 5)},
          _degree_max_words),
    _make("min_words",
          lambda a: f"Answer in at least {a['limit']} words.",
          _check_min_words,
          lambda rng: {"limit": rng.randrange(20, 51, 5)},
          _degree_min_words),
    _make("lowercase",
          lambda a: "Write your entire answer in lowercase letters, with no capital letters at all.",
          _check_lowercase,
          degree=lambda r, a: _cased_share(r, lower=True)),
    _make("uppercase",
          lambda a: "Write your entire answer in capital letters.",
          _check_uppercase,
          degree=lambda r, a: _cased_share(r, lower=False)),
    _make("include_keyword",
          lambda a: f"Include the word \"{a['keyword']}\" in your answer.",
          _check_include_keyword,
          lambda rng: {"keyword": rng.choice(KEYWORDS)},
          _degree_include_keyword),
    _make("forbidden_word",
          lambda a: f"Do not use the word \"{a['word']}\" anywhere in your answer.",
          _check_forbidden_word,
          lambda rng: {"word": rng.choice(FORBIDDEN_WORDS)},
          _degree_forbidden_word),
    _make("bullet_points",
          lambda a: f"Format your answer as exactly {a['count']} bullet points, "
                    f"each on its own line starting with \"* \".",
          _check_bullet_points,
          lambda rng: {"count": rng.randint(2, 5)},
          _degree_bullet_points),
    _make("no_commas",
          lambda a: "Do not use any commas in your answer.",
          _check_no_commas,
          degree=_degree_no_commas),
    _make("end_phrase",
          lambda a: f"End your answer with the exact phrase \"{a['phrase']}\" and nothing after it.",
          _check_end_phrase,
          lambda rng: {"phrase": rng.choice(END_PHRASES)},
          _degree_end_phrase),
    _make("title",
          lambda a: "Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
          _check_title,
          degree=_degree_title),
    _make("num_paragraphs",
          lambda a: f"Write exactly {a['count']} paragraphs, separated from each other by a blank line.",
          _check_num_paragraphs,
          lambda rng: {"count": rng.randint(2, 4)},
          _degree_num_paragraphs),
    _make("start_word",
          lambda a: f"Begin your answer with the word \"{a['word']}\".",
          _check_start_word,
          lambda rng: {"word": rng.choice(START_WORDS)},
          _degree_start_word),
    _make("postscript",
          lambda a: "At the end of your answer, add a postscript on its own line starting with \"P.S.\"",
          _check_postscript,
          degree=_degree_postscript),
    _make("quotation",
          lambda a: "Wrap your entire answer in double quotation marks.",
          _check_quotation,
          degree=_degree_quotation),
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
