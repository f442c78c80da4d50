"""`larpo config` and `larpo round N --dry-run`: what a command would do, before it does anything.

`config` lists every key with its default and help, or prints the resolved config of a
file plus overrides. `--dry-run` plans the round as the real command does (the same
validation: config, run compatibility, prompts, reward metadata, round 0's answers) and
shows the plan: the resolved config, the prompts it draws, the stages it would run or skip,
and the work it would do. Nothing is written: not the run directory, not a log.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import Any

import yaml

from core.config import Config
from core.config_parse import leaf_fields
from core.errors import PipelineError
from core.layout import STAGES, RunLayout
from core.timing import round_wall_seconds
from pipeline.settings import load_config

HELP_WIDTH = 96


def describe_keys() -> list[str]:
    """Every config key: its default, then its help, indented."""
    lines = []
    for key, f in leaf_fields(Config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"{key} = {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}")
        help_text = f.metadata.get("help") or ""
        lines += textwrap.wrap(help_text, HELP_WIDTH, initial_indent="    ", subsequent_indent="    ")
    return lines


def config_main(args) -> int:
    if args.config is None and not args.overrides:
        print("\n".join(describe_keys()))
        return 0
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def stage_states(run: RunLayout, number: int) -> dict[str, str]:
    layout = run.round(number)
    return {stage: "done, skipped" if layout.is_done(stage) else "would run" for stage in STAGES}


def work_lines(plan) -> list[str]:
    """What the round would sample, score and train, in counts (not seconds: those depend on the machine)."""
    config = plan.config
    gen, train = config.generate, config.train
    samples = len(plan.prompts) * gen.num_samples
    lines = [f"  generate   {len(plan.prompts)} prompts x {gen.num_samples} samples = {samples} answers of up to "
             f"{gen.max_tokens} tokens ({samples * gen.max_tokens} tokens at most) from {plan.policy_in}",
             f"  rerank     {samples} answers scored by reward '{config.reward.name}'",
             f"  reference  up to {len(plan.prompts)} lists scored by {plan.reference}",
             f"  train      up to {len(plan.prompts)} lists, {train.epochs} epoch(s) of batches of {train.batch_size}: "
             f"up to {max(1, -(-len(plan.prompts) * train.epochs // train.batch_size))} optimizer steps "
             f"({train.objective}, beta {train.beta})"]
    if plan.heldout:
        lines.append(f"  evaluate   {len(plan.heldout)} held-out prompts, one answer each "
                     f"(temperature {config.evaluate.temperature}, up to {config.evaluate.max_tokens} tokens)")
    return lines


def dry_run(config: Config, run_name: str, first: int, last: int) -> list[str]:
    """The plan of rounds first..last, as `round`/`rounds` would run them."""
    # Here, not at the top: the driver brings Ray and vLLM, which `larpo config` does without.
    from pipeline.driver import plan_round

    run = RunLayout.at(config.output, run_name)
    lines = [f"dry run: nothing is written. Run {run.dir}",
             "resolved config:", *textwrap.indent(yaml.safe_dump(config.to_dict(), sort_keys=False), "  ").splitlines()]
    root = run.dir.parent
    if not root.exists():
        lines.append(f"the output root {root} does not exist yet: the round would create it")
    elif not os.access(root, os.W_OK | os.X_OK):
        raise PipelineError(f"output root {root} is not writable")
    for number in range(first, last + 1):
        layout = run.round(number)
        if layout.is_finished() and layout.metrics.is_file():
            lines.append(f"round {number}: finished ({layout.dir}), skipped")
            continue
        if number > first and not run.round(number - 1).is_finished():
            lines.append(f"round {number}: after round {number - 1}, on its policy (planned when that one is done)")
            continue
        plan = plan_round(config, run_name, number, dry_run=True)
        ids = [prompt.prompt_id for prompt in plan.prompts]
        shown = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        lines += [f"round {number}: {layout.dir}",
                  f"  prompts    {len(ids)} from {config.prompts.train}: {shown}"
                  + (f"; {len(plan.dropped_too_long)} too long, left out" if plan.dropped_too_long else ""),
                  f"  held-out   {len(plan.heldout)} from {config.prompts.heldout}"
                  + ("; round 0's answers would be made first" if plan.heldout and not run.round(0).is_done("evaluate")
                     else ""),
                  "  stages     " + ", ".join(f"{stage} {state}" for stage, state in stage_states(run, number).items()),
                  *work_lines(plan)]
    return lines


def dry_run_main(args, config: Config) -> int:
    first = 1 if args.command == "rounds" else args.number
    print("\n".join(dry_run(config, args.run, first, args.number)))
    return 0


def summary_line(metrics: dict[str, Any], round_dir) -> str:
    """What a person reads when a round ends; the whole record stays in metrics.json."""
    evaluation = metrics.get("eval") or {}
    parts = [f"round {metrics['round']} done in {round_wall_seconds(metrics) or 0:.0f} s"]
    interval = (evaluation.get("vs_round_0") or {}).get("pass_rate")
    if evaluation.get("pass_rate") is not None:
        text = f"pass rate {evaluation['pass_rate']:.3f}"
        if interval:
            text += (f" ({100 * interval['difference']:+.1f} points [{100 * interval['low']:+.1f}, "
                     f"{100 * interval['high']:+.1f}] vs round 0)")
        parts.append(text)
    if evaluation.get("reward_mean") is not None:
        parts.append(f"reward {evaluation['reward_mean']:.3f}")
    if evaluation.get("win_rate") is not None:
        parts.append(f"win rate vs round 0 {evaluation['win_rate']:.2f}")
    return parts[0] + (": " + ", ".join(parts[1:]) if parts[1:] else "") + f"  ({round_dir}/metrics.json)"
