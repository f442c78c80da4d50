"""configs/paper/: the LarPO paper's GPU recipes load, validate and keep the paper's settings.

Nothing here resolves a model or reaches a hub: `load_config` validates keys,
types, ranges and registries only. The UltraFeedback-style prompt source
(a plain string column, a held-out slice of the one split) is checked on a
local dataset directory of the same shape.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from core.errors import PipelineError
from core.prompts import load_prompts
from pipeline.settings import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_DIR = REPO_ROOT / "configs" / "paper"
MODELS = {"mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2", "gemma-2-2b": "google/gemma-2-2b-it"}

# The paper's numbers: LarPO, Jin et al., "LLM Alignment as Retriever Optimization: An Information
# Retrieval Perspective", arXiv 2502.03699 (ICML 2025). The recipes are its objective study, the one
# that trains both models with every objective and Dong et al.'s (2024) reward model: Section 6.1,
# Table 3, settings in Appendix H.2.
PAPER = {
    "iterations": 3,                                  # App. H.2: "training on UltraFeedback dataset for 3 iterations"
    "learning_rate": 5e-7,                            # App. H.2: "The learning rate is set as 5e-7"
    "epochs": 2,                                      # App. H.2: "we train the LLM for 2 epochs per iteration"
    "prompts": "openbmb/UltraFeedback",               # App. H.2 (Table 2's runs too, Section 5)
    "reward_model": "sfairXC/FsfairX-LLaMA3-RM-v0.1",  # App. H.2: "the pretrained reward model from Dong et al.
                                                      # (2024)"; Table 2 names it FsfairX
    "reference": "previous",                          # Algorithm 1: the loss of iteration s against pi_beta = pi_theta_s
}
# Samples per prompt, App. H.2 (Table 3): "For the pairwise objective, we generate 2 responses for each
# prompt ... For the others, we generate 4 responses per prompt". (Table 2's runs, App. H.1: 2 for the
# iterative DPO baseline, 10 for each LarPO objective, Mistral-7b only.)
SAMPLES = {"dpo": 2, "contrastive": 4, "lambdarank": 4, "listmle": 4}
# objective -> (lists.strategy, num_positives, num_negatives), App. H.2: contrastive "the top-1 ranked
# response and the other responses" (1 vs 3 of 4); ListMLE and LambdaRank "the top-2 as positives and the
# last-2 as the negatives"; pairwise: the one pair of 2. Every sample is in the list.
LISTS = {
    "contrastive": ("top_bottom", 1, 3),
    "lambdarank": ("top_bottom", 2, 2),
    "listmle": ("top_bottom", 2, 2),
    "dpo": ("top_bottom", 1, 1),
}
# Sampling temperature. App. H.2 names none. Mistral-7b-it: 0.8, App. H.1 (chosen for Table 2's LarPO
# runs among 0.8-1.2). Gemma2-2b-it: 1, App. H.3 (its iterative DPO runs; Figure 6: below about 0.9 its
# training degrades).
TEMPERATURE = {"mistral-7b": 0.8, "gemma-2-2b": 1.0}
# Not the paper's: 2048 tokens of prompt + answer is the maximum length of Dong et al.'s (2024) recipe,
# which App. H.2 says it follows (RLHFlow/Online-RLHF: DPO max_length 2048, max_prompt_length 1000); the
# LarPO paper states no length.
MAX_LENGTH = 2048
# Keys whose values the paper does not give: each file's comment above them says they are ours.
OURS = ["prompts.per_round", "train.beta", "train.warmup_ratio", "train.batch_size", "train.micro_batch_size",
        "lists.ties", "lists.truncated", "generate.top_p"]
# Table 3's recipes (the objective study, App. H.2); Table 2's (App. H.1, ranked by PairRM) have "pairrm" in their name.
PAPER_FILES = sorted(p for p in PAPER_DIR.glob("*.yaml") if "-pairrm-" not in p.name)
PAIRRM_FILES = sorted(PAPER_DIR.glob("*-pairrm-*.yaml"))
# Table 2 (Section 5, App. H.1): Mistral-7b-it, 10 samples for each LarPO objective and 2 for the iterative DPO
# baseline, LLM-Blender's PairRM as reranker, temperature 0.8.
TABLE2 = {"samples": {"dpo": 2, "contrastive": 10}, "reranker": "llm-blender/PairRM-hf", "temperature": 0.8}


def comment_above(text: str, dotted: str) -> str:
    """The comment lines right above `section: key:` in a recipe's YAML text, joined."""
    section, key = dotted.split(".")
    lines = text.splitlines()
    start = lines.index(f"{section}:")
    index = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {key}:"))
    above = []
    while lines[index - 1].lstrip().startswith("#"):
        index -= 1
        above.insert(0, lines[index].strip("# "))
    return " ".join(above)


