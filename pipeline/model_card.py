"""The model card (`policy/README.md`, Hugging Face's format) written with every round's policy.

It says where the checkpoint came from: the base model, the run and round, the objective,
the reward, the prompts, the code, and what the round measured on the held-out prompts, with
95% intervals against round 0. The driver writes it when the round finishes, after the
evaluation (so it is not among the files the train stage's done marker vouches for).
"""

from __future__ import annotations

from typing import Any

import yaml

INTERVALS = (("pass_rate", "strict pass rate", 100, "points"), ("reward_mean", "mean reward", 1, ""),
             ("win_rate", "win rate against round 0", 1, ""))


def interval_row(label: str, entry: dict[str, Any], scale: float, unit: str) -> str:
    difference = (f"{scale * entry['difference']:+.3g} [{scale * entry['low']:+.3g}, {scale * entry['high']:+.3g}]"
                  + (f" {unit}" if unit else ""))
    return f"| {label} | {entry['value']:.3f} | {entry['baseline']:.3f} | {difference} | {entry['prompts']} |"


def model_card(plan, metrics: dict[str, Any]) -> str:
    config = plan.config
    code = metrics.get("code") or {}
    front = {"base_model": config.model.name, "library_name": "transformers",
             "tags": ["larpo", "alignment", f"objective-{config.train.objective}", f"reward-{config.reward.name}"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {plan.run.dir.name}, round {plan.round.number}", "",
             f"Round {plan.round.number} of an iterative LarPO run: vLLM sampled {config.generate.num_samples} "
             f"answers to each of {len(plan.prompts)} prompts from `{plan.policy_in}`, the reward "
             f"`{config.reward.name}` ranked them into lists, and the `{config.train.objective}` objective "
             f"(beta {config.train.beta}) trained this checkpoint on them against the reference `{plan.reference}`.",
             "", "| | |", "|---|---|",
             f"| base model | `{config.model.name}` |",
             f"| run | `{plan.run.dir}` |",
             f"| round | {plan.round.number} |",
             f"| training prompts | `{config.prompts.train}` ({len(plan.prompts)} this round) |",
             f"| held-out prompts | `{config.prompts.heldout}` ({len(plan.heldout)}) |",
             f"| lists | {config.lists.strategy}, {config.lists.num_positives} positive(s), "
             f"truncated answers: {config.lists.truncated} |",
             f"| code | larpo-pipeline {code.get('version')}, commit {code.get('commit') or 'unknown'}"
             + (" (uncommitted changes)" if code.get("dirty") else "") + " |", ""]
    intervals = (metrics.get("eval") or {}).get("vs_round_0") or {}
    if intervals:
        lines += ["## Held-out evaluation", "",
                  "Greedy answers to the held-out prompts, against the base model's (round 0) on the same prompts; "
                  "the interval is a 95% paired bootstrap over prompts.", "",
                  "| metric | this round | round 0 | difference [95% interval] | prompts |", "|---|---:|---:|---:|---:|"]
        lines += [interval_row(label, intervals[key], scale, unit)
                  for key, label, scale, unit in INTERVALS if key in intervals]
        lines.append("")
    lines += ["The run's config is `config.yaml` in the run directory; every number of the round is in "
              "`metrics.json` beside this checkpoint's directory.", ""]
    return "\n".join(lines)
