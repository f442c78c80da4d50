"""The reward interface every scorer implements, and the registry that builds one by name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


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
    return _factory(name)(**options)


def build_reward_from_config(reward_config) -> RewardModel:
    """The reward a `RewardConfig` (core/config.py) describes: the dataclass or its dict.

    A factory that needs settings (a model path, weights...) has a `from_config`
    that takes the config as a dict and picks its own keys; one without it, like
    "ifeval", is built with no options.
    """
    settings = reward_settings(reward_config)
    factory = _factory(settings["name"])
    from_config = getattr(factory, "from_config", None)
    return from_config(settings) if from_config is not None else factory()


def needs_whole_prompts(reward_config) -> bool:
    """Whether the configured reward (or one of composite's components) must see all of a prompt's
    candidates in one `score` call: a reward that compares them (a pairwise reranker, a listwise
    judge) has `needs_whole_prompts = True` on its factory, or, where its options decide (llm_judge:
    listwise only), a `needs_whole_prompts(settings)` function of the reward's config dict."""
    settings = reward_settings(reward_config)
    return any(_wants_whole_prompts(_factory(name), settings) for name in _used_rewards(settings))


def _wants_whole_prompts(factory: Callable[..., RewardModel], settings: dict[str, Any]) -> bool:
    flag = getattr(factory, "needs_whole_prompts", False)
    return bool(flag(settings)) if callable(flag) else bool(flag)


def _used_rewards(reward_config) -> list[str]:
    settings = reward_settings(reward_config)
    composite = settings.get("composite") or {}
    return list(composite.get("components") or {}) if settings["name"] == "composite" else [settings["name"]]


def metadata_problem(reward_config, metadata: Mapping[str, Any]) -> str | None:
    """What in a prompt's metadata the configured reward could not score, or None.

    A factory that reads metadata has a `metadata_problem(metadata)`; a composite
    asks each of its components. Rewards that read none (a classifier) accept anything.
    """
    for name in _used_rewards(reward_config):
        check = getattr(_factory(name), "metadata_problem", None)
        if check is not None and (problem := check(metadata)):
            return problem
    return None


def reward_settings(reward_config) -> dict[str, Any]:
    # Ray hands actors a pickled copy of the dataclass; callers and tests may pass its dict.
    if isinstance(reward_config, Mapping):
        return dict(reward_config)
    if dataclasses.is_dataclass(reward_config):
        return dataclasses.asdict(reward_config)
    raise TypeError(f"a reward config must be a RewardConfig or a dict, not {type(reward_config).__name__}")


def _factory(name: str) -> Callable[..., RewardModel]:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r} (known: {', '.join(sorted(REWARDS))})")
    return REWARDS[name]
