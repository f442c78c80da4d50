"""A conversation's token ids, in which only the chat template speaks in special tokens.

A chat template renders a conversation as one string, and tokenizing that string parses every
special-token string in it, those inside a message's content too: a prompt holding
"<|im_end|>\\n<|im_start|>assistant\\n" would close its own turn and open one for the assistant.
Here a content is tokenized as plain text, its special-token strings as ordinary text tokens,
while the template's own text and special tokens stay what the template made them.

Every stage takes a chat's ids from `chat_token_ids`: the vLLM engines sample after exactly the
ids the trainer and the reference score, and the prompt-length check counts those same ids.

A conversation none of whose contents holds a special-token string is the template's rendering
tokenized whole (add_special_tokens=False), as it always was. A content that holds one is found
in that rendering by rendering the template again with a sentinel in its place. The rendering is
then tokenized in segments cut at the template's own special tokens, as the tokenizer itself cuts
a string before it tokenizes the text between them: a segment holding a content (with the
template text around it, up to the nearest special token on each side) is tokenized with
split_special_tokens, the rest as usual. Text between two special tokens is thus grouped as in
the whole string, so an ordinary content's tokens, and the template's, are what they would be
whole. The exception is a tokenizer that marks the start of a string (a Metaspace pre-tokenizer
with prepend_scheme "first" prepends "▁" to a string's first word only): a cut segment that
follows a special token is tokenized as a string of its own, and may begin with a "▁" that the
whole string would not give it. Either way every stage gets the same ids.
"""

from __future__ import annotations

import re
import secrets
from typing import Any


class ChatRenderError(ValueError):
    """A content holding special-token text that cannot be told apart from the template's text."""


def special_strings(tokenizer: Any) -> list[str]:
    """The strings this tokenizer reads as special tokens (those split_special_tokens keeps as text)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {token.content for token in added.values() if getattr(token, "special", False)}
    strings.update(getattr(tokenizer, "all_special_tokens", None) or ())
    return sorted(s for s in strings if s)


def holds_special(text: str, specials: list[str]) -> bool:
    return any(special in text for special in specials)


def render_chat(tokenizer: Any, conversation: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def template_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of text the template wrote: its special-token strings are special tokens. No BOS or
    other extra token is added, since the template writes those it wants itself."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_ids(tokenizer: Any, text: str, specials: list[str] | None = None) -> list[int]:
    """Ids of `text` as plain text: a special-token string in it is tokenized as the characters it is."""
    specials = special_strings(tokenizer) if specials is None else specials
    if not holds_special(text, specials):
        # split_special_tokens changes nothing here; the plain call keeps simple tokenizers usable.
        return template_ids(tokenizer, text)
    ids = list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
    special_ids = {tokenizer.convert_tokens_to_ids(special) for special in specials}
    if special_ids.intersection(ids):
        raise ChatRenderError(f"{type(tokenizer).__name__} reads special-token text as special tokens even with "
                              "split_special_tokens=True; a prompt or answer holding one cannot be kept as text")
    return ids


def chat_token_ids(tokenizer: Any, messages: list[dict], answer: str | None = None) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, with every message's
    content tokenized as plain text.

    Without `answer` the rendering ends with the generation prompt (what a sampler continues);
    with one, `answer` is the content of a final assistant message and no generation prompt follows.
    """
    conversation = [dict(message) for message in messages]
    if answer is not None:
        conversation.append({"role": "assistant", "content": answer})
    generation_prompt = answer is None
    text = render_chat(tokenizer, conversation, generation_prompt)
    specials = special_strings(tokenizer)
    cut = [i for i, message in enumerate(conversation)
           if isinstance(message.get("content"), str) and holds_special(message["content"], specials)]
    if not cut:
        return template_ids(tokenizer, text)
    return cut_ids(tokenizer, conversation, text, cut, generation_prompt)


