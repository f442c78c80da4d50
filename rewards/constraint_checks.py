"""Pass/fail check of each constraint kind: does the response meet it?

One function per kind, named after the kind, taking ``(response, args)``. The
registry in rewards/constraints.py wraps every check so that a blank response
fails it; the functions here need not repeat that rule.
"""

from __future__ import annotations

import re

from rewards.constraint_text import WORD, Args, bullet_lines, contains_word, count_words, paragraphs

OPENING_QUOTES = ('"', "“")
CLOSING_QUOTES = ('"', "”")


def max_words(response: str, args: Args) -> bool:
    return count_words(response) <= args["limit"]


def min_words(response: str, args: Args) -> bool:
    return count_words(response) >= args["limit"]


def lowercase(response: str, args: Args) -> bool:
    # Needs at least one letter: digits-only or punctuation-only text is not "lowercase".
    return any(c.islower() for c in response) and not any(c.isupper() for c in response)


def uppercase(response: str, args: Args) -> bool:
    return any(c.isupper() for c in response) and not any(c.islower() for c in response)


def include_keyword(response: str, args: Args) -> bool:
    return contains_word(response, str(args["keyword"]))


def forbidden_word(response: str, args: Args) -> bool:
    return not contains_word(response, str(args["word"]))


def bullet_points(response: str, args: Args) -> bool:
    return len(bullet_lines(response)) == args["count"]


def no_commas(response: str, args: Args) -> bool:
    return "," not in response


def end_phrase(response: str, args: Args) -> bool:
    phrase = str(args["phrase"])
    return bool(phrase) and response.rstrip().endswith(phrase)


def title(response: str, args: Args) -> bool:
    # The title must be on one line and hold at least one letter or digit: "<<>>" is no title.
    return re.search(r"<<[^<>\n]*[^\W_][^<>\n]*>>", response) is not None


def num_paragraphs(response: str, args: Args) -> bool:
    return len(paragraphs(response)) == args["count"]


def start_word(response: str, args: Args) -> bool:
    # Skip leading quotes, markdown and spaces: '"Here is...' and '**Here** is' both start with "Here".
    first = WORD.search(response)
    if first is None or response[: first.start()].strip("\"'“‘*_#>`([- \t\r\n"):
        return False
    return first.group(0).casefold() == str(args["word"]).casefold()


def postscript(response: str, args: Args) -> bool:
    # A line of its own that starts with "P.S." (any case, optional space: "p.s.", "P. S."),
    # markdown emphasis allowed in front, as chat models write it: "**P.S.** ...".
    return re.search(r"^\s*[*_]*\s*p\.\s?s\.", response, flags=re.IGNORECASE | re.MULTILINE) is not None


def quotation(response: str, args: Args) -> bool:
    text = response.strip()
    return len(text) >= 2 and text.startswith(OPENING_QUOTES) and text.endswith(CLOSING_QUOTES)
