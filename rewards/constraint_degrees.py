"""Graded degree of fulfilment of each constraint kind, in [0, 1].

One rule per kind: 1.0 exactly when its check passes (test_constraints checks
that equivalence on random text), otherwise a share that grows toward 1 as the
answer nears the constraint. A reward of degrees ranks two failing answers that
the check alone would tie (README, "Graded constraint credit", lists every rule).

Functions are named after their kind, as in rewards/constraint_checks.py. Kinds
without a graded rule (none at present) get `binary(check)`. The registry in
rewards/constraints.py makes every degree 0 for a blank response.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from rewards import constraint_checks as checks
from rewards.constraint_text import WORD, Args, bullet_lines, count_words, occurrences, paragraphs


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


def _half_when_written(check: Callable[[str, Args], bool], key: str) -> Callable[[str, Args], float]:
    """Half for the argument's text written in the wrong place: a closing phrase with more
    after it, a keyword inside a longer word ("habits" for "habit")."""
    def degree(response: str, args: Args) -> float:
        if check(response, args):
            return 1.0
        text = str(args[key])
        return 0.5 if text and text.casefold() in response.casefold() else 0.0
    return degree


def binary(check: Callable[[str, Args], bool]) -> Callable[[str, Args], float]:
    def degree(response: str, args: Args) -> float:
        return 1.0 if check(response, args) else 0.0
    return degree


def max_words(response: str, args: Args) -> float:
    words, limit = count_words(response), int(args["limit"])
    return 1.0 if words <= limit else limit / words


def min_words(response: str, args: Args) -> float:
    words, limit = count_words(response), int(args["limit"])
    return 1.0 if words >= limit else words / limit


def lowercase(response: str, args: Args) -> float:
    return _cased_share(response, lower=True)


def uppercase(response: str, args: Args) -> float:
    return _cased_share(response, lower=False)


include_keyword = _half_when_written(checks.include_keyword, "keyword")


def forbidden_word(response: str, args: Args) -> float:
    return 1.0 / (1 + occurrences(response, str(args["word"])))


def bullet_points(response: str, args: Args) -> float:
    return _count_ratio(len(bullet_lines(response)), int(args["count"]))


def no_commas(response: str, args: Args) -> float:
    return 1.0 / (1 + response.count(","))


end_phrase = _half_when_written(checks.end_phrase, "phrase")


def title(response: str, args: Args) -> float:
    # Half for a title in another shape: angle brackets that do not make one, or a short
    # heading line on top ("**Tea**", "# Tea") before the text.
    if checks.title(response, args):
        return 1.0
    lines = response.strip().splitlines()
    heading = (len(lines) > 1 and 0 < count_words(lines[0]) <= 10
               and not lines[0].rstrip().endswith((".", ",", "!", "?", ":")))
    return 0.5 if heading or "<<" in response or ">>" in response else 0.0


def num_paragraphs(response: str, args: Args) -> float:
    return _count_ratio(len(paragraphs(response)), int(args["count"]))


def start_word(response: str, args: Args) -> float:
    # Half when the word comes early (within the first ten words) but not first.
    if checks.start_word(response, args):
        return 1.0
    early = [w.casefold() for w in WORD.findall(response)[:10]]
    return 0.5 if str(args["word"]).casefold() in early else 0.0


def postscript(response: str, args: Args) -> float:
    # Half for a "P.S." that is not on a line of its own.
    if checks.postscript(response, args):
        return 1.0
    return 0.5 if re.search(r"p\.\s?s\.", response, flags=re.IGNORECASE) else 0.0


def quotation(response: str, args: Args) -> float:
    text = response.strip()
    if checks.quotation(response, args):
        return 1.0
    if len(text) < 2:
        return 0.0
    return 0.5 * (text.startswith(checks.OPENING_QUOTES) + text.endswith(checks.CLOSING_QUOTES))
