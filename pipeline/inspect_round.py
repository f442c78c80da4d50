"""`python -m pipeline inspect <round dir>`: what the reranker did in one round, for a terminal.

Reads the round's candidates, its scored candidates (rewards, from the rerank
stage), its lists and the rerank stage's statistics (`_done/rerank`), and prints
counts, the reward distribution, ties, list sizes and a few example lists.
Nothing is written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from core.config import read_yaml_file
from core.errors import PipelineError
from core.layout import RoundLayout, read_parquet_dir

ROUND_NAME = re.compile(r"round_(\d{3,})")
TEXT_WIDTH = 100       # characters of a prompt or response shown in an example
BAR_WIDTH = 40         # characters of the longest histogram bar
HISTOGRAM_BINS = 10


@dataclass
class RoundView:
    layout: RoundLayout
    stats: dict[str, Any]
    candidates: list[dict[str, Any]]
    scored: list[dict[str, Any]]  # prompt_id and reward of every candidate as scored, NaN included
    lists: list[dict[str, Any]]
    lists_config: dict[str, Any]  # the round's `lists` settings, from its config.yaml


def main(args) -> int:
    if args.examples < 0:
        raise PipelineError(f"--examples must be 0 or more; got {args.examples}")
    view = load_round(open_round(Path(args.round_dir)))
    print("\n".join(render(view, args.examples)))
    return 0


def open_round(path: Path) -> RoundLayout:
    """The round at `path`, once its rerank stage has finished; a one-line error otherwise."""
    match = ROUND_NAME.fullmatch(path.name)
    if not path.is_dir() or not match:
        raise PipelineError(f"{path} is not a round directory (expected a directory such as runs/default/round_001)")
    layout = RoundLayout(path, int(match.group(1)))
    if layout.number == 0:
        raise PipelineError(f"{path} is round 0, the base model's evaluation only: it has no candidates or lists")
    if not layout.is_done("rerank"):
        raise PipelineError(f"the rerank stage of round {layout.number} has not finished "
                            f"({layout.done_marker('rerank')} is missing): run the round first")
    return layout


def load_round(layout: RoundLayout) -> RoundView:
    candidates = read_shards(layout.candidates)
    scored = layout.scored
    lists = read_shards(layout.lists)
    # Rounds reranked before scored shards existed: only the list items' rewards are known.
    if scored.is_dir():
        rewards = [{"prompt_id": row["prompt_id"], "reward": row["reward"]} for row in read_shards(scored)]
    else:
        rewards = [{"prompt_id": row["prompt_id"], "reward": item["reward"]}
                   for row in lists for item in row["positives"] + row["negatives"]]
    config = read_yaml_file(layout.config) if layout.config.is_file() else {}
    return RoundView(layout, layout.stage_stats("rerank"), candidates, rewards, lists, (config or {}).get("lists", {}))


def read_shards(directory: Path) -> list[dict[str, Any]]:
    try:
        return read_parquet_dir(directory).to_pylist()
    except FileNotFoundError:
        raise PipelineError(f"{directory} holds no part-*.parquet shards") from None


def render(view: RoundView, examples: int) -> list[str]:
    return (summary_lines(view) + [""] + reward_lines([row["reward"] for row in view.scored]) + [""]
            + tie_lines(view) + [""]
            + size_lines(view.lists) + ([""] + example_lines(view.lists, examples) if examples else []))


# --- sections ---------------------------------------------------------------------

def summary_lines(view: RoundView) -> list[str]:
    stats = view.stats
    prompts = len({row["prompt_id"] for row in view.candidates})
    temperatures = Counter(row["temperature"] for row in view.candidates)
    drops = {key.removesuffix("_dropped"): value for key, value in stats.items()
             if key.endswith("_dropped") and key not in ("invalid_rewards_dropped", "duplicates_dropped")}
    settings = ", ".join(f"{key} {value}" for key, value in view.lists_config.items())
    return [
        f"round {view.layout.number}  {view.layout.dir}",
        f"  candidates       {len(view.candidates)} for {prompts} prompts; temperatures "
        + ", ".join(f"{t:g}: {n}" for t, n in sorted(temperatures.items())),
        f"  lists            {len(view.lists)} of {stats.get('prompts', prompts)} prompts"
        + (f"  ({settings})" if settings else ""),
        "  prompts dropped  " + (", ".join(f"{reason} {n}" for reason, n in drops.items()) or "none"),
        *too_long_lines(view.layout),
        (f"  invalid rewards  {stats.get('invalid_rewards_dropped', 0)} dropped"
         f"   duplicates {stats.get('duplicates_dropped', 0)} dropped"
         f"   from earlier rounds {stats.get('memory_candidates', 0)} in pools, "
         f"{stats.get('memory_items_in_lists', 0)} in lists"),
        *([f"  comparisons      {stats['reward_comparisons']} pairwise, by the reward"]
          if stats.get("reward_comparisons") else []),
        *judge_lines(stats),
        *truncation_lines(view),
        *training_lines(view.layout),
    ]


def judge_lines(stats: dict) -> list[str]:
    """An LLM judge's calls, and the judgements it scored NaN (reward.on_invalid decided their fate)."""
    if "judge_calls" not in stats:
        return []
    return [f"  judge            {stats['judge_calls']} calls; {stats.get('judge_unparsed', 0)} judgements "
            f"unparseable after retries, {stats.get('judge_too_long', 0)} too long (scored NaN)"]


