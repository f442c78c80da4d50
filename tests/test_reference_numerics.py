"""The reference stage and the trainer must compute log-probs identically:
before the first update, every item's score beta * (log pi - log pi_ref) is zero."""

import pytest
import torch

from core.config import TrainConfig
from core.objectives import OBJECTIVES, objective_options
from pools.logprob_scorer import list_batches, load_policy, reference_logprobs
from stages.train.data import ListExample, build_examples
from stages.train.loop import global_batches, list_scores, lr_lambda


def lists_rows():
    prompt = [{"role": "user", "content": "Name a fruit. Answer in at most 16 words."}]
    responses = ["An apple.", "Bananas are yellow and sweet.", "", "I like pears, plums and figs a lot."]
    return [{"prompt_id": "p1", "prompt": prompt,
             "positives": [{"response": responses[0], "reward": 1.0}],
             "negatives": [{"response": r, "reward": 0.5 - 0.1 * i} for i, r in enumerate(responses[1:])]},
            {"prompt_id": "p2", "prompt": [{"role": "user", "content": "Say hi."}],
             "positives": [{"response": "Hi!", "reward": 1.0}],
             "negatives": [{"response": "Hello there, friend.", "reward": 0.0}]}]


def as_lists(rows):
    return [(row["prompt"], [item["response"] for item in row["positives"] + row["negatives"]]) for row in rows]


def with_reference(rows, model_path, dtype="float32", share_prompt=True):
    logps = reference_logprobs(str(model_path), as_lists(rows), dtype, max_length=128, batch_size=3, chunk_size=7,
                               share_prompt=share_prompt)
    for row, values in zip(rows, logps):
        values = iter(values)
        for key in ("positives", "negatives"):
            row[key] = [{**item, "ref_logp": next(values)} for item in row[key]]
    return rows


@pytest.mark.parametrize("share_prompt", [True, False])
def test_scores_are_zero_before_training(tiny_model, share_prompt):
    rows = with_reference(lists_rows(), tiny_model, share_prompt=share_prompt)
    model, tokenizer = load_policy(str(tiny_model), "float32")
    examples = build_examples(rows, tokenizer, max_length=128, max_list_size=8)
    scores, mask, rewards = list_scores(model, examples, tokenizer, "contrastive", beta=0.1, chunk_size=5,
                                        share_prompt=share_prompt)
    assert mask.sum().item() == 6
    assert torch.allclose(scores[mask], torch.zeros(6), atol=1e-5)
    assert rewards[0, 0] == 1.0 and rewards[1, 1] == 0.0
    # Padding of the shorter list is masked out, and the loss is finite for every objective.
    assert mask[1].tolist() == [True, True, False, False]
    for name, objective in OBJECTIVES.items():
        options = objective_options(TrainConfig(objective=name, beta=0.1))
        assert torch.isfinite(objective(scores, mask, rewards=rewards, **options)).all(), name


def test_reference_logprobs_do_not_depend_on_batching_or_layout(tiny_model):
    lists = as_lists(lists_rows()) + [([{"role": "user", "content": "Empty list."}], [])]
    one = reference_logprobs(str(tiny_model), lists, "float32", 128, batch_size=1, chunk_size=1024)
    many = reference_logprobs(str(tiny_model), lists, "float32", 128, batch_size=16, chunk_size=3)
    unshared = reference_logprobs(str(tiny_model), lists, "float32", 128, batch_size=4, chunk_size=5,
                                  share_prompt=False)
    assert [len(values) for values in one] == [len(responses) for _, responses in lists] == [4, 2, 0]
    assert all(v < 0 for values in one for v in values)
    flat = lambda logps: torch.tensor([v for values in logps for v in values])  # noqa: E731
    assert torch.allclose(flat(one), flat(many), atol=1e-4)
    assert torch.allclose(flat(one), flat(unshared), atol=1e-4)


def test_list_batches_hold_about_batch_size_items():
    sizes, lengths = [4, 2, 2, 0, 5], [40, 10, 12, 0, 60]
    batches = list_batches(sizes, lengths, batch_size=4)
    assert batches == [[1, 2], [0], [4]]  # shortest first; an empty list is in no batch; a big list alone


def test_list_items_keep_reward_order_and_are_cut_to_max_list_size(tiny_model):
    rows = with_reference(lists_rows(), tiny_model)
    _, tokenizer = load_policy(str(tiny_model), "float32")
    examples = build_examples(rows, tokenizer, max_length=128, max_list_size=3)
    assert isinstance(examples[0], ListExample)
    assert examples[0].rewards == [1.0, 0.5, 0.4]
    assert len(examples[1].tokens) == 2


def test_global_batches_cover_every_example_once_per_epoch():
    batches = global_batches(10, 4, epochs=2, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for b in batches[:3] for i in b) == list(range(10))
    assert sorted(i for b in batches[3:] for i in b) == list(range(10))
    assert batches[:3] != batches[3:]  # reshuffled each epoch
    assert global_batches(10, 4, epochs=2, seed=3) == batches


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = lr_lambda(warmup_steps=2, total_steps=10)
    values = [factor(step) for step in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0
    assert all(a >= b for a, b in zip(values[1:], values[2:]))
    assert factor(10) == 0.0