def test_one_file_per_model_and_objective():
    assert {p.stem for p in PAPER_FILES} == {f"{m}-{o}" for m in MODELS for o in LISTS}


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_config_loads_and_keeps_the_papers_settings(path):
    config = load_config(path)
    model_key, objective = re.fullmatch(r"(.+)-(\w+)", path.stem).groups()
    assert config.model.name == MODELS[model_key]
    assert config.train.objective == objective

    # The paper's settings (App. H.2).
    assert config.generate.num_samples == SAMPLES[objective]
    assert config.generate.temperature == TEMPERATURE[model_key] and config.generate.temperatures == []
    assert config.train.learning_rate == PAPER["learning_rate"]
    assert config.train.epochs == PAPER["epochs"]
    strategy, positives, negatives = LISTS[objective]
    assert (config.lists.strategy, config.lists.num_positives, config.lists.num_negatives) == (
        strategy, positives, negatives)
    # Every sample is in the list, and the trainer keeps the whole list.
    assert positives + negatives == config.generate.num_samples == config.train.max_list_size
    assert config.lists.memory == "none"  # H.2 ranks the iteration's own samples (Table 4's "w. current")
    assert config.reward.name == "hf_classifier" and config.reward.model == PAPER["reward_model"]
    assert config.reference.policy == PAPER["reference"]

    # UltraFeedback: the string column `instruction`, a held-out slice disjoint from training.
    assert config.prompts.train == f"hf:{PAPER['prompts']}:train[:98%]"
    assert config.prompts.heldout == f"hf:{PAPER['prompts']}:train[98%:]"
    assert config.prompts.messages_field == "instruction"
    # The paper's iterations of disjoint prompts out of about 62.7k (98% of 63,967).
    assert PAPER["iterations"] * config.prompts.per_round <= 62_000
    # hf_classifier reads no metadata, and UltraFeedback's `completions` would be copied into every
    # candidate row; a repeated instruction is dropped (and counted), not a stopped round.
    assert config.prompts.metadata_fields == []
    assert config.prompts.duplicates == "drop"

    # 2048 tokens of prompt + answer (Dong et al.'s length) in the engine and in the trainer, split
    # into a prompt of up to 1024 tokens and an answer of up to 1024: the trainer cuts nothing the
    # engine made, and the held-out answers are no longer than the training ones.
    assert config.model.max_model_len == config.train.max_length == MAX_LENGTH
    assert config.generate.max_tokens == config.model.max_model_len - 1024
    assert config.evaluate.max_tokens <= config.generate.max_tokens

    # GPU settings.
    assert config.generate.dtype == "bfloat16" and config.reward.dtype == "bfloat16"
    assert config.train.dtype == "float32" and config.train.autocast == "on"  # fp32 master weights, bf16 compute
    assert config.reward.num_gpus_per_actor == 1
    assert config.train.gradient_checkpointing
    assert config.train.sharding == ("fsdp" if model_key == "mistral-7b" else "none")
    assert config.train.num_workers > 1 and config.generate.num_actors > 1
    assert config.train.batch_size % (config.train.micro_batch_size * config.train.num_workers) == 0


def test_table_2s_comparison_with_iterative_dpo_has_a_recipe_for_each_side():
    assert {p.stem for p in PAIRRM_FILES} == {"mistral-7b-pairrm-dpo", "mistral-7b-pairrm-contrastive"}


@pytest.mark.parametrize("path", PAIRRM_FILES, ids=lambda p: p.stem)
def test_pairrm_recipe_loads_and_keeps_table_2s_settings(path):
    config = load_config(path)
    objective = path.stem.rsplit("-", 1)[1]
    assert config.model.name == MODELS["mistral-7b"] and config.train.objective == objective
    assert config.reward.name == "pairrm" and config.reward.model == TABLE2["reranker"]
    assert config.generate.num_samples == TABLE2["samples"][objective]
    assert config.generate.temperature == TABLE2["temperature"]
    strategy, positives, negatives = LISTS[objective]
    assert (config.lists.strategy, config.lists.num_positives, config.lists.num_negatives) == (
        strategy, positives, negatives)
    assert config.train.max_list_size == positives + negatives
    # Table 2 gives no learning rate or epochs: App. H.2's, as the Table 3 recipes.
    assert (config.train.learning_rate, config.train.epochs) == (PAPER["learning_rate"], PAPER["epochs"])
    assert config.reference.policy == PAPER["reference"]
    assert config.prompts.train == f"hf:{PAPER['prompts']}:train[:98%]"
    # PairRM's own truncation, and its scores compare only the answers seen together: no pooled memory.
    assert (config.reward.pairrm.source_max_length, config.reward.pairrm.candidate_max_length) == (1224, 412)
    assert config.lists.memory == "none"
    text = path.read_text()
    assert "Table 2" in text and "Appendix H.1" in text
    assert f"make rounds N={PAPER['iterations']} CONFIG=configs/paper/{path.name}" in text
    for dotted in ("lists.ties", "lists.truncated", "lists.memory", "train.beta"):
        comment = comment_above(text, dotted).lower()
        assert "ours" in comment or "not in the paper" in comment, f"{dotted}: {comment!r}"


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_comments_tell_the_papers_values_from_ours(path):
    text = path.read_text()
    for dotted in OURS:
        comment = comment_above(text, dotted).lower()
        assert "ours" in comment or "not in the paper" in comment, f"{dotted}: {comment!r}"
    for dotted, where in [("generate.num_samples", "H.2"), ("train.learning_rate", "H.2"), ("train.epochs", "H.2"),
                          ("model.max_model_len", "Dong et al."), ("generate.temperature", "H.")]:
        assert where in comment_above(text, dotted), dotted
    assert "Table 3" in text and "Appendix H.2" in text


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_header_says_how_to_run_three_rounds(path):
    text = path.read_text()
    header = text[:text.index("\nseed:")]
    assert all(line.startswith("#") for line in header.splitlines()), "the header is comments only"
    assert f"make rounds N={PAPER['iterations']} CONFIG=configs/paper/{path.name}" in header
    # The header's check of the prompt set reads it as the recipe does: repeats dropped, not refused.
    assert "duplicates='drop'" in header and "refused" not in header
    # Every knob is written out (torchtune style), not left to defaults.
    raw = yaml.safe_load(text)
    for section in ("model", "prompts", "generate", "reward", "lists", "reference", "train", "evaluate"):
        assert section in raw