def too_long_lines(layout: RoundLayout) -> list[str]:
    """The prompts dropped at planning for being too long (prompts.too_long=drop), with the first ids."""
    generated = layout.stage_stats("generate") if layout.is_done("generate") else {}
    count = generated.get("too_long_dropped", 0)
    if not count:
        return []
    ids = generated.get("too_long_dropped_ids", [])
    more = f" and {count - len(ids)} more" if count > len(ids) else ""
    return [f"  too long         {count} prompts dropped before generation: {', '.join(ids)}{more}"]


def truncation_lines(view: RoundView) -> list[str]:
    """How many answers hit generate.max_tokens, and where they ended up in the lists."""
    cut = sum(row.get("finish_reason") == "length" for row in view.candidates)
    total = len(view.candidates)
    share = f" ({100 * cut / total:.0f}%)" if total else ""
    sides = {side: [item for row in view.lists for item in row[side]] for side in ("positives", "negatives")}
    if any(item.get("finish_reason") is None for items in sides.values() for item in items):
        placed = "lists made before finish_reason was kept in them"
    else:
        placed = ", ".join(f"{sum(item['finish_reason'] == 'length' for item in items)} of {len(items)} {side}"
                           for side, items in sides.items())
    rule = view.lists_config.get("truncated", "keep")
    dropped = view.stats.get("no_finished_positive_dropped", 0)
    return [f"  truncated        {cut} of {total} candidates{share} stopped at max_tokens; in lists: {placed}"
            f"  (lists.truncated {rule}" + (f", {dropped} prompts without a finished positive dropped)"
                                           if dropped else ")")]


def training_lines(layout: RoundLayout) -> list[str]:
    """What the trainer read: this round's lists and those replayed from earlier rounds (train.replay)."""
    if not layout.is_done("reference"):
        return []
    stats = layout.stage_stats("reference")
    if "lists_current" not in stats:  # a round from before replay was counted
        return []
    rounds = Counter(row["round"] for row in read_shards(layout.train) if row.get("round") != layout.number)
    replayed = ", ".join(f"round {n}: {count}" for n, count in sorted(rounds.items()))
    return [f"  trained on       {stats['lists_current']} lists of this round, {stats['lists_replayed']} replayed"
            + (f" ({replayed})" if replayed else "")]


