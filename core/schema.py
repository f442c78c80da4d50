"""Arrow schemas of the Parquet shards (docs/contracts.md, "Parquet columns").

Writing with an explicit schema keeps every shard of every round readable as
one dataset in pandas or DuckDB, even when a shard happens to be empty.
"""

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT = pa.list_(MESSAGE)
TOKEN_IDS = pa.list_(pa.int64())

CANDIDATES = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", PROMPT),
    ("response", pa.string()),
    ("sample_index", pa.int64()),
    ("round", pa.int64()),
    ("policy", pa.string()),
    ("temperature", pa.float64()),
    ("num_tokens", pa.int64()),
    ("finish_reason", pa.string()),
    # The prompt row's other fields as JSON (the reward reads constraints from it).
    ("metadata", pa.string()),
    # The ids the engine sampled, its stop token included when it stopped on one: what the
    # reference and the trainer score (the text does not always tokenize back to them).
    ("response_token_ids", TOKEN_IDS),
])

# Every candidate of a round with its reward, NaN and infinite ones included
# (written by the rerank stage to round_NNN/scored/; later rounds' memorization
# reuses these rewards instead of scoring again).
SCORED = pa.schema(list(CANDIDATES) + [pa.field("reward", pa.float64())])

LIST_ITEM = pa.struct([
    ("response", pa.string()),
    ("reward", pa.float64()),
    ("sample_index", pa.int64()),
    # The round that generated it: earlier than the list's own with lists.memory.
    ("round", pa.int64()),
    ("num_tokens", pa.int64()),
    ("temperature", pa.float64()),
    # As in candidates; null in lists made before the column existed (scored from the text then).
    ("finish_reason", pa.string()),
    ("response_token_ids", TOKEN_IDS),
])

LISTS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", PROMPT),
    ("positives", pa.list_(LIST_ITEM)),
    ("negatives", pa.list_(LIST_ITEM)),
    ("metadata", pa.string()),
])

TRAIN_ITEM = pa.struct(list(LIST_ITEM) + [pa.field("ref_logp", pa.float64())])

TRAIN = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", PROMPT),
    ("positives", pa.list_(TRAIN_ITEM)),
    ("negatives", pa.list_(TRAIN_ITEM)),
    ("metadata", pa.string()),
    # The checkpoint whose log-probs are in ref_logp.
    ("reference", pa.string()),
    # The round whose lists this row is: earlier than the shard's own with train.replay.
    ("round", pa.int64()),
])

EVAL = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt", PROMPT),
    ("response", pa.string()),
    ("reward", pa.float64()),
    ("num_tokens", pa.int64()),
    ("round", pa.int64()),
    ("policy", pa.string()),
    ("metadata", pa.string()),
    ("finish_reason", pa.string()),
    ("response_token_ids", TOKEN_IDS),
    # Each of the prompt's constraints (metadata's order), met or not; null without constraints.
    ("constraints_met", pa.list_(pa.bool_())),
])