# --- prompts: a plain string column (UltraFeedback's `instruction`) -------------------------

UF_ROWS = [{"instruction": f"Question number {i}: explain something.", "source": "evol_instruct",
            "models": ["a", "b"]} for i in range(8)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_string_column_becomes_one_user_message(tmp_path):
    prompts = load_prompts(str(write_jsonl(tmp_path / "uf.jsonl", UF_ROWS)), "instruction")
    assert len(prompts) == 8
    assert prompts[0].messages == [{"role": "user", "content": UF_ROWS[0]["instruction"]}]
    assert prompts[0].prompt_id.startswith("p-")
    assert prompts[0].metadata == {"source": "evol_instruct", "models": ["a", "b"]}
    # The id is the one the same text gets as chat messages.
    as_chat = write_jsonl(tmp_path / "chat.jsonl",
                          [{"messages": [{"role": "user", "content": r["instruction"]}]} for r in UF_ROWS])
    assert [p.prompt_id for p in load_prompts(str(as_chat))] == [p.prompt_id for p in prompts]


def test_string_column_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(UF_ROWS), path)
    prompts = load_prompts(str(path), "instruction")
    assert [p.messages[0]["content"] for p in prompts] == [r["instruction"] for r in UF_ROWS]


def test_empty_string_prompt_is_refused(tmp_path):
    rows = UF_ROWS[:2] + [{"instruction": "   ", "prompt_id": "blank"}]
    with pytest.raises(PipelineError) as info:
        load_prompts(str(write_jsonl(tmp_path / "uf.jsonl", rows)), "instruction")
    assert "row 3" in str(info.value) and "'blank'" in str(info.value) and "empty" in str(info.value)


def test_a_string_among_chat_messages_is_still_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"prompt_id": "s", "messages": "plain"}]
    with pytest.raises(PipelineError) as info:
        load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert "row 2" in str(info.value) and "'s'" in str(info.value)


def test_repeated_string_prompt_is_refused_naming_both_rows(tmp_path):
    rows = UF_ROWS[:3] + [UF_ROWS[1]]
    with pytest.raises(PipelineError) as info:
        load_prompts(str(write_jsonl(tmp_path / "uf.jsonl", rows)), "instruction")
    assert "rows 2 and 4" in str(info.value)


@pytest.mark.parametrize("path", PAPER_FILES[:1], ids=lambda p: p.stem)
def test_recipe_prompt_options_on_ultrafeedback_rows(tmp_path, caplog, path):
    from pipeline.driver import prompt_options

    rows = [{**r, "completions": [{"response": "an answer", "critique": "fine"}] * 4} for r in UF_ROWS]
    rows.insert(5, dict(rows[2], source="sharegpt"))  # the same instruction from another source
    options = prompt_options(load_config(path))
    with caplog.at_level("INFO", logger="pipeline"):
        prompts = load_prompts(str(write_jsonl(tmp_path / "uf.jsonl", rows)), **options)
    assert [p.messages[0]["content"] for p in prompts] == [r["instruction"] for r in UF_ROWS]
    assert all(p.metadata == {} for p in prompts)
    assert any("dropped 1 " in r.getMessage() for r in caplog.records)


def test_held_out_slice_of_the_one_split_is_disjoint(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    directory = tmp_path / "ultrafeedback"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", UF_ROWS)
    train = load_prompts(f"hf:{directory}:train[:75%]", "instruction")
    heldout = load_prompts(f"hf:{directory}:train[75%:]", "instruction")
    assert (len(train), len(heldout)) == (6, 2)
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in heldout}
    assert heldout[0].messages[0]["content"] == UF_ROWS[6]["instruction"]