def reward_lines(rewards: list[float]) -> list[str]:
    finite = sorted(r for r in rewards if math.isfinite(r))
    invalid = len(rewards) - len(finite)
    header = f"rewards of {len(finite)} candidates" + (f" ({invalid} NaN or infinite left out)" if invalid else "")
    if not finite:
        return [header, "  none"]
    points = "   ".join(f"{name} {quantile(finite, q):.3f}"
                        for name, q in (("min", 0), ("q1", .25), ("median", .5), ("q3", .75), ("max", 1)))
    lines = [header, f"  {points}   mean {sum(finite) / len(finite):.3f}"]
    bins = histogram(finite, HISTOGRAM_BINS)
    most = max(count for _, _, count in bins)
    for low, high, count in bins:
        bar = "#" * round(BAR_WIDTH * count / most)
        lines.append(f"  [{low:7.3f}, {high:7.3f}{']' if high == finite[-1] else ')'}  {bar:<{BAR_WIDTH}} {count}")
    return lines


def tie_lines(view: RoundView) -> list[str]:
    by_prompt: dict[str, list[float]] = {}
    for row in view.scored:
        if math.isfinite(row["reward"]):
            by_prompt.setdefault(row["prompt_id"], []).append(row["reward"])
    all_tied = sum(1 for rewards in by_prompt.values() if len(set(rewards)) == 1)
    best_shared = sum(1 for rewards in by_prompt.values() if rewards.count(max(rewards)) > 1)
    sharing = sum(n for rewards in by_prompt.values() for n in Counter(rewards).values() if n > 1)
    tied_pairs = sum(1 for row in view.lists for p in row["positives"] for n in row["negatives"]
                     if p["reward"] == n["reward"])
    return [
        "ties (among this round's scored candidates)",
        f"  prompts whose candidates all tie         {all_tied} of {len(by_prompt)}",
        f"  prompts whose best reward is shared      {best_shared}",
        f"  candidates sharing a reward in a prompt  {sharing}",
        (f"  tied with their list's lowest positive   {view.stats.get('ties_with_lowest_positive', '?')}"
         f"  (lists.ties {view.lists_config.get('ties', '?')}; drop keeps them out of the negatives)"),
        f"  positive-negative pairs of equal reward  {tied_pairs}",
    ]


def size_lines(lists: list[dict[str, Any]]) -> list[str]:
    lines = ["items per list"]
    for side in ("positives", "negatives"):
        sizes = Counter(len(row[side]) for row in lists)
        mean = sum(size * n for size, n in sizes.items()) / len(lists) if lists else 0.0
        spread = ", ".join(f"{size}: {n}" for size, n in sorted(sizes.items())) or "no lists"
        lines.append(f"  {side:<10} mean {mean:.2f}   (size: lists) {spread}")
    return lines


def example_lines(lists: list[dict[str, Any]], examples: int) -> list[str]:
    shown = lists[:examples]
    lines = [f"examples ({len(shown)} of {len(lists)} lists; + positive, - negative, best first)"]
    for row in shown:
        lines.append(f"  {row['prompt_id']}  \"{shorten(row['prompt'][-1]['content'])}\"")
        for sign, side in (("+", "positives"), ("-", "negatives")):
            for item in row[side]:
                lines.append(f"    {sign} {item['reward']:.3f}  round {item['round']} sample {item['sample_index']}"
                             f"  \"{shorten(item['response'])}\"")
    return lines


# --- small helpers ------------------------------------------------------------------

def quantile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted values, interpolating linearly between neighbours (numpy's default)."""
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def histogram(ordered: list[float], bins: int) -> list[tuple[float, float, int]]:
    """(low, high, count) for equal-width bins from min to max; the last bin includes max."""
    low, high = ordered[0], ordered[-1]
    if low == high:
        return [(low, high, len(ordered))]
    width = (high - low) / bins
    counts = Counter(min(int((value - low) / width), bins - 1) for value in ordered)
    return [(low + i * width, low + (i + 1) * width if i < bins - 1 else high, counts[i]) for i in range(bins)]


def shorten(text: str, width: int = TEXT_WIDTH) -> str:
    """One line (whitespace collapsed), cut to `width` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"
