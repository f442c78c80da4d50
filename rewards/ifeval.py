"""Rule-based reward: the fraction of a prompt's verifiable constraints the response meets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rewards.base import Sample, register_reward
from rewards.constraints import check_all


@register_reward("ifeval")
@dataclass(frozen=True)
class InstructionFollowingReward:
    name: str = "ifeval"

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self._score_one(sample) for sample in samples]

    @staticmethod
    def _score_one(sample: Sample) -> float:
        constraints = sample.metadata.get("constraints")
        # len() rather than truthiness: after a Parquet round trip this may be a numpy array,
        # whose truth value is ambiguous.
        if constraints is None or len(constraints) == 0:
            raise ValueError(f"sample {sample.prompt_id!r} has no constraints to check")
        met = check_all(sample.response, constraints)
        return sum(met) / len(met)
