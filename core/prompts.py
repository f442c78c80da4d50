"""Prompt sources: local JSONL / Parquet files or a Hugging Face dataset.

Every row must carry chat messages (a list of {role, content}) in the
`messages_field` column, or, in every row, a plain string there (UltraFeedback's
`instruction`), which becomes one user message. `prompt_id` is taken from the
row or derived from the messages; the other fields (all of them, or those named
by `metadata_fields`) travel with the prompt as `metadata` (the
instruction-following reward reads its `constraints` from there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.chat_tokens import ChatRenderError, chat_token_ids
from core.errors import PipelineError

ROLES = {"system", "user", "assistant"}

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)


def load_prompts(source: str, messages_field: str = "messages", *,
                 metadata_fields: list[str] | None = None, duplicates: str = "error") -> list[Prompt]:
    """Read and validate a whole prompt set; the error names the file and row at fault.

    `metadata_fields`: the other columns kept as metadata (None: all of them);
    one that no row has is an error (a typo). `duplicates`: a repeated
    prompt_id is an `error` naming both rows, or `drop`ped (the first is kept
    and the count logged).
    """
    rows = _read_rows(source)
    # The first row that has the column decides its kind for the whole set: a
    # plain string is one user turn, anything else must be chat messages. A row
    # of the other kind is then an error that names that row.
    first = next((i for i, row in enumerate(rows, start=1) if row.get(messages_field) is not None), None)
    plain_row = first if first is not None and isinstance(rows[first - 1][messages_field], str) else None
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    dropped = 0
    for index, row in enumerate(rows, start=1):
        prompt = _parse_row(row, index, source, messages_field, plain_row, metadata_fields)
        if prompt.prompt_id in seen:
            if duplicates == "drop":
                dropped += 1
                continue
            raise PipelineError(f"prompt set {source}: prompt_id '{prompt.prompt_id}' appears in rows "
                                f"{seen[prompt.prompt_id]} and {index} (prompts.duplicates=drop keeps the first)")
        seen[prompt.prompt_id] = index
        prompts.append(prompt)
    if not prompts:
        raise PipelineError(f"prompt set {source} is empty")
    if metadata_fields is not None:
        present = set().union(*rows)
        absent = [name for name in metadata_fields if name not in present]
        if absent:
            raise PipelineError(f"prompt set {source}: prompts.metadata_fields names '{absent[0]}', "
                                "a column that no row has")
    if dropped:
        log.warning("prompt set %s: dropped %d repeated prompt(s), keeping each one's first row "
                    "(prompts.duplicates=drop); %d remain", source, dropped, len(prompts))
    return prompts


def round_slice(prompts: list[Prompt], round_number: int, per_round: int, seed: int) -> list[Prompt]:
    """The M prompts of a round: consecutive slices of one seeded shuffle.

    Rounds see new prompts until the set is used up, then wrap around, as in
    LarPO's "sample M new prompts" per iteration.
    """
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    start = (round_number - 1) * per_round
    count = min(per_round, len(prompts))
    return [prompts[order[(start + i) % len(prompts)]] for i in range(count)]


def prompt_token_count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the chat-formatted prompt: the ids the generation engine is given (chat_token_ids)."""
    return len(chat_token_ids(tokenizer, messages))


def fit_to_context(prompts: Iterable[Prompt], tokenizer: Any, max_prompt_tokens: int,
                   too_long: str) -> tuple[list[Prompt], list[str]]:
    """Keep the prompts that leave room for the answer; drop or refuse the others."""
    kept, dropped = [], []
    for prompt in prompts:
        try:
            n = prompt_token_count(tokenizer, prompt.messages)
        except ChatRenderError as exc:
            raise PipelineError(f"prompt '{prompt.prompt_id}': {exc}") from None
        if n <= max_prompt_tokens:
            kept.append(prompt)
        elif too_long == "error":
            raise PipelineError(
                f"prompt '{prompt.prompt_id}' has {n} tokens, more than the {max_prompt_tokens} that fit "
                "model.max_model_len with room for the answer, and train.max_length "
                "(prompts.too_long=drop skips it)")
        else:
            dropped.append(prompt.prompt_id)
    return kept, dropped


def _read_rows(source: str) -> list[dict[str, Any]]:
    if source.startswith("hf:"):
        return _read_hf_dataset(source[3:], source)
    path = Path(source)
    if path.is_dir():
        return _read_hf_dataset(str(path), source)
    if not path.is_file():
        raise PipelineError(f"prompt file {source} does not exist")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, source)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise PipelineError(f"prompt file {source} is not a readable Parquet file: {exc}") from None
    raise PipelineError(f"prompt file {source} must end in .jsonl or .parquet, or be a dataset directory "
                        "or hf:<dataset name>")


def _read_jsonl(path: Path, source: str) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(f"prompt file {source}: line {line_number} is not UTF-8 text "
                                    f"(byte {exc.start + 1}: {raw[exc.start:exc.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"prompt file {source}: line {line_number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"prompt file {source}: line {line_number} is not a JSON object")
            rows.append(row)
    return rows


def _read_hf_dataset(spec: str, source: str) -> list[dict[str, Any]]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types; the user needs the name and the reason
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"prompt set {source} could not be loaded: {reason}") from None
    return list(dataset)


def _parse_row(row: dict[str, Any], index: int, source: str, messages_field: str, plain_row: int | None = None,
               metadata_fields: list[str] | None = None) -> Prompt:
    """One prompt; `plain_row`: the row that made the column plain strings (None: chat messages)."""
    given_id = row.get("prompt_id")
    where = f"prompt set {source}: row {index}" + (f" (prompt_id '{given_id}')" if given_id is not None else "")
    messages = row.get(messages_field)
    if messages is None:
        raise PipelineError(f"{where} has no '{messages_field}'")
    if plain_row is not None:
        if not isinstance(messages, str):
            raise PipelineError(f"{where}: '{messages_field}' must be a plain string, as in row {plain_row} "
                                f"(the column's first); got {type(messages).__name__}")
        if not messages.strip():
            raise PipelineError(f"{where}: '{messages_field}' is an empty string")
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise PipelineError(f"{where}: '{messages_field}' must be a non-empty list of {{role, content}} "
                            "(or, in every row, a plain string)")
    for message in messages:
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise PipelineError(f"{where}: every message needs a role ({', '.join(sorted(ROLES))}) "
                                "and a string content")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt_id = str(given_id) if given_id not in (None, "") else _derive_id(messages)
    if metadata_fields is None:
        metadata = {k: v for k, v in row.items() if k not in ("prompt_id", messages_field)}
    else:
        metadata = {k: row[k] for k in metadata_fields if k in row}
    return Prompt(prompt_id, messages, metadata)


def _derive_id(messages: list[dict[str, str]]) -> str:
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    return f"p-{digest[:12]}"
