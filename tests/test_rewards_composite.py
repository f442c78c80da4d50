"""The composite reward: a weighted sum of registered rewards less a per-word length penalty."""

import pytest

from core.config import CompositeOptions, RewardConfig
from core.errors import ConfigError
from pipeline.settings import load_config
from rewards import REWARDS, Sample, build_reward, build_reward_from_config
from rewards.composite import CompositeReward
from tests.tiny_reward_model import save_tiny_classifier

PROMPT = [{"role": "user", "content": "Describe tea in a few words."}]
CONSTRAINTS = {"constraints": [{"kind": "max_words", "limit": 8}, {"kind": "include_keyword", "keyword": "tea"}]}


def sample(response: str) -> Sample:
    return Sample("train-00001", PROMPT, response, CONSTRAINTS)


RESPONSES = ["Green tea is grassy.", "Coffee is bitter and dark and strong and hot today.", "Tea is an infusion of leaves that people drink hot."]


@pytest.fixture(scope="module")
def classifier_dir(tiny_model, tmp_path_factory):
    return save_tiny_classifier(tiny_model, tmp_path_factory.mktemp("reward") / "classifier")


def test_registered():
    assert REWARDS["composite"] is CompositeReward


def test_weighted_sum_of_components_as_computed_by_hand(classifier_dir):
    samples = [sample(r) for r in RESPONSES]
    config = RewardConfig(name="composite", model=str(classifier_dir),
                          composite=CompositeOptions(components={"ifeval": 1.0, "hf_classifier": 0.5}))
    composite = build_reward_from_config(config)

    ifeval = build_reward("ifeval").score(samples)
    model = build_reward_from_config(RewardConfig(name="hf_classifier", model=str(classifier_dir))).score(samples)
    assert ifeval == [1.0, 0.0, 0.5]
    assert composite.score(samples) == pytest.approx([i + 0.5 * m for i, m in zip(ifeval, model)], abs=1e-5)


def test_length_penalty_per_hundred_words_lowers_longer_responses():
    short, long = sample("tea " * 10), sample("tea " * 200)
    plain = build_reward_from_config(RewardConfig(name="composite",
                                                  composite=CompositeOptions(components={"ifeval": 2.0})))
    penalized = build_reward_from_config({"name": "composite", "composite": {"components": {"ifeval": 2.0},
                                                                         "length_penalty": 0.1}})
    # Both meet include_keyword and miss max_words: ifeval gives 0.5 each.
    assert plain.score([short, long]) == [1.0, 1.0]
    assert penalized.score([short, long]) == pytest.approx([1.0 - 0.1 * 0.1, 1.0 - 0.1 * 2.0])


def test_negative_weight_subtracts():
    composite = build_reward_from_config({"name": "composite", "composite": {"components": {"ifeval": -1.0}}})
    assert composite.score([sample("Green tea is grassy."), sample("Coffee.")]) == [-1.0, -0.5]


@pytest.mark.parametrize("components, message", [
    ({"gpt4-judge": 1.0}, "names unknown reward 'gpt4-judge' \\(known: .*ifeval"),
    ({"composite": 1.0}, "names unknown reward 'composite'"),
    ({}, "must name at least one reward"),
])
def test_bad_components_are_one_line_config_errors(components, message):
    with pytest.raises(ConfigError, match=f"'reward.composite.components' {message}") as info:
        build_reward_from_config(RewardConfig(name="composite", composite=CompositeOptions(components=components)))
    assert "\n" not in str(info.value)


def test_components_and_penalty_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("reward:\n  name: composite\n  model: /models/rm\n"
                    "  composite:\n    components: {ifeval: 1.0, hf_classifier: 0.5}\n    length_penalty: 0.05\n")
    from_yaml = load_config(path).reward
    assert (from_yaml.composite.components, from_yaml.composite.length_penalty) == \
        ({"ifeval": 1.0, "hf_classifier": 0.5}, 0.05)
    overridden = load_config(path, ["reward.composite.components=ifeval:2", "reward.composite.length_penalty=0"]).reward
    assert (overridden.composite.components, overridden.composite.length_penalty) == ({"ifeval": 2.0}, 0.0)


@pytest.mark.parametrize("overrides, message", [
    (["reward.composite.components=judge:1.0"], "'reward.composite.components' names unknown reward 'judge'"),
    ([], "'reward.composite.components' must name at least one reward"),
    (["reward.composite.components=ifeval:1.0", "reward.composite.length_penalty=-0.1"],
     "'reward.composite.length_penalty' must be zero or more"),
    (["reward.composite.components=ifeval:.nan"],
     "'reward.composite.components.ifeval' .command line. must be a finite number"),
])
def test_bad_composite_config_is_caught_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["reward.name=composite", *overrides])
