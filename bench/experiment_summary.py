"""The experiment's tables, verdict and plots, from the stored runs (docs/experiments/).

Every number with an interval is a paired bootstrap over the held-out prompts
(pipeline/stats.py): a method's change against round 0 pairs each prompt's
answer with round 0's answer to it; a comparison of two methods pairs their
answers to the same prompt. Over several seeds, each prompt's differences are
averaged over the seeds first ("pooled"), so the interval is over prompts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.experiment import DEFAULT_METHOD, LARPO, METHODS, REPLAY_METHODS, RESULTS_MD, repo_relative, \
    replace_section, \
    seed_dir, stored_rounds
from pipeline.errors import PipelineError
from pipeline.stats import BOOTSTRAP_RESAMPLES, Interval, paired_bootstrap
from stages.evaluate import win_score

# The default config's goal (issue 12): +15 points of strict pass rate by the last round,
# mean over seeds, with the pooled interval's lower end at +5 points or more.
TARGET_GAIN, TARGET_LOW = 0.15, 0.05


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
    from pipeline.layout import read_parquet_dir
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
    if interval.low > 0:
        return "better"
    if interval.high < 0:
        return "worse"
    return "not distinguishable"


def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def interval_text(interval: Interval, scale: Callable[[float], str] = points) -> str:
    return f"{scale(interval.difference)} [{scale(interval.low)}, {scale(interval.high)}]"


# --- the tables --------------------------------------------------------------------

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
            seeds = (passed or rewarded)[3]
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


def judge(results: Results) -> tuple[bool | None, str]:
    """Whether the paper's ordering held (every LarPO objective above iterative DPO), and the sentence.

    The test: at the last round every method reached, each LarPO objective's strict
    pass rate minus iterative DPO's, paired by prompt over the seeds both ran, 95%
    bootstrap interval. Held: every one is better; not held: otherwise.
    """
    needed = ("dpo", *LARPO)
    missing = [METHODS[m].short for m in needed if m not in results]
    if missing:
        return None, f"The paper's ordering could not be checked: no stored runs for {', '.join(missing)}."
    last_rounds = [min(max(rounds) for rounds in results[m].values()) for m in needed]
    last = min(last_rounds)
    if last == 0:
        return None, "The paper's ordering could not be checked: the methods share no trained round."
    parts, words = [], []
    for method in LARPO:
        interval, seeds = between_methods(results, method, "dpo", last, "pass_rate")
        words.append(verdict_word(interval))
        parts.append(f"{METHODS[method].short} minus iterative DPO {interval_text(interval)} points over "
                     f"{seeds} seed{'s' if seeds > 1 else ''}: {words[-1]}")
    held = all(w == "better" for w in words)
    test = ("the strict pass rate's paired bootstrap over the held-out prompts, each prompt's answers averaged "
            f"over the seeds both methods ran, {BOOTSTRAP_RESAMPLES:,} resamples, 95% interval")
    opening = "The paper's ordering held" if held else "The paper's ordering did not hold"
    return held, f"{opening} at round {last}: " + "; ".join(parts) + f" (test: {test})."


def pairwise_comparison(results: Results) -> list[str]:
    """LarPO against pairwise DPO on the same K (the loss alone), at the last shared round."""
    if "dpo-k" not in results:
        return []
    lines = []
    for method in LARPO:
        if method not in results:
            continue
        last = min(min(max(r) for r in results[m].values()) for m in (method, "dpo-k"))
        found = between_methods(results, method, "dpo-k", last, "pass_rate") if last else None
        if found:
            interval, seeds = found
            lines.append(f"- {METHODS[method].short} minus {METHODS['dpo-k'].short} at round {last} "
                         f"({seeds} seeds): {interval_text(interval)} points, {verdict_word(interval)}")
    return ["", "The loss alone, at an equal generation budget (pairwise DPO on the best and worst of the same "
            "K samples), strict pass rate:", "", *lines] if lines else []


def default_section(results: Results) -> list[str]:
    """The default config's gain by its last round: each seed's own interval, the pooled one, the target."""
    runs = results.get(DEFAULT_METHOD)
    if not runs:
        return []
    last = min(max(rounds) for rounds in runs.values())
    if last == 0:
        return []
    lines = ["### The default config", "",
             f"`configs/default.yaml` is the `{DEFAULT_METHOD}` method. Strict pass rate on the held-out prompts, "
             f"round 0 against round {last}, with each seed's own 95% interval:", "",
             "| seed | round 0 | round " + str(last) + " | change, points [95% CI] |", "|---:|---:|---:|---:|"]
    for seed in sorted(runs):
        found = against_round_0(results, DEFAULT_METHOD, last, "pass_rate", seeds=[seed])
        if found:
            value, base, interval, _ = found
            lines.append(f"| {seed} | {base:.3f} | {value:.3f} | {interval_text(interval)} |")
    value, base, pooled, seeds = against_round_0(results, DEFAULT_METHOD, last, "pass_rate")
    met = seeds >= 3 and pooled.difference >= TARGET_GAIN and pooled.low >= TARGET_LOW
    lines += ["", f"Pooled over {seeds} seed{'s' if seeds > 1 else ''}: {base:.3f} → {value:.3f}, "
              f"{interval_text(pooled)} points. The goal (at least +{100 * TARGET_GAIN:.0f} points over 3 seeds, "
              f"the pooled interval's lower end at least +{100 * TARGET_LOW:.0f}) is "
              f"**{'met' if met else 'not met'}**."]
    return lines


def replay_section(store: Path, seeds: list[int]) -> list[str]:
    """The replay ablation (`make experiment-replay`): its table and each replay against none, by round."""
    results = load(store, list(REPLAY_METHODS), seeds)
    if not any(method in results for method in REPLAY_METHODS[1:]):
        return []
    lines = ["", "### Replaying earlier rounds' lists (`train.replay`, the paper's Table 4)", "",
             "The default config (`train.replay: none`) against the same with round N-1's lists (`previous`) "
             "or every earlier round's (`all`) trained on again, same seeds. Differences: paired bootstrap "
             "over the held-out prompts, seeds averaged per prompt.", ""]
    last = max((n for by_seed in results.values() for rounds in by_seed.values() for n in rounds), default=0)
    for method in REPLAY_METHODS[1:]:
        for number in range(2, last + 1):  # round 1 has nothing earlier to replay
            found = between_methods(results, method, DEFAULT_METHOD, number, "pass_rate")
            if found:
                interval, count = found
                lines.append(f"- {METHODS[method].short} minus none, round {number} ({count} seeds): strict pass "
                             f"rate {interval_text(interval)} points: {verdict_word(interval)}")
    return lines + ["", results_table(results, list(REPLAY_METHODS)), *replay_cost_lines(results)]


def replay_cost_lines(results: Results) -> list[str]:
    """What replay costs the train stage: lists trained and train seconds per round, against none."""
    def mean_of(method: str, number: int, key: Callable[[dict[str, Any]], float]) -> float | None:
        values = [key(r[number].metrics.get("stages", {})) for r in results.get(method, {}).values() if number in r]
        return sum(values) / len(values) if values else None

    lists = lambda s: s["reference"]["lists_current"] + s["reference"]["lists_replayed"]  # noqa: E731
    seconds = lambda s: s["train"]["train_seconds"]  # noqa: E731
    lines = ["", "Training cost (mean over seeds; train seconds are the training steps' wall time, which other "
             "load on the machine also moves):", "",
             "| method | round | lists trained | vs none | train seconds | vs none |", "|---|---:|---:|---:|---:|---:|"]
    for method in REPLAY_METHODS:
        for number in sorted({n for r in results.get(method, {}).values() for n in r if n > 0}):
            try:
                cells = [(mean_of(method, number, key), mean_of(DEFAULT_METHOD, number, key))
                         for key in (lists, seconds)]
            except (KeyError, TypeError):  # a round stored before replay was counted
                continue
            text = [f"{v:.0f} | " + (f"{v / none:.2f}x" if none else "-") for v, none in cells]
            name = "none" if method == DEFAULT_METHOD else METHODS[method].short
            lines.append(f"| {name} | {number} | " + " | ".join(text) + " |")
    return lines if len(lines) > 5 else []


def wall_time(results: Results, store: Path) -> str:
    """How long the stored rounds took, and on which machines (each seed directory's machine.json)."""
    from bench.generate_bench import machine_line

    seconds = {m: sum(r.metrics.get("round_seconds") or 0.0 for rounds in by_seed.values()
                      for n, r in rounds.items() if n > 0) for m, by_seed in results.items()}
    machines = set()
    for method, by_seed in results.items():
        for seed in by_seed:
            path = seed_dir(store, method, seed) / "machine.json"
            if path.is_file():
                machines.add(machine_line(json.loads(path.read_text()), {}).rstrip(", "))
    where = f" on {'; '.join(sorted(machines))}" if machines else ""
    return (f"Wall time of the stored rounds{where}: {sum(seconds.values()) / 3600:.1f} h in all ("
            + ", ".join(f"{METHODS[m].short} {s / 3600:.1f} h" for m, s in seconds.items()) + ").")


# --- the plots ---------------------------------------------------------------------

def plot_results(results: Results, methods: list[str]) -> bytes:
    """Strict pass rate, reward and win rate against round, one line per method, pooled 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [("pass_rate", "strict pass rate"), ("reward_mean", "held-out mean reward"),
              ("win_rate", "win rate vs round 0")]
    for ax, (metric, title) in zip(axes, panels):
        for offset, method in enumerate(m for m in methods if m in results):
            rounds = sorted({n for by_round in results[method].values() for n in by_round})
            xs, ys, below, above = [], [], [], []
            for number in rounds:
                value, base, interval, _ = against_round_0(results, method, number, metric)
                xs.append(number + 0.04 * (offset - 2))  # side by side, so the bars do not hide each other
                ys.append(value)
                below.append(max(0.0, value - (base + interval.low)))
                above.append(max(0.0, base + interval.high - value))
            ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=METHODS[method].short)
        ax.set_title(f"{title} (95% CI vs round 0)")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def default_run_png(store: Path, results: Results) -> bytes | None:
    """`python -m pipeline report`'s plot of the default method's lowest stored seed."""
    from pipeline.report import plot_png, read_run, table_row

    if DEFAULT_METHOD not in results:
        return None
    rounds = read_run(seed_dir(store, DEFAULT_METHOD, min(results[DEFAULT_METHOD])))
    return plot_png([table_row(m, log) for m, log in rounds], [log for _, log in rounds])


def settings_text(results: Results) -> str:
    """What the runs were, from a stored round's resolved config (metrics.json holds no config)."""
    for by_seed in results.values():
        for rounds in by_seed.values():
            stats = (rounds.get(1) or rounds[0]).metrics.get("stages", {})
            evaluate = stats.get("evaluate", {})
            if evaluate:
                return (f"{evaluate.get('eval_prompts')} held-out prompts answered greedily "
                        f"(temperature {evaluate.get('temperature')}, at most {evaluate.get('max_tokens')} tokens). ")
    return ""


def summarize(store: Path, methods: list[str], seeds: list[int], results_md: Path = RESULTS_MD) -> bool | None:
    """Write the experiment section of results_md and its plots beside it; return the verdict."""
    from pipeline.layout import atomic_write_bytes

    results = load(store, methods, seeds)
    if not results:
        raise PipelineError(f"no stored runs under {store}/<method>/seed-<s> for any of {', '.join(methods)}: "
                            "run `make experiment` first")
    held, sentence = judge(results)
    png = results_md.with_suffix(".png")
    default_png = results_md.parent / "default-run.png"
    body = [
        "## Alignment gains (`make experiment`)", "",
        f"Written by `bench/experiment.py` from the stored runs in `{repo_relative(store)}/<method>/seed-<s>/` "
        "(each round's metrics.json and held-out answers, committed; `--summarize-only` rebuilds this from them). "
        + settings_text(results)
        + "Round 0 is the base model. Every interval is a 95% paired bootstrap over the held-out prompts, each "
          "prompt's answers averaged over the seeds first (pipeline/stats.py); a change is against round 0 "
          "of the same runs. " + wall_time(results, store), "",
        f"**{sentence}**",
        *pairwise_comparison(results), "",
        results_table(results, methods),
        f"![strict pass rate, reward and win rate per round and method]({png.name})", "",
        *default_section(results),
        *replay_section(store, seeds),
    ]
    default_plot = default_run_png(store, results)
    if default_plot is not None:
        body += ["", "`python -m pipeline report` on the default config's first seed:", "",
                 f"![the default run, round by round]({default_png.name})"]
        atomic_write_bytes(default_png, default_plot)
    replace_section(results_md, "experiment", "\n".join(body))
    atomic_write_bytes(png, plot_results(results, methods))
    print(results_table(results, methods) + "\n" + sentence)
    print(f"wrote {results_md} and {png}")
    return held

