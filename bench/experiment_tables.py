"""The experiment's per-prompt comparisons and its main table, from the stored runs (docs/experiments/).

Every number with an interval is a paired bootstrap over the held-out prompts
(core/stats.py): a method's change against round 0 pairs each prompt's
answer with round 0's answer to it; a comparison of two methods pairs their
answers to the same prompt, seed by seed. Over several seeds, each prompt's
differences are averaged over the seeds first ("pooled"), so the interval is
over prompts: it holds the trained checkpoints fixed, and says nothing of where
another seed would land (bench/experiment_summary.py shows each seed's own).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.experiment_store import METHODS, seed_dir, stored_rounds
from core.errors import PipelineError
from core.stats import Interval, paired_bootstrap
from stages.evaluate import win_score


@dataclass
class RoundResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    # Per prompt_id: the reward, and 1.0 / 0.0 for meeting every constraint (prompts with constraints).
    reward: dict[str, float] = field(default_factory=dict)
    passed: dict[str, float] = field(default_factory=dict)


# method -> seed -> round -> result
Results = dict[str, dict[int, dict[int, RoundResult]]]


def read_round(round_dir: Path) -> RoundResult:
    from core.layout import read_parquet_dir
    from pipeline.report import read_json
    from stages.evaluate import strict_pass

    metrics = read_json(round_dir / "metrics.json")
    rows = read_parquet_dir(round_dir / "eval").to_pylist()
    result = RoundResult(metrics, rows)
    for row in rows:
        if row["reward"] is not None and math.isfinite(row["reward"]):
            result.reward[row["prompt_id"]] = float(row["reward"])
        if (ok := strict_pass(row)) is not None:
            result.passed[row["prompt_id"]] = float(ok)
    return result


def load(store: Path, methods: list[str], seeds: list[int]) -> Results:
    """Every stored round of the given methods and seeds; a (method, seed) without round 0 is left out."""
    results: Results = {}
    for method in methods:
        for seed in seeds:
            rounds = stored_rounds(store, method, seed)
            if 0 in rounds:
                results.setdefault(method, {})[seed] = {
                    n: read_round(seed_dir(store, method, seed) / f"round_{n:03d}") for n in sorted(rounds)}
    return results


# metric -> per-prompt value of a round's answer, given round 0's answers of the same run.
PER_PROMPT: dict[str, Callable[[RoundResult, RoundResult], dict[str, float]]] = {
    "pass_rate": lambda r, base: r.passed,
    "reward_mean": lambda r, base: r.reward,
    "win_rate": lambda r, base: {p: win_score(v, base.reward[p]) for p, v in r.reward.items() if p in base.reward},
}


def pooled_difference(runs: list[tuple[dict[str, float], dict[str, float]]]) -> tuple[float, float, Interval]:
    """(mean of A, mean of B, interval of A - B) over the prompts every pair shares, seeds averaged per prompt."""
    prompts = sorted(set.intersection(*(set(a) & set(b) for a, b in runs)))
    if not prompts:
        raise PipelineError("the runs compared share no held-out prompt")
    table = [[a[p] - b[p] for p in prompts] for a, b in runs]
    mean_a = sum(a[p] for a, _ in runs for p in prompts) / (len(runs) * len(prompts))
    mean_b = sum(b[p] for _, b in runs for p in prompts) / (len(runs) * len(prompts))
    return mean_a, mean_b, paired_bootstrap(table)


def against_round_0(results: Results, method: str, number: int, metric: str,
                    seeds: list[int] | None = None) -> tuple[float, float, Interval, int] | None:
    """(value, round 0's value, interval of the change, seeds) of a method's round, pooled over its seeds."""
    runs = []
    for seed, rounds in results.get(method, {}).items():
        if number in rounds and (seeds is None or seed in seeds):
            values = PER_PROMPT[metric](rounds[number], rounds[0])
            baseline = {p: 0.5 for p in values} if metric == "win_rate" else PER_PROMPT[metric](rounds[0], rounds[0])
            if values.keys() & baseline.keys():  # none for the pass rate when no prompt has constraints
                runs.append((values, baseline))
    if not runs:
        return None
    value, base, interval = pooled_difference(runs)
    return value, base, interval, len(runs)


def between_methods(results: Results, a: str, b: str, number: int, metric: str) -> tuple[Interval, int] | None:
    """Interval of method a minus method b at a round, over the seeds both have it, paired by prompt."""
    seeds = sorted(s for s in results.get(a, {}) if number in results[a][s]
                   and number in results.get(b, {}).get(s, {}))
    if not seeds:
        return None
    runs = [(PER_PROMPT[metric](results[a][s][number], results[a][s][0]),
             PER_PROMPT[metric](results[b][s][number], results[b][s][0])) for s in seeds]
    return pooled_difference(runs)[2], len(seeds)


def verdict_word(interval: Interval) -> str:
    if not interval.excludes_zero():
        return "not distinguishable"
    return "better" if interval.low > 0 else "worse"


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def seeds_text(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def interval_text(interval: Interval, scale: Callable[[float], str] = points) -> str:
    return f"{scale(interval.difference)} [{scale(interval.low)}, {scale(interval.high)}]"




def results_table(results: Results, methods: list[str]) -> str:
    header = ("| method | round | seeds | strict pass rate | change, points [95% CI] | reward | "
              "change [95% CI] | win rate vs round 0 [95% CI] | length (tokens) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    reward = lambda x: f"{x:+.3f}"  # noqa: E731
    for method in methods:
        rounds = sorted({n for by_round in results.get(method, {}).values() for n in by_round})
        if not rounds:
            lines.append(f"| {METHODS[method].label} | not run | 0 |" + " - |" * 6)
            continue
        for number in rounds:
            passed = against_round_0(results, method, number, "pass_rate")
            rewarded = against_round_0(results, method, number, "reward_mean")
            won = against_round_0(results, method, number, "win_rate")
            seeds = next((found[3] for found in (passed, rewarded, won) if found), 0)
            lengths = [r[number].metrics.get("eval", {}).get("response_tokens_mean")
                       for r in results[method].values() if number in r]
            lengths = [x for x in lengths if isinstance(x, (int, float))]
            cells = [
                f"{passed[0]:.3f}" if passed else "-",
                "-" if not passed or number == 0 else interval_text(passed[2]),
                f"{rewarded[0]:.3f}" if rewarded else "-",
                "-" if not rewarded or number == 0 else interval_text(rewarded[2], reward),
                "-" if not won or number == 0 else
                f"{0.5 + won[2].difference:.3f} [{0.5 + won[2].low:.3f}, {0.5 + won[2].high:.3f}]",
                f"{sum(lengths) / len(lengths):.1f}" if lengths else "-",
            ]
            lines.append(f"| {METHODS[method].label} | {number} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

