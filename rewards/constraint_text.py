"""Text helpers shared by the constraint checks and degrees (rewards/constraints.py).

How a response is cut into words, paragraphs and bullet lines, and how a word is
found whole in it. Checks and degrees count with the same helpers, so a degree of
1.0 and a passing check always agree on what was counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# A constraint's arguments: the constraint dict without its "kind".
Args = Mapping[str, object]

# A word is a run of letters/digits, joined across inner apostrophes and hyphens
# ("don't", "well-known"), so markdown markers like "*" or "-" are not words.
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def is_blank(text: str) -> bool:
    return not text.strip()


def paragraphs(text: str) -> list[str]:
    # Any run of blank lines separates two paragraphs; extra blank lines are not paragraphs.
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def bullet_lines(text: str) -> list[str]:
    # A bullet is a line starting with "* " or "- ", indentation allowed.
    return [line for line in text.splitlines() if line.lstrip().startswith(("* ", "- "))]


def occurrences(text: str, word: str) -> int:
    # Lookarounds instead of \b so a word with punctuation at its edge still matches whole.
    pattern = rf"(?<![^\W_]){re.escape(word)}(?![^\W_])"
    return len(re.findall(pattern, text, flags=re.IGNORECASE))


def contains_word(text: str, word: str) -> bool:
    return occurrences(text, word) > 0
