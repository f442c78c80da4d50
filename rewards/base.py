"""The reward interface every scorer implements, and the registry that builds one by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sample:
    prompt_id: str
    prompt: list[dict]      # chat messages [{"role": ..., "content": ...}]
    response: str
    metadata: dict          # the prompt row's extra fields, e.g. {"constraints": [...]}


class RewardModel(Protocol):
    name: str

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """One reward per sample, in order; higher is better."""
        ...


# Config files name a reward as a string; this maps it to the factory that builds it.
REWARDS: dict[str, Callable[..., RewardModel]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    def register(factory: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = factory
        return factory
    return register


def build_reward(name: str, **options) -> RewardModel:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} (known: {', '.join(sorted(REWARDS))})")
    return REWARDS[name](**options)


def build_reward_from_config(reward_config) -> RewardModel:
    """The reward a `RewardConfig` (pipeline/config.py) describes."""
    return build_reward(reward_config.name)
