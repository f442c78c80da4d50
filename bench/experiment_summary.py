"""The experiment's section of docs/results.md: the verdict, the tables and the plots.

The comparisons themselves (paired bootstraps over the held-out prompts, seeds
pooled per prompt) are in bench/experiment_tables.py; the replay ablation's
section in bench/replay_summary.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from bench.common import RESULTS_MD, replace_section, repo_relative
from bench.experiment_store import DEFAULT_METHOD, DEFAULT_SEEDS, LARPO, METHODS, seed_dir
from bench.experiment_tables import Results, against_round_0, between_methods, interval_text, load, \
    results_table, seeds_text, verdict_word
from bench.replay_summary import replay_section
from core.errors import PipelineError
from core.stats import BOOTSTRAP_RESAMPLES
from core.timing import round_wall_seconds

# The default config's goal (issue 12): +15 points of strict pass rate by the last round,
# mean over seeds, with the pooled interval's lower end at +5 points or more.
TARGET_GAIN, TARGET_LOW = 0.15, 0.05


def judge(results: Results) -> tuple[bool | None, str]:
    """Whether the paper's ordering held (every LarPO objective above iterative DPO), and the sentence.

    The test: at the last round both reached, each LarPO objective's strict pass
    rate minus iterative DPO's, paired by prompt over the seeds both ran, 95%
    bootstrap interval. Held: every one is better; not held: any is not; None
    while a LarPO objective has no run beside iterative DPO, or fewer seeds than
    the experiment's 3 (the comparisons there are still given).
    """
    parts, words, unchecked, counts = [], [], [], []
    for method in LARPO:
        last = min((min(max(r) for r in results[m].values()) for m in (method, "dpo") if m in results), default=0)
        found = between_methods(results, method, "dpo", last, "pass_rate") if method in results and last else None
        if found is None:
            unchecked.append(METHODS[method].short)
            continue
        interval, seeds = found
        counts.append(seeds)
        words.append(verdict_word(interval))
        parts.append(f"{METHODS[method].short} minus iterative DPO at round {last}, {interval_text(interval)} "
                     f"points over {seeds_text(seeds)}: {words[-1]}")
    test = ("the strict pass rate's paired bootstrap over the held-out prompts, each prompt's answers averaged "
            f"over the seeds both methods ran, {BOOTSTRAP_RESAMPLES:,} resamples, 95% interval")
    if "dpo" not in results or not parts:
        return None, ("The paper's ordering could not be checked: no trained round of "
                      + ("iterative DPO" if "dpo" not in results else ", ".join(unchecked)) + " to compare.")
    evidence = "; ".join(parts) + f" (test: {test})."
    if unchecked:
        return None, (f"The paper's ordering could not be checked yet: no runs of {', '.join(unchecked)} beside "
                      f"iterative DPO's. So far: {evidence}")
    held = all(w == "better" for w in words)
    opening = "The paper's ordering held" if held else "The paper's ordering did not hold"
    if min(counts) < len(DEFAULT_SEEDS):  # a verdict on fewer seeds than the experiment's is not one yet
        return None, (f"Not settled yet (some methods have fewer than {len(DEFAULT_SEEDS)} seeds); so far "
                      + opening[0].lower() + opening[1:] + ": " + evidence)
    return held, f"{opening}: {evidence}"


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
                         f"({seeds_text(seeds)}): {interval_text(interval)} points, "
                         f"{verdict_word(interval)}")
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
    lines += ["", f"Pooled over {seeds_text(seeds)}: {base:.3f} → {value:.3f}, "
              f"{interval_text(pooled)} points. The goal (at least +{100 * TARGET_GAIN:.0f} points over 3 seeds, "
              f"the pooled interval's lower end at least +{100 * TARGET_LOW:.0f}) is "
              f"**{'met' if met else 'not met'}**."]
    return lines


def wall_time(results: Results, store: Path) -> str:
    """How long the stored rounds took, and on which machines (each seed directory's machine.json)."""
    from bench.generate_bench import machine_line

    seconds = {m: sum(round_wall_seconds(r.metrics) or 0.0 for rounds in by_seed.values()
                      for n, r in rounds.items() if n > 0) for m, by_seed in results.items()}
    machines = set()
    for method, by_seed in results.items():
        for seed in by_seed:
            path = seed_dir(store, method, seed) / "machine.json"
            if path.is_file():
                machines.add(machine_line(json.loads(path.read_text()), {}).rstrip(", "))
    where = f" on {'; '.join(sorted(machines))}" if machines else ""
    return (f"Wall time of the stored rounds{where}: {sum(seconds.values()) / 3600:.1f} h in all ("
            + ", ".join(f"{METHODS[m].short} {s / 3600:.1f} h over {seeds_text(len(results[m]))}"
                        for m, s in seconds.items()) + ").")


def code_text(results: Results) -> str:
    """Which code produced each method's rows: the commits its stored rounds recorded (metrics.json's
    `code`); rounds from before that was recorded are named as such."""
    parts = []
    for method, by_seed in results.items():
        commits = sorted({(r.metrics.get("code") or {}).get("commit") or "" for rounds in by_seed.values()
                          for n, r in rounds.items() if n > 0})
        named = [commit[:10] for commit in commits if commit]
        text = ", ".join(f"commit {c}" for c in named)
        if "" in commits:
            text += (" and " if named else "") + ("code from before commits were recorded (training scored each "
                                                  "answer's text plus eos, truncated answers included)")
        parts.append(f"{METHODS[method].short}: {text}")
    return "Code that produced each method's rows: " + "; ".join(parts) + "."


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
    from core.layout import atomic_write_bytes

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
          "prompt's answers averaged over the seeds first (core/stats.py); a change is against round 0 "
          "of the same runs. The intervals hold the trained checkpoints fixed: they say how sure the held-out "
          "prompts make a comparison of these runs, not where another seed would land (each seed's own "
          "interval, for the default config, is below). " + wall_time(results, store) + " " + code_text(results), "",
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

