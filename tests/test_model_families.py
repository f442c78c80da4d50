"""The model-family matrix: every family's log-probs are its own, on our path and in vLLM.

Tiny random-weight checkpoints of each family (tests/tiny_families.py) are built once per
session. CPU checks, every family: our chunked log-probs (one row per item, and packed after a
shared prompt) equal log_softmax(model(ids).logits) gathered; the load-time check passes it,
and refuses it once the family's logit transform is taken away. vLLM checks (e2e), every family
vLLM-CPU serves, one at a time (tests/family_engine_check.py): the scored ids are the
sampled ids, our log-probs are vLLM's own, and a kept engine that reloads a checkpoint saved by
the trainer after a step computes that checkpoint and answers as a fresh engine on it does.
docs/models.md gives the tolerances reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import PipelineError
from pools import logprobs
from pools.logprob_scorer import (PROBE_ANSWERS, PROBE_PROMPT, attention_for, check_logprob_path, load_policy,
                                  logprob_gap, model_logprobs)
from pools.logprobs import tokenize_example
from tests.conftest import REPO_ROOT
from tests.tiny_families import END_OF_TEXT, END_OF_TURN, FAMILIES, build_family

# Per-token agreement asked of fp32 paths (ours against transformers' forward, ours against vLLM's).
FP32_TOLERANCE = 1e-4
VLLM_FAMILIES = [name for name, family in FAMILIES.items() if family.no_vllm is None]
# Families that do something after the head: without it their log-probs are not the model's.
TRANSFORMED = [name for name in FAMILIES if name in ("gemma2", "granite", "cohere")]


@pytest.fixture(scope="session")
def family_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, tiny_model, root / name) for name in FAMILIES}


def probe_items(tokenizer) -> list[tuple[list[int], int]]:
    return [tokenize_example(tokenizer, PROBE_PROMPT, tokenizer.encode(answer, add_special_tokens=False), 10**6)
            for answer in PROBE_ANSWERS]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_our_logprobs_are_the_models_own(family_dirs, name):
    model, tokenizer = load_policy(str(family_dirs[name]), "float32")  # the load-time check passes too
    assert model.config.model_type == FAMILIES[name].model_type
    items = probe_items(tokenizer)
    assert logprob_gap(model, tokenizer, items) < FP32_TOLERANCE
    # Packed and plain rows both were compared; the values are real log-probs, not zeros.
    assert all(value < -1.0 for value in model_logprobs(model, items))


@pytest.mark.parametrize("name", TRANSFORMED)
def test_the_load_check_refuses_a_family_whose_logit_transform_is_missing(family_dirs, name, monkeypatch):
    model, tokenizer = load_policy(str(family_dirs[name]), "float32")
    monkeypatch.setattr(logprobs, "LOGIT_TRANSFORMS", {})
    with pytest.raises(PipelineError, match=r"differ from the model's own logits by .* nats per token") as caught:
        check_logprob_path(model, tokenizer, str(family_dirs[name]))
    assert "\n" not in str(caught.value)


def test_gemma2_scores_with_an_attention_that_applies_its_soft_cap(family_dirs):
    from transformers import AutoModelForCausalLM

    path = family_dirs["gemma2"]
    model, tokenizer = load_policy(str(path), "float32")
    assert attention_for(model.config) == "eager" and model.config._attn_implementation == "eager"
    # sdpa ignores attn_logit_softcapping: the same weights give other log-probs there.
    sdpa = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    items = probe_items(tokenizer)
    ours, theirs = model_logprobs(model, items), model_logprobs(sdpa, items)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) > 0.1
    assert attention_for(load_policy(str(family_dirs["llama-tied"]), "float32")[0].config) is None


def test_a_family_whose_chats_end_in_another_token_keeps_it(family_dirs):
    from transformers import AutoTokenizer, GenerationConfig

    path = family_dirs["gemma2"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token_id == END_OF_TEXT
    assert GenerationConfig.from_pretrained(path).eos_token_id == [END_OF_TEXT, END_OF_TURN]
    ids, num_prompt = tokenize_example(tokenizer, PROBE_PROMPT, [5, 6, END_OF_TURN], 10**6)
    assert ids[num_prompt:] == [5, 6, END_OF_TURN]


@pytest.fixture(scope="session")
def engine_results(family_dirs, tmp_path_factory) -> dict[str, dict]:
    """tests/family_engine_check.py for every family vLLM-CPU serves, all in one process."""
    work = tmp_path_factory.mktemp("engines")
    done = subprocess.run([sys.executable, "-m", "tests.family_engine_check", str(work),
                           *(str(family_dirs[name]) for name in VLLM_FAMILIES)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    results = {Path(row["model"]).name: row for row in
               (json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT "))}
    assert done.returncode == 0 and set(results) == set(VLLM_FAMILIES), done.stderr[-3000:]
    return results


@pytest.mark.e2e
@pytest.mark.parametrize("name", VLLM_FAMILIES)
def test_vllm_samples_are_scored_exactly(engine_results, name):
    result = engine_results[name]
    base = result["base"]
    assert base["prompt_mismatches"] == 0, "our chat prompt ids differ from vLLM's"
    assert base["max_gap_per_token"] < FP32_TOLERANCE, "our log-probs of vLLM's samples are not vLLM's"
    stops = {END_OF_TEXT, END_OF_TURN} if FAMILIES[name].stop_is_not_eos else {END_OF_TURN}
    for sample in base["samples"]:
        if sample["finish_reason"] == "stop":
            assert sample["last"] in stops
        else:
            assert sample["finish_reason"] == "length" and sample["length"] == 24
            assert sample["last"] not in stops


@pytest.mark.e2e
def test_the_matrix_saw_stops_truncations_and_text_that_does_not_round_trip(engine_results):
    samples = [s for result in engine_results.values() for s in result["base"]["samples"]]
    reasons = {s["finish_reason"] for s in samples}
    assert reasons == {"stop", "length"}
    # Gemma-2's stand-in stops on its end-of-turn token, which is not its tokenizer's eos.
    gemma = [s for s in engine_results["gemma2"]["base"]["samples"] if s["finish_reason"] == "stop"]
    assert gemma and all(s["last"] == END_OF_TURN != engine_results["gemma2"]["eos_token_id"] for s in gemma)
    # Re-tokenizing the text would have scored other tokens than were sampled.
    assert any(s["text_ids"] != [t for t in s["ids"] if t not in (END_OF_TEXT, END_OF_TURN)] for s in samples)


@pytest.mark.e2e
@pytest.mark.parametrize("name", VLLM_FAMILIES)
def test_a_reloaded_engine_computes_the_trained_checkpoint(engine_results, name):
    result = engine_results[name]
    assert result["reloaded"]["max_gap_per_token"] < FP32_TOLERANCE
    # One step moves some families' log-probs by hundredths of a nat per token: far above the
    # reloaded engine's gap, which is what shows the reload replaced the weights.
    assert result["base_model_gap_after_reload"] > max(1e-3, 100 * result["reloaded"]["max_gap_per_token"]), \
        "the reload changed nothing: the test could not fail"
    assert result["reloaded_greedy"] == result["fresh_greedy"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["gemma2", "granite"])
def test_a_smoke_round_runs_on_another_family(family_dirs, name, tmp_path):
    import pyarrow.parquet as pq

    from tests.conftest import run_cli

    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", name, "--output", str(tmp_path),
                     f"model.name={family_dirs[name]}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    round_dir = tmp_path / name / "round_001"
    candidates = pq.read_table(round_dir / "candidates").to_pylist()
    stops = {END_OF_TEXT, END_OF_TURN} if FAMILIES[name].stop_is_not_eos else {END_OF_TURN}
    for row in candidates:
        assert len(row["response_token_ids"]) == row["num_tokens"]
        assert (row["response_token_ids"][-1] in stops) == (row["finish_reason"] == "stop")
    train = pq.read_table(round_dir / "train").to_pylist()
    assert train and all(item["response_token_ids"] for row in train for item in row["positives"] + row["negatives"])
    assert (round_dir / "policy" / "model.safetensors").is_file() and (round_dir / "metrics.json").is_file()
