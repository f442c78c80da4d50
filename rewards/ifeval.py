"""Rule-based rewards over a prompt's verifiable constraints (rewards/constraints.py).

`ifeval` is the share of constraints the response meets (each 0 or 1). `ifeval_graded`
averages each constraint's degree of fulfilment in [0, 1] instead: two failing answers
are no longer tied when one of them is nearly right, so far fewer prompts end a round
with all candidates tied and no list to train on. Both give 1.0 to a response that
meets every constraint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rewards.base import Sample, register_reward
from rewards.constraints import check_all, constraint_problem, degree_all

# Per-constraint credit of a response: a list of 0/1 or of degrees in [0, 1].
Credit = Callable[[str, Sequence], Sequence[float]]


@dataclass(frozen=True)
class ConstraintReward:
    name: str
    credit: Credit

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self._score_one(sample) for sample in samples]

    def _score_one(self, sample: Sample) -> float:
        constraints = sample.metadata.get("constraints")
        # len() rather than truthiness: after a Parquet round trip this may be a numpy array,
        # whose truth value is ambiguous.
        if constraints is None or len(constraints) == 0:
            raise ValueError(f"sample {sample.prompt_id!r} has no constraints to check")
        credit = self.credit(sample.response, constraints)
        return float(sum(credit)) / len(credit)


def metadata_problem(metadata: dict) -> str | None:
    """Checked for every prompt when a round is planned, before anything runs."""
    constraints = metadata.get("constraints")
    if constraints is None or len(constraints) == 0:
        return "it has no constraints to check"
    return next(filter(None, map(constraint_problem, constraints)), None)


@register_reward("ifeval")
def strict_reward() -> ConstraintReward:
    return ConstraintReward("ifeval", check_all)


@register_reward("ifeval_graded")
def graded_reward() -> ConstraintReward:
    return ConstraintReward("ifeval_graded", degree_all)


strict_reward.metadata_problem = graded_reward.metadata_problem = metadata_problem
