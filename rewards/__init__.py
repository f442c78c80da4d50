"""Rewards: score (prompt, response) samples. Importing this fills the REWARDS registry."""

from rewards.base import REWARDS, RewardModel, Sample, build_reward, build_reward_from_config, register_reward
from rewards import composite, hf_classifier, ifeval  # noqa: F401  (register "composite", "hf_classifier", "ifeval", "ifeval_graded")

__all__ = ["REWARDS", "RewardModel", "Sample", "build_reward", "build_reward_from_config", "register_reward"]
