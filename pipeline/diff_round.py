"""`larpo diff <round dir>`: the held-out answers that got worse against round 0.

For every held-out prompt whose answer in this round has a lower reward than the base
model's (round 0) answer to it, the prompt, its constraints with which each answer meets,
and both answers, worst loss first. Read from the two rounds' eval shards; nothing is run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from core.errors import PipelineError
from core.layout import read_parquet_dir
from pipeline.inspect_round import ROUND_NAME, shorten
from rewards.constraints import check_all

def eval_rows(round_dir: Path) -> dict[str, dict[str, Any]]:
    directory = round_dir / "eval"
    try:
        rows = read_parquet_dir(directory).to_pylist()
    except FileNotFoundError:
        raise PipelineError(f"{directory} holds no part-*.parquet shards: round {round_dir.name} has not been "
                            "evaluated") from None
    return {row["prompt_id"]: row for row in rows}


def constraint_results(row: dict[str, Any]) -> list[tuple[str, bool]]:
    """(kind, met) for each of the prompt's constraints; computed when the shard predates `constraints_met`."""
    constraints = (json.loads(row["metadata"] or "{}") or {}).get("constraints") or []
    met = row.get("constraints_met")
    if met is None:
        met = check_all(row["response"], constraints) if constraints else []
    return [(str(c["kind"]), bool(ok)) for c, ok in zip(constraints, met, strict=True)]


def losses(round_dir: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(this round's row, round 0's row) of every prompt whose reward fell, worst first."""
    match = ROUND_NAME.fullmatch(round_dir.name)
    if not round_dir.is_dir() or not match:
        raise PipelineError(f"{round_dir} is not a round directory (expected a directory such as runs/default/round_001)")
    if int(match.group(1)) == 0:
        raise PipelineError(f"{round_dir} is round 0 itself: give a later round to compare with it")
    current, baseline = eval_rows(round_dir), eval_rows(round_dir.parent / "round_000")
    pairs = [(row, baseline[pid]) for pid, row in current.items() if pid in baseline
             and math.isfinite(row["reward"]) and math.isfinite(baseline[pid]["reward"])
             and row["reward"] < baseline[pid]["reward"]]
    return sorted(pairs, key=lambda pair: (pair[0]["reward"] - pair[1]["reward"], pair[0]["prompt_id"]))


def render(round_dir: Path, limit: int) -> list[str]:
    pairs = losses(round_dir)
    total = len(eval_rows(round_dir))
    lines = [f"{len(pairs)} of {total} held-out answers of {round_dir.name} have a lower reward than round 0's"
             + (f" (the {limit} worst shown)" if len(pairs) > limit else "")]
    for row, base in pairs[:limit]:
        lines += ["", f"{row['prompt_id']}  reward {base['reward']:.3f} -> {row['reward']:.3f}",
                  f"  prompt    \"{shorten(row['prompt'][-1]['content'], 200)}\""]
        ours, theirs = constraint_results(row), constraint_results(base)
        if ours:
            lines.append("  constraints (round 0 -> this round): " + ", ".join(
                f"{kind} {'met' if was else 'missed'} -> {'met' if now else 'missed'}"
                for (kind, now), (_, was) in zip(ours, theirs)))
        for label, answer in (("round 0", base), ("now", row)):
            cut = " [cut at max_tokens]" if answer.get("finish_reason") == "length" else ""
            lines.append(f"  {label:<9} \"{shorten(answer['response'], 200)}\"{cut}")
    return lines


def main(args) -> int:
    if args.limit < 0:
        raise PipelineError(f"--limit must be 0 or more; got {args.limit}")
    print("\n".join(render(Path(args.round_dir), args.limit)))
    return 0
