"""The config as the command line loads it: the typed config of core/config.py, checked against
the objectives and rewards installed.

core/config.py checks what a config says on its own (types, ranges, how its keys agree). Which
objectives and rewards exist is known only above the ground floor, where the rewards package,
which registers them, is imported: so that check is here, and every command loads through here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from core.config import (CompositeOptions, Config, JudgeOptions, PairrmOptions, RewardConfig, TrainConfig,
                         read_config)
from core.errors import ConfigError
from core.objectives import OBJECTIVE_SPECIFIC_FIELDS, OBJECTIVES, readers, train_value
from rewards import REWARDS
from rewards.base import needs_whole_prompts
from rewards.composite import check_components
from rewards.hf_classifier import MISSING_MODEL
from rewards.llm_judge import MISSING_MODEL as MISSING_JUDGE_MODEL, load_template


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
    if needs_whole_prompts(config.reward) and config.lists.memory != "none":
        # Its scores compare the candidates of one call: earlier rounds' rewards are on another scale.
        raise ConfigError(f"config key 'lists.memory' must be none with reward.name={config.reward.name}, whose "
                          "scores only compare the candidates it saw together")


def _check_objective_options(train: TrainConfig) -> None:
    # A knob only other objectives read would silently do nothing (lambdarank.ndcg with contrastive).
    defaults = TrainConfig()
    for name in OBJECTIVE_SPECIFIC_FIELDS:
        read_by = readers(name)
        if train_value(train, name) != train_value(defaults, name) and train.objective not in read_by:
            raise ConfigError(f"config key 'train.{name}' has no effect with train.objective={train.objective} "
                              f"(read by: {', '.join(read_by)})")


def _check_reward_components(reward: RewardConfig) -> None:
    # Caught here, at load, rather than minutes later in the rerank stage's actor.
    used = {reward.name}
    if reward.name == "composite":
        check_components(reward.composite.components)
        used = set(reward.composite.components)
    else:
        _check_composite_unset(reward)
    if "hf_classifier" in used and not reward.model:
        raise ConfigError(MISSING_MODEL)
    if "pairrm" in used and not reward.model:
        raise ConfigError("config key 'reward.model' must name the PairRM checkpoint for pairrm "
                          "(a local directory or a hub id in the local HF cache)")
    if "pairrm" not in used:
        _check_unset(reward.pairrm, PairrmOptions(), "reward.pairrm", reward.name, "pairrm")
    if "llm_judge" in used:
        if not reward.judge.model:
            raise ConfigError(MISSING_JUDGE_MODEL)
        # A template file that is missing or lacks a placeholder, refused before any engine starts.
        load_template(reward.judge.template, reward.judge.mode)
    else:
        _check_unset(reward.judge, JudgeOptions(), "reward.judge", reward.name, "llm_judge")


def _check_composite_unset(reward: RewardConfig) -> None:
    # As with an objective's options: composite's would silently do nothing under another reward.
    _check_unset(reward.composite, CompositeOptions(), "reward.composite", reward.name, "composite")


def _check_unset(options: Any, defaults: Any, section: str, reward_name: str, reader: str) -> None:
    for field in dataclasses.fields(defaults):
        if getattr(options, field.name) != getattr(defaults, field.name):
            raise ConfigError(f"config key '{section}.{field.name}' has no effect with "
                              f"reward.name={reward_name} (read by: {reader})")
