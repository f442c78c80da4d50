"""Rewards: score (prompt, response) samples. Importing this fills the REWARDS registry."""

from rewards.base import REWARDS, RewardModel, Sample, build_reward, build_reward_from_config, register_reward
# Imported to register "composite", "hf_classifier", "ifeval" and "ifeval_graded".
from rewards import composite, hf_classifier, ifeval  # noqa: F401
from rewards import pairrm  # noqa: F401  (registers "pairrm")
from rewards import llm_judge  # noqa: F401  (registers "llm_judge")

__all__ = ["REWARDS", "RewardModel", "Sample", "build_reward", "build_reward_from_config", "register_reward"]
