"""Where the reference stage runs: decided once, when the round is planned (pipeline/driver.py)."""

from __future__ import annotations


def scored_in_train_workers(plan) -> bool:
    """Whether the train stage's workers score the reference (`reference.in_train_workers`): only
    where it is the policy they load to train, the round's starting policy.

    `plan` needs `config`, `reference` and `policy_in`: plan_round asks before the plan is whole."""
    return plan.config.reference.in_train_workers and plan.reference == plan.policy_in
