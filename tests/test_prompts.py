"""core/prompts.py: prompt sources, validation, round slices, context fitting."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import PipelineError
from core.prompts import Prompt, fit_to_context, load_prompts, prompt_token_count, round_slice

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO_ROOT / ".cache" / "models" / "tiny-random-llama"

ROWS = [
    {"prompt_id": "a", "messages": [{"role": "user", "content": "Write a haiku."}],
     "constraints": [{"kind": "lowercase"}], "source": "x"},
    {"prompt_id": "b", "messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a colour."}],
     "constraints": [], "source": "y"},
    {"messages": [{"role": "user", "content": "No id here."}], "constraints": [], "source": "z"},
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pipeline_error(source: str, messages_field: str = "messages") -> str:
    with pytest.raises(PipelineError) as info:
        load_prompts(source, messages_field)
    message = str(info.value)
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of the test's dataset directories out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def check_rows(prompts: list[Prompt]) -> None:
    assert [p.prompt_id for p in prompts[:2]] == ["a", "b"]
    assert prompts[0].messages == ROWS[0]["messages"]
    assert prompts[1].messages == ROWS[1]["messages"]
    assert prompts[0].metadata == {"constraints": [{"kind": "lowercase"}], "source": "x"}
    assert prompts[1].metadata["source"] == "y"
    assert prompts[2].prompt_id.startswith("p-")
    assert prompts[2].metadata["source"] == "z"
    for p in prompts:
        assert "messages" not in p.metadata and "prompt_id" not in p.metadata


# --- sources -------------------------------------------------------------------

def test_load_jsonl(tmp_path):
    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", ROWS)))
    assert len(prompts) == 3
    check_rows(prompts)


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert [p.prompt_id for p in load_prompts(str(path))] == ["a", "b"]


def test_load_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    prompts = load_prompts(str(path))
    assert len(prompts) == 3
    check_rows(prompts)


def test_load_dataset_directory(tmp_path, datasets_cache):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", ROWS)
    prompts = load_prompts(str(directory))
    assert len(prompts) == 3
    check_rows(prompts)


def test_load_hf_prefix_with_local_directory(tmp_path, datasets_cache):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    write_jsonl(directory / "data.jsonl", ROWS)
    prompts = load_prompts(f"hf:{directory}")
    assert len(prompts) == 3
    check_rows(prompts)


def test_hf_dataset_that_cannot_be_loaded(tmp_path, datasets_cache):
    directory = tmp_path / "empty_dataset"
    directory.mkdir()
    message = pipeline_error(f"hf:{directory}")
    assert str(directory) in message


def test_custom_messages_field(tmp_path):
    rows = [{"prompt_id": "c1", "conversation": user("hi"), "messages": "kept as metadata"}]
    [prompt] = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), "conversation")
    assert prompt.messages == user("hi")
    assert prompt.metadata == {"messages": "kept as metadata"}


def test_messages_are_normalised_to_role_and_content(tmp_path):
    rows = [{"prompt_id": "a", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}]
    [prompt] = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert prompt.messages == user("hi")


def test_numeric_prompt_id_becomes_a_string(tmp_path):
    [prompt] = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": 7, "messages": user("x")}])))
    assert prompt.prompt_id == "7"


def test_repository_prompt_files_load():
    prompts = load_prompts(str(REPO_ROOT / "data" / "prompts" / "smoke_train.jsonl"))
    assert prompts and all(p.messages for p in prompts)
    assert all("constraints" in p.metadata for p in prompts)


# --- metadata fields --------------------------------------------------------------

def test_metadata_fields_keep_only_the_listed_columns(tmp_path):
    rows = ROWS + [{"prompt_id": "d", "messages": user("no constraints"), "source": "w"}]
    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), metadata_fields=["constraints"])
    assert [p.metadata for p in prompts] == [{"constraints": [{"kind": "lowercase"}]}, {"constraints": []},
                                             {"constraints": []}, {}]  # absent from row 4: absent, no error


def test_metadata_fields_none_keeps_every_column_and_empty_keeps_none(tmp_path):
    path = str(write_jsonl(tmp_path / "p.jsonl", ROWS))
    check_rows(load_prompts(path, metadata_fields=None))
    assert all(p.metadata == {} for p in load_prompts(path, metadata_fields=[]))


def test_metadata_field_in_no_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(PipelineError) as info:
        load_prompts(str(path), metadata_fields=["constraints", "constraint"])
    message = str(info.value)
    assert "'constraint'" in message and str(path) in message and "metadata_fields" in message
    assert "\n" not in message


# --- derived prompt ids --------------------------------------------------------------

def test_derived_prompt_id_is_stable_and_content_based(tmp_path):
    rows = [{"messages": user("one")}, {"messages": user("two")}, {"prompt_id": "", "messages": user("three")}]
    first = load_prompts(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    # same messages in another file, another order, with other metadata: same ids
    again = load_prompts(str(write_jsonl(tmp_path / "b.jsonl",
                                         [{**r, "extra": i} for i, r in enumerate(reversed(rows))])))
    ids = {p.messages[0]["content"]: p.prompt_id for p in first}
    assert {p.messages[0]["content"]: p.prompt_id for p in again} == ids
    assert len(set(ids.values())) == 3
    assert all(i.startswith("p-") for i in ids.values())
    # the id is derived from the messages, not from the row position
    [only] = load_prompts(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": user("two")}])))
    assert only.prompt_id == ids["two"]


def test_derived_id_depends_on_role(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "same"}]},
            {"messages": [{"role": "system", "content": "same"}]}]
    a, b = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert a.prompt_id != b.prompt_id


# --- errors ------------------------------------------------------------------------

def test_row_without_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], {"prompt_id": "bad-one", "text": "hi"}])
    message = pipeline_error(str(path))
    assert str(path) in message
    assert "row 2" in message
    assert "'bad-one'" in message
    assert "'messages'" in message


def test_row_without_custom_messages_field_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "x", "messages": user("hi")}])
    message = pipeline_error(str(path), "conversation")
    assert "'conversation'" in message and "row 1" in message


@pytest.mark.parametrize("messages", ["hello", {"role": "user", "content": "hi"}, [], 5])
def test_messages_not_a_non_empty_list(tmp_path, messages):
    path = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], ROWS[1], {"prompt_id": "m3", "messages": messages}])
    message = pipeline_error(str(path))
    assert str(path) in message and "row 3" in message and "'m3'" in message


@pytest.mark.parametrize("broken", [{"instruction": None}, {}, {"instruction": user("chat")}])
def test_a_broken_row_in_a_string_column_is_the_one_named(tmp_path, broken):
    # The column's kind comes from its first row (a string), so rows 1-2 are fine and row 3 is named.
    rows = [{"instruction": "one"}, {"instruction": "two"}, {"prompt_id": "r3", **broken}, {"instruction": "four"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    message = pipeline_error(str(path), "instruction")
    assert "row 3" in message and "'r3'" in message and "'instruction'" in message
    if "instruction" in broken and broken["instruction"] is not None:
        assert "plain string" in message and "row 1" in message and "list" in message


def test_string_column_kind_comes_from_the_first_row_that_has_it(tmp_path):
    rows = [{"prompt_id": "r1"}, {"instruction": "two"}]
    message = pipeline_error(str(write_jsonl(tmp_path / "p.jsonl", rows)), "instruction")
    assert "row 1" in message and "has no 'instruction'" in message


@pytest.mark.parametrize("bad", [
    {"content": "no role"},
    {"role": "user"},
    {"role": "narrator", "content": "unknown role"},
    {"role": "user", "content": 5},
    "just a string",
])
def test_message_without_role_or_content(tmp_path, bad):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt_id": "m1", "messages": [{"role": "user", "content": "ok"}, bad]}])
    message = pipeline_error(str(path))
    assert str(path) in message and "row 1" in message and "'m1'" in message
    assert "role" in message and "content" in message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    message = pipeline_error(str(path))
    assert str(path) in message and "line 3" in message and "JSON" in message


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    message = pipeline_error(str(path))
    assert str(path) in message and "line 2" in message


def test_duplicate_prompt_id(tmp_path):
    rows = [{"prompt_id": "dup", "messages": user("one")}, {"prompt_id": "other", "messages": user("two")},
            {"prompt_id": "dup", "messages": user("three")}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    message = pipeline_error(str(path))
    assert str(path) in message and "'dup'" in message
    assert "rows 1 and 3" in message


def test_duplicates_error_is_the_default(tmp_path):
    rows = [{"prompt_id": "dup", "messages": user("one")}, {"prompt_id": "dup", "messages": user("two")}]
    with pytest.raises(PipelineError, match="rows 1 and 2"):
        load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)), duplicates="error")


def test_duplicates_drop_keeps_the_first_and_logs_the_count(tmp_path, caplog):
    rows = [{"prompt_id": "dup", "messages": user("one")}, {"prompt_id": "other", "messages": user("two")},
            {"prompt_id": "dup", "messages": user("three")}, {"messages": user("same")},
            {"messages": user("same")}, {"prompt_id": "dup", "messages": user("four")}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level("INFO", logger="pipeline"):
        prompts = load_prompts(str(path), duplicates="drop")
    assert [p.messages[0]["content"] for p in prompts] == ["one", "two", "same"]
    [record] = [r for r in caplog.records if r.name == "pipeline"]
    assert "dropped 3 " in record.getMessage() and str(path) in record.getMessage()


def test_duplicates_drop_logs_nothing_without_repeats(tmp_path, caplog):
    with caplog.at_level("INFO", logger="pipeline"):
        load_prompts(str(write_jsonl(tmp_path / "p.jsonl", ROWS)), duplicates="drop")
    assert not [r for r in caplog.records if r.name == "pipeline"]


def test_duplicate_derived_prompt_id(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": user("same")}, {"messages": user("same")}])
    message = pipeline_error(str(path))
    assert "rows 1 and 2" in message


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    message = pipeline_error(str(path))
    assert str(path) in message and "empty" in message


def test_empty_parquet_file(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": pa.array([], pa.string())}), path)
    assert "empty" in pipeline_error(str(path))


def test_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    message = pipeline_error(str(path))
    assert str(path) in message and "does not exist" in message


@pytest.mark.parametrize("name", ["p.json", "p.csv", "prompts"])
def test_wrong_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(ROWS[0]) + "\n")
    message = pipeline_error(str(path))
    assert str(path) in message and ".jsonl" in message and ".parquet" in message


def test_damaged_parquet_file(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"this is not parquet at all")
    message = pipeline_error(str(path))
    assert str(path) in message


# --- round slices ------------------------------------------------------------------

def pool(n: int) -> list[Prompt]:
    return [Prompt(f"id-{i:03d}", user(f"prompt {i}")) for i in range(n)]


def ids(prompts: list[Prompt]) -> list[str]:
    return [p.prompt_id for p in prompts]


def test_round_slice_is_deterministic():
    prompts = pool(50)
    for round_number in (1, 2, 7):
        assert ids(round_slice(prompts, round_number, 8, seed=3)) == ids(round_slice(prompts, round_number, 8, seed=3))
    # a shuffle, not the file order, and it depends on the seed
    assert ids(round_slice(prompts, 1, 50, seed=0)) != ids(prompts)
    assert ids(round_slice(prompts, 1, 8, seed=0)) != ids(round_slice(prompts, 1, 8, seed=1))


def test_rounds_are_disjoint_while_the_pool_lasts():
    prompts = pool(30)
    rounds = [ids(round_slice(prompts, r, 10, seed=5)) for r in (1, 2, 3)]
    for chosen in rounds:
        assert len(chosen) == 10 and len(set(chosen)) == 10
    assert not set(rounds[0]) & set(rounds[1])
    assert not set(rounds[1]) & set(rounds[2])
    assert set(rounds[0]) | set(rounds[1]) | set(rounds[2]) == set(ids(prompts))


def test_round_slice_wraps_around():
    prompts = pool(10)
    order = ids(round_slice(prompts, 1, 10, seed=2))  # the whole shuffle
    assert sorted(order) == ids(prompts)
    assert ids(round_slice(prompts, 1, 4, seed=2)) == order[0:4]
    assert ids(round_slice(prompts, 2, 4, seed=2)) == order[4:8]
    assert ids(round_slice(prompts, 3, 4, seed=2)) == order[8:10] + order[0:2]
    assert ids(round_slice(prompts, 4, 4, seed=2)) == order[2:6]


def test_round_slice_larger_than_pool_gives_each_prompt_once():
    prompts = pool(5)
    chosen = ids(round_slice(prompts, 3, 64, seed=0))
    assert sorted(chosen) == ids(prompts)


def test_round_slice_does_not_mutate_the_pool():
    prompts = pool(12)
    before = ids(prompts)
    round_slice(prompts, 2, 5, seed=9)
    assert ids(prompts) == before


# --- token counting ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_prompt_token_count_matches_the_chat_template(tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there, how are you?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_token_count(tokenizer, messages) == len(encoded["input_ids"])
    # the template (and generation prompt) adds tokens around the bare content
    bare = len(tokenizer("Hello there, how are you?", add_special_tokens=False)["input_ids"])
    assert prompt_token_count(tokenizer, user("Hello there, how are you?")) > bare


def test_prompt_token_count_grows_with_content(tokenizer):
    short = prompt_token_count(tokenizer, user("word"))
    long = prompt_token_count(tokenizer, user("word " * 200))
    assert long - short >= 150


def test_fit_to_context_drop(tokenizer):
    short = Prompt("short", user("Hi."))
    long = Prompt("long-one", user("lorem ipsum dolor " * 100))
    other = Prompt("short-2", user("Bye."))
    limit = max(prompt_token_count(tokenizer, short.messages), prompt_token_count(tokenizer, other.messages))
    assert prompt_token_count(tokenizer, long.messages) > limit
    kept, dropped = fit_to_context([short, long, other], tokenizer, limit, "drop")
    assert ids(kept) == ["short", "short-2"]
    assert dropped == ["long-one"]


def test_fit_to_context_boundary_is_inclusive(tokenizer):
    prompt = Prompt("exact", user("Exactly fits."))
    n = prompt_token_count(tokenizer, prompt.messages)
    assert fit_to_context([prompt], tokenizer, n, "error") == ([prompt], [])
    assert fit_to_context([prompt], tokenizer, n - 1, "drop") == ([], ["exact"])


def test_fit_to_context_error(tokenizer):
    short = Prompt("short", user("Hi."))
    long = Prompt("too-long-id", user("lorem ipsum dolor " * 100))
    limit = prompt_token_count(tokenizer, short.messages)
    with pytest.raises(PipelineError) as info:
        fit_to_context([short, long], tokenizer, limit, "error")
    message = str(info.value)
    assert "'too-long-id'" in message
    assert str(limit) in message
    assert "\n" not in message
