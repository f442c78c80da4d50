import pytest

from rewards import REWARDS, Sample, build_reward
from rewards.ifeval import ConstraintReward

PROMPT = [{"role": "user", "content": "Describe tea."}]
TWO_CONSTRAINTS = [{"kind": "max_words", "limit": 5}, {"kind": "include_keyword", "keyword": "tea"}]


def make_sample(response: str, constraints=TWO_CONSTRAINTS, prompt_id: str = "train-00001") -> Sample:
    metadata = {} if constraints is None else {"constraints": constraints}
    return Sample(prompt_id=prompt_id, prompt=PROMPT, response=response, metadata=metadata)


def test_registered_and_built_by_name():
    assert "ifeval" in REWARDS
    reward = build_reward("ifeval")
    assert isinstance(reward, ConstraintReward)
    assert reward.name == "ifeval"


def test_score_is_fraction_of_constraints_met():
    reward = build_reward("ifeval")
    samples = [
        make_sample("I like coffee very much indeed."),  # too long, no keyword
        make_sample("I like coffee."),                   # short, no keyword
        make_sample("I like tea."),                      # both
    ]
    assert reward.score(samples) == [0.0, 0.5, 1.0]


def test_score_of_no_samples_is_empty():
    assert build_reward("ifeval").score([]) == []


def test_blank_response_scores_zero():
    assert build_reward("ifeval").score([make_sample("  ")]) == [0.0]


def test_graded_reward_averages_degrees():
    reward = build_reward("ifeval_graded")
    assert reward.name == "ifeval_graded"
    samples = [
        make_sample("I like coffee very much indeed."),  # 6 words of 5 (5/6), no keyword (0)
        make_sample("I like coffee."),                   # short (1), no keyword (0)
        make_sample("I like tea."),                      # both
        make_sample(" \n"),                              # blank: nothing
    ]
    assert reward.score(samples) == pytest.approx([5 / 12, 0.5, 1.0, 0.0])


def test_graded_and_strict_agree_when_every_constraint_is_met():
    samples = [make_sample("I like tea."), make_sample("Tea, please.")]
    assert build_reward("ifeval_graded").score(samples) == build_reward("ifeval").score(samples) == [1.0, 1.0]


@pytest.mark.parametrize("name", ["ifeval", "ifeval_graded"])
@pytest.mark.parametrize("constraints", [None, []])
def test_missing_constraints_name_the_prompt(constraints, name):
    reward = build_reward(name)
    with pytest.raises(ValueError, match="heldout-00042"):
        reward.score([make_sample("I like tea.", constraints=constraints, prompt_id="heldout-00042")])


def test_unknown_reward_name():
    with pytest.raises(ValueError, match=r"unknown reward 'nope' \(known: .*ifeval"):
        build_reward("nope")
