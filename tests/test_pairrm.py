"""The pairrm reward on a tiny random-weight PairRM saved locally (rewards.pairrm.build_tiny_pairrm)."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.errors import ConfigError, PipelineError
from rewards import REWARDS, Sample, build_reward_from_config
from rewards.pairrm import (CAND1_PREFIX, CAND2_PREFIX, SOURCE_PREFIX, PairwiseRanker, build_tiny_pairrm,
                            pairrm_class, pairwise_scores)

PROMPT = [{"role": "user", "content": "Tell me about tea."}]
OTHER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
ANSWERS = ["tea is good", "water", "the best answer is tea, steep green leaves slowly", "no",
           "Paris is the capital of France"]


def reference_keys(num_layers: int) -> set[str]:
    """PairRM's state-dict keys, as llm-blender's DebertaV2PairRM (pair_ranker/pairrm.py) names them.

    `pretrained_model` is transformers 4.x's DebertaV2Model under PairRM-hf's config: relative attention with
    a shared key (share_att_key: no pos_key_proj/pos_query_proj), norm_rel_ebd layer_norm (encoder.LayerNorm),
    no absolute position or token-type embeddings (position_biased_input false, type_vocab_size 0) and no
    conv layer; `head_layer` is Sequential(Dropout, Linear, Tanh, Dropout, Linear), weights at 1 and 4.
    """
    layer = ["attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
             "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
             "output.LayerNorm"]
    modules = (["embeddings.LayerNorm", "encoder.LayerNorm"]
               + [f"encoder.layer.{i}.{name}" for i in range(num_layers) for name in layer])
    keys = {f"pretrained_model.{m}.{p}" for m in modules for p in ("weight", "bias")}
    keys |= {"pretrained_model.embeddings.word_embeddings.weight", "pretrained_model.encoder.rel_embeddings.weight"}
    return keys | {f"head_layer.{i}.{p}" for i in (1, 4) for p in ("weight", "bias")}


def tokenize_pair(tokenizer, source, candidate1, candidate2, source_max_length, candidate_max_length):
    """PairRM-hf's model-card tokenize_pair for one pair (also in allenai/reward-bench's models/pairrm.py)."""
    max_length = source_max_length + 2 * candidate_max_length
    source_ids = tokenizer.encode(SOURCE_PREFIX + source, max_length=source_max_length, truncation=True)
    candidate_max_length = (max_length - len(source_ids)) // 2
    candidate1_ids = tokenizer.encode(CAND1_PREFIX + candidate1, max_length=candidate_max_length, truncation=True)
    candidate2_ids = tokenizer.encode(CAND2_PREFIX + candidate2, max_length=candidate_max_length, truncation=True)
    return source_ids + candidate1_ids + candidate2_ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_pairrm(tmp_path_factory.mktemp("pairrm") / "tiny-pairrm")


@pytest.fixture
def ranker(checkpoint):
    return build_reward_from_config({"name": "pairrm", "model": str(checkpoint), "micro_batch_size": 8,
                                     "dtype": "float32"})


def samples(answers, prompt_id="p", prompt=PROMPT):
    return [Sample(prompt_id, prompt, answer, {}) for answer in answers]


def test_registered_and_built_from_the_reward_section(checkpoint):
    assert REWARDS["pairrm"] is PairwiseRanker
    ranker = build_reward_from_config({"name": "pairrm", "model": str(checkpoint), "micro_batch_size": 3,
                                       "dtype": "float32", "max_length": 7,  # hf_classifier's, not read here
                                       "pairrm": {"source_max_length": 40, "candidate_max_length": 20}})
    assert (ranker.batch_size, ranker.source_max_length, ranker.candidate_max_length) == (3, 40, 20)
    assert ranker.model.dtype == torch.float32


def test_config_errors(checkpoint):
    with pytest.raises(ConfigError, match="reward.model"):
        PairwiseRanker.from_config({"name": "pairrm"})
    with pytest.raises(ConfigError, match="source_max_length"):
        PairwiseRanker.from_config({"model": str(checkpoint), "pairrm": {"source_max_length": 2}})


def test_tiny_checkpoint_has_pairrm_layout_and_loads_every_key(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["DebertaV2PairRM"] and config["model_type"] == "deberta-v2"
    assert {"n_tasks", "drop_out", "source_prefix_id", "cand1_prefix_id", "cand2_prefix_id",
            "cand_prefix_id"} <= set(config)
    saved = set(load_file(checkpoint / "model.safetensors"))
    model, info = pairrm_class().from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert saved == set(model.state_dict()) == reference_keys(config["num_hidden_layers"])


def test_pairrm_key_names_load_strictly_into_our_model(checkpoint):
    model = pairrm_class().from_pretrained(checkpoint)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    # A state dict under PairRM's names (the values do not matter here) loads with nothing left over.
    model.load_state_dict({key: torch.zeros(shapes[key]) for key in reference_keys(2)}, strict=True)
    # PairRM-hf has 24 layers: the names follow the layer count.
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 24
    assert set(pairrm_class()(config).state_dict()) == reference_keys(24)


def test_missing_head_or_other_architecture_is_refused(checkpoint, tmp_path):
    headless = tmp_path / "headless"
    shutil.copytree(checkpoint, headless)
    weights = {k: v for k, v in load_file(headless / "model.safetensors").items() if not k.startswith("head_layer")}
    save_file(weights, headless / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PipelineError, match="lacks PairRM weights: head_layer"):
        PairwiseRanker(model=str(headless))

    classifier = tmp_path / "classifier"
    shutil.copytree(checkpoint, classifier)
    config = json.loads((classifier / "config.json").read_text())
    config["architectures"] = ["DebertaV2ForSequenceClassification"]
    (classifier / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="not a PairRM checkpoint"):
        PairwiseRanker(model=str(classifier))


def test_encoding_is_pairrm_tokenize_pair_with_its_truncation(checkpoint):
    ranker = PairwiseRanker(model=str(checkpoint), source_max_length=12, candidate_max_length=9)
    long_source = "the capital of france is paris and the morning tea is warm " * 3
    for source, answers in ((long_source, ["tea " * 30, "no"]), ("tea?", ["the best answer " * 10, "yes"])):
        source_ids, cand1, cand2 = ranker.encode_group(source, answers)
        for i in range(2):
            for j in range(2):
                expected = tokenize_pair(ranker.tokenizer, source, answers[i], answers[j], 12, 9)
                assert source_ids + cand1[i] + cand2[j] == expected
    # The long source is cut to 12; a short one leaves its room to the candidates.
    assert len(ranker.encode_group(long_source, ["x"])[0]) == 12
    assert len(ranker.encode_group("tea?", ["tea " * 30])[1][0]) == (12 + 2 * 9 - len(
        ranker.encode_group("tea?", ["x"])[0])) // 2


def test_markers_and_separators_written_in_answers_stay_text(ranker):
    source_ids, cand1, cand2 = ranker.encode_group("say " + CAND2_PREFIX, [f"a {CAND1_PREFIX} b [SEP] c", "d"])
    row = source_ids + cand1[0] + cand2[1]
    tokenizer = ranker.tokenizer
    for marker in (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX):
        assert row.count(tokenizer.convert_tokens_to_ids(marker)) == 1
    assert row.count(tokenizer.sep_token_id) == row.count(tokenizer.cls_token_id) == 3


def test_swapping_candidate_order_gives_the_same_scores(ranker):
    mixed = samples(ANSWERS) + samples(["yes", "Paris", "no idea"], "q", OTHER)
    scores = ranker.score(mixed)
    assert len({round(s, 6) for s in scores[:5]}) == 5  # distinct, so a mix-up would show
    order = [7, 2, 0, 5, 4, 1, 6, 3]
    shuffled = ranker.score([mixed[i] for i in order])
    assert [shuffled[order.index(i)] for i in range(len(mixed))] == scores


def test_scores_do_not_depend_on_batch_size(checkpoint):
    batch = samples(ANSWERS) + samples(["yes", "no"], "q", OTHER)
    one = PairwiseRanker(model=str(checkpoint), batch_size=1, dtype="float32").score(batch)
    many = PairwiseRanker(model=str(checkpoint), batch_size=64, dtype="float32").score(batch)
    assert many == pytest.approx(one, abs=1e-5)


def test_identical_answers_tie_exactly_and_are_not_compared(ranker):
    scores = ranker.score(samples(["tea is good", "water", "tea is good", "no"]))
    assert scores[0] == scores[2] and len(set(scores)) == 3
    assert ranker.comparisons == 3 * 2


def test_comparisons_counted_per_prompt(ranker):
    ranker.score(samples(ANSWERS[:4]) + samples(["yes", "Paris", "no idea"], "q", OTHER) + samples(["alone"], "r"))
    assert ranker.comparisons == 4 * 3 + 3 * 2 + 0
    ranker.score(samples(ANSWERS[:2]))
    assert ranker.comparisons == 4 * 3 + 3 * 2 + 2


def keyword_judge(ranker, keyword="tea", bias=0.0):
    """A forward that prefers the candidate holding `keyword`, plus a constant pull towards candidate 1."""
    tokenizer = ranker.tokenizer
    cand2 = tokenizer.convert_tokens_to_ids(CAND2_PREFIX)

    def forward(batch):
        logits = []
        for ids in batch:
            split = ids.index(cand2)
            first, second = tokenizer.decode(ids[:split]), tokenizer.decode(ids[split:])
            first = first.split(CAND1_PREFIX, 1)[1]
            logits.append(2.0 * ((keyword in first) - (keyword in second)) + bias)
        return logits
    return forward


def test_planted_better_answer_wins_whatever_the_position_bias(ranker, monkeypatch):
    answers = ["water", "warm tea", "no", "yes"]
    monkeypatch.setattr(ranker, "forward", keyword_judge(ranker))
    fair = ranker.score(samples(answers))
    monkeypatch.setattr(ranker, "forward", keyword_judge(ranker, bias=3.0))
    biased = ranker.score(samples(answers))
    assert max(range(4), key=fair.__getitem__) == 1
    assert biased == pytest.approx(fair)
    # "tea" wins 3 of 3 by logit 2, the others lose 1 of 3: scores 6/4 and -2/4.
    assert fair == pytest.approx([-0.5, 1.5, -0.5, -0.5])


def test_pairwise_scores_math():
    # Logits that fit strengths s exactly give back s less its mean.
    s = [1.0, -0.5, 2.0, 0.0]
    consistent = [[s[i] - s[j] if i != j else 0.0 for j in range(4)] for i in range(4)]
    mean = sum(s) / 4
    assert pairwise_scores(consistent) == pytest.approx([x - mean for x in s])
    # A constant pull to the first side cancels; the diagonal is never read.
    biased = [[consistent[i][j] + 0.8 if i != j else 99.0 for j in range(4)] for i in range(4)]
    assert pairwise_scores(biased) == pytest.approx(pairwise_scores(consistent))
    # Hand-made: a beats b (logit 1 in each order), c is b's twin.
    a_b_c = [[0.0, 1.0, 1.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]
    assert pairwise_scores(a_b_c) == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    # A model that cannot tell two answers apart leaves them tied, to the last bit, in any order.
    twins = [[0.0, 0.3, 0.7, 0.7], [0.1, 0.0, -0.2, -0.2], [0.4, 0.9, 0.0, 0.0], [0.4, 0.9, 0.0, 0.0]]
    scores = pairwise_scores(twins)
    assert scores[2] == scores[3] and sum(scores) == pytest.approx(0.0)
    assert pairwise_scores([[0.0]]) == [0.0] and pairwise_scores([]) == []
    nan = pairwise_scores([[0.0, float("nan")], [0.0, 0.0]])
    assert all(x != x for x in nan)
    inf = pairwise_scores([[0.0, float("inf")], [float("inf"), 0.0]])  # inf - inf: NaN, not an error
    assert all(x != x for x in inf)


def test_pairs_go_longest_first_and_out_of_memory_halves_the_batch(ranker, monkeypatch):
    batch = samples(ANSWERS)
    expected = ranker.score(batch)
    calls = []
    real_forward = ranker.forward

    def forward(rows):
        calls.append([len(ids) for ids in rows])
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(rows)

    monkeypatch.setattr(ranker, "forward", forward)
    assert ranker.score(batch) == pytest.approx(expected, abs=1e-6)
    assert [len(c) for c in calls[:3]] == [8, 4, 2] and ranker.batch_size == 2
    lengths = [n for c in calls if len(c) <= 2 for n in c]
    assert lengths == sorted(lengths, reverse=True) and len(lengths) == 5 * 4

    ranker.batch_size = 1
    monkeypatch.setattr(ranker, "forward", lambda rows: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(PipelineError, match="single pair"):
        ranker.score(batch)


# --- the reranker in the pipeline: config, batching, counting -------------------------------------

def test_the_reward_section_takes_pairrm_options_and_refuses_them_elsewhere(checkpoint):
    from pipeline.settings import load_config

    config = load_config(None, ["reward.name=pairrm", f"reward.model={checkpoint}",
                                "reward.pairrm.source_max_length=64", "lists.memory=none"])
    assert config.reward.pairrm.source_max_length == 64
    with pytest.raises(ConfigError, match="'reward.model' must name the PairRM checkpoint"):
        load_config(None, ["reward.name=pairrm", "lists.memory=none"])
    with pytest.raises(ConfigError, match="'reward.pairrm.candidate_max_length' has no effect with reward.name=ifeval"):
        load_config(None, ["reward.pairrm.candidate_max_length=100"])
    with pytest.raises(ConfigError, match="'lists.memory' must be none with reward.name=pairrm"):
        load_config(None, ["reward.name=pairrm", f"reward.model={checkpoint}", "lists.memory=previous"])


def test_a_pairwise_reward_gets_each_prompts_candidates_in_one_batch():
    from pools.reward_scorers import batch_rows
    from rewards.base import needs_whole_prompts

    prompt_ids = ["a", "b", "a", "c", "b", "a", "c", "c", "c"]
    lengths = [5, 1, 9, 2, 3, 4, 8, 7, 6]
    whole = batch_rows(prompt_ids, lengths, size=4, whole_prompts=True)
    assert sorted(i for batch in whole for i in batch) == list(range(9))
    for batch in whole:
        prompts = {prompt_ids[i] for i in batch}
        for prompt in prompts:  # every candidate of a prompt in the batch that has any of them
            assert {i for i, p in enumerate(prompt_ids) if p == prompt} <= set(batch)
    assert [sorted({prompt_ids[i] for i in batch}) for batch in whole] == [["b"], ["c"], ["a"]]
    assert batch_rows(prompt_ids, lengths, size=4, whole_prompts=False)[0] == [1, 3, 4, 5]
    assert needs_whole_prompts({"name": "pairrm"})
    assert needs_whole_prompts({"name": "composite", "composite": {"components": {"ifeval": 1.0, "pairrm": 0.5}}})
    assert not needs_whole_prompts({"name": "ifeval"})


def test_the_reward_actors_score_whole_prompts_and_count_comparisons(checkpoint, local_ray):
    from core.config import RewardConfig
    from pools.reward_scorers import score_candidates

    answers = {"p": ANSWERS[:4], "q": ANSWERS[2:5]}
    rows = [{"prompt_id": pid, "prompt": PROMPT, "response": answer, "metadata": "{}"}
            for pid, group in answers.items() for answer in group]
    reward = RewardConfig(name="pairrm", model=str(checkpoint), batch_size=2, micro_batch_size=8, dtype="float32")
    tally: dict[str, int] = {}
    rewards = score_candidates(rows, reward, tally=tally)
    assert tally == {"comparisons": 4 * 3 + 3 * 2}
    # The same scores as one call per prompt: each prompt was scored whole, despite batch_size 2.
    ranker = build_reward_from_config({"name": "pairrm", "model": str(checkpoint), "dtype": "float32"})
    alone = [s for pid, group in answers.items() for s in ranker.score(samples(group, pid))]
    assert rewards == pytest.approx(alone, abs=1e-5)


@pytest.mark.e2e
def test_a_smoke_round_ranked_by_pairrm(checkpoint, tmp_path, tiny_model):
    from tests.conftest import run_cli

    output = tmp_path / "runs"
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "pairrm", "--output", str(output),
                     "reward.name=pairrm", f"reward.model={checkpoint}", "reward.dtype=float32",
                     "lists.memory=none", "prompts.eval_size=4", timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    round_dir = output / "pairrm" / "round_001"
    stats = json.loads((round_dir / "_done" / "rerank").read_text())
    # Every ordered pair of each prompt's distinct answers: at most K(K-1) = 12 a prompt.
    assert 0 < stats["reward_comparisons"] <= stats["prompts"] * 4 * 3
    assert "pairwise comparisons" in (output / "pairrm" / "logs" / "round_001" / "rerank.log").read_text()
    shown = run_cli("inspect", str(round_dir), "--examples", "2", timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"comparisons      {stats['reward_comparisons']} pairwise, by the reward" in shown.stdout
    # Held-out answers scored against round 0's: round 0 ties with itself, so its rewards are all 0.
    base = json.loads((output / "pairrm" / "round_000" / "metrics.json").read_text())
    assert base["eval"]["reward_mean"] == 0.0
