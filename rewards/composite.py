"""Composite reward: a weighted sum of named rewards, less an optional length penalty.

    reward = sum_i weight_i * reward_i  -  length_penalty * words / 100

`words` is the response's whitespace-separated word count, so the penalty
does not depend on any tokenizer and reads the same across reward models. It
counters the length bias of model rewards (longer answers score higher).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.errors import ConfigError
from rewards.base import REWARDS, RewardModel, Sample, build_reward_from_config, register_reward


@register_reward("composite")
class CompositeReward:
    name = "composite"

    def __init__(self, parts: Sequence[tuple[float, RewardModel]], length_penalty: float = 0.0):
        self.parts = list(parts)
        self.length_penalty = length_penalty

    @classmethod
    def from_config(cls, settings: dict[str, Any]) -> CompositeReward:
        """Its options are the config's `composite` section; each component is built by the registry
        from the same config, under its own name (an hf_classifier reads the flat reward.model...)."""
        options = settings.get("composite") or {}
        components = options.get("components") or {}
        check_components(components)
        parts = [(float(weight), build_reward_from_config({**settings, "name": name}))
                 for name, weight in components.items()]
        return cls(parts, float(options.get("length_penalty", 0.0)))

    def score(self, samples: Sequence[Sample]) -> list[float]:
        totals = [-self.length_penalty * len(sample.response.split()) / 100 for sample in samples]
        for weight, reward in self.parts:
            totals = [total + weight * value for total, value in zip(totals, reward.score(samples), strict=True)]
        return totals


def check_components(components: dict[str, float]) -> None:
    """One-line ConfigError unless `components` names at least one known, non-composite reward."""
    if not components:
        raise ConfigError("config key 'reward.composite.components' must name at least one reward for "
                          "composite (for example ifeval:1.0,hf_classifier:0.5)")
    for name in components:
        if name == "composite" or name not in REWARDS:
            known = ", ".join(sorted(set(REWARDS) - {"composite"}))
            raise ConfigError(f"config key 'reward.composite.components' names unknown reward {name!r} "
                              f"(known: {known})")
