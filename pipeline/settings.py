"""The config as the command line loads it: the typed config of core/config.py, checked against
the objectives and rewards installed.

core/config.py checks what a config says on its own (types, ranges, how its keys agree). Which
objectives and rewards exist is known only above the ground floor, where the rewards package,
which registers them, is imported: so that check is here, and every command loads through here.
"""

from __future__ import annotations

from pathlib import Path

from core.config import Config, RewardConfig, TrainConfig, read_config
from core.errors import ConfigError
from core.objectives import OBJECTIVE_SPECIFIC_FIELDS, OBJECTIVES, readers
from rewards import REWARDS
from rewards.composite import check_components
from rewards.hf_classifier import MISSING_MODEL


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None), apply overrides, validate, and check
    the objective and rewards it names (core/config.py's `read_config`, then `check_plugins`)."""
    config = read_config(path, overrides)
    check_plugins(config)
    return config


def check_plugins(config: Config) -> None:
    """The objective and rewards the config names exist here, with the options they read."""
    if config.train.objective not in OBJECTIVES:
        raise ConfigError(f"config key 'train.objective' must be one of {', '.join(sorted(OBJECTIVES))}; "
                          f"got {config.train.objective!r}")
    _check_objective_options(config.train)
    if config.reward.name not in REWARDS:
        raise ConfigError(f"config key 'reward.name' must be one of {', '.join(sorted(REWARDS))}; "
                          f"got {config.reward.name!r}")
    _check_reward_components(config.reward)


def _check_objective_options(train: TrainConfig) -> None:
    # A knob only other objectives read would silently do nothing (lambdarank_ndcg with contrastive).
    defaults = TrainConfig()
    for name in OBJECTIVE_SPECIFIC_FIELDS:
        read_by = readers(name)
        if getattr(train, name) != getattr(defaults, name) and train.objective not in read_by:
            raise ConfigError(f"config key 'train.{name}' has no effect with train.objective={train.objective} "
                              f"(read by: {', '.join(read_by)})")


def _check_reward_components(reward: RewardConfig) -> None:
    # Caught here, at load, rather than minutes later in the rerank stage's actor.
    used = {reward.name}
    if reward.name == "composite":
        check_components(reward.components)
        used = set(reward.components)
    if "hf_classifier" in used and not reward.model:
        raise ConfigError(MISSING_MODEL)