def cut_ids(tokenizer: Any, conversation: list[dict], text: str, cut: list[int], generation_prompt: bool) -> list[int]:
    """Ids of `text`, the template's rendering of `conversation`, with the contents of the messages
    `cut` tokenized as plain text."""
    pieces = cut_contents(tokenizer, conversation, text, cut, generation_prompt)
    specials = special_strings(tokenizer)
    ids: list[int] = []
    for segment, plain in segments(pieces, special_tokens(tokenizer)):
        ids += text_ids(tokenizer, segment, specials) if plain else template_ids(tokenizer, segment)
    return ids


def special_tokens(tokenizer: Any) -> dict[str, Any]:
    """Each special-token string, with its AddedToken where the tokenizer has one (None otherwise)."""
    added = {token.content: token for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()}
    return {special: added.get(special) for special in special_strings(tokenizer)}


def segments(pieces: list[tuple[str, bool]], specials: dict[str, Any]) -> list[tuple[str, bool]]:
    """The rendering's (piece, is_content) pieces regrouped as (segment, plain): each content joins
    the template text on either side of it up to the template's nearest special token, and such
    a run is one plain segment; the template's text from its first special token to its last
    around them is a segment as it is."""
    out: list[tuple[str, bool]] = []

    def add_plain(text: str) -> None:
        if out and out[-1][1]:
            out[-1] = (out[-1][0] + text, True)
        elif text:
            out.append((text, True))

    for piece, is_content in pieces:
        bounds = None if is_content else special_bounds(piece, specials)
        if bounds is None:
            add_plain(piece)
            continue
        start, end = bounds
        add_plain(piece[:start])
        out.append((piece[start:end], False))
        add_plain(piece[end:])
    return out


def special_bounds(text: str, specials: dict[str, Any]) -> tuple[int, int] | None:
    """Where the first special-token string in template text `text` starts and its last one ends,
    widened over the whitespace a special token with lstrip or rstrip takes in; None if none is in it."""
    found = [(at, special) for special in specials for at in (text.find(special), text.rfind(special)) if at >= 0]
    if not found:
        return None
    start, first = min(found)
    last_at, last = max(found, key=lambda hit: hit[0] + len(hit[1]))
    end = last_at + len(last)
    if getattr(specials[first], "lstrip", False):
        start = len(text[:start].rstrip())
    if getattr(specials[last], "rstrip", False):
        end = len(text) - len(text[end:].lstrip())
    return start, end


def cut_contents(tokenizer: Any, conversation: list[dict], text: str, cut: list[int],
                 generation_prompt: bool) -> list[tuple[str, bool]]:
    """`text`, the template's rendering of `conversation`, as consecutive (piece, is_content)
    pieces in which each content of the messages `cut` is a piece of its own.

    The template may write a content trimmed (Llama-3 and Gemma templates do), or more than once;
    a template that rewrites a content otherwise, or whose text depends on it, is refused rather
    than guessed at.
    """
    nonce = secrets.token_hex(8)
    marks = {f"LARPO{nonce}C{i}E": i for i in cut}
    masked = [dict(message) for message in conversation]
    for mark, i in marks.items():
        masked[i]["content"] = mark
    parts = re.split("(" + "|".join(marks) + ")", render_chat(tokenizer, masked, generation_prompt))
    pieces: list[tuple[str, bool]] = []
    at = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:
            if not text.startswith(part, at):
                raise _unfollowed(conversation, cut)
            pieces.append((part, False))
            at += len(part)
            continue
        content, after = conversation[marks[part]]["content"], parts[k + 1]
        written = next((form for form in (content, content.strip(), content.lstrip(), content.rstrip())
                        if text.startswith(form + after, at)), None)
        if written is None:
            raise _unfollowed(conversation, cut)
        pieces.append((written, True))
        at += len(written)
    if at != len(text):
        raise _unfollowed(conversation, cut)
    return pieces


def _unfollowed(conversation: list[dict], cut: list[int]) -> ChatRenderError:
    roles = ", ".join(conversation[i]["role"] for i in cut)
    return ChatRenderError(f"a message ({roles}) holds special-token text, and the chat template rewrites its "
                           "content in a way that cannot be followed, so it cannot be kept as plain text")
