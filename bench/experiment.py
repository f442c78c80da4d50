"""`make experiment`: pairwise iterative DPO against the three LarPO objectives, round after round.

Runs `python -m pipeline rounds N` once per method, on the same config (the
embedded default unless --config says otherwise), prompts and seed, each as its
own run `<output>/<prefix>-<method>`:

  dpo          iterative DPO: 2 samples per prompt, best against worst (pairwise)
  contrastive  LarPO contrastive: 4 samples, the best against all the rest
  lambdarank   LarPO LambdaRank: 4 samples, top-2 against bottom-2
  listmle      LarPO ListMLE: 4 samples, top-2 against bottom-2

then summarises: per method and round the held-out mean reward, win rate
against round 0 and pass rate (each round's metrics.json, read as
`python -m pipeline report` reads it), as a markdown table and a plot, written
into docs/results.md (between its `experiment` markers) and docs/results.png,
with one sentence on whether the paper's ordering held.

Usage:
  python bench/experiment.py [--config FILE] [--rounds 3] [--methods dpo,contrastive,...]
                             [--output ROOT] [--prefix experiment] [key=value ...]
  python bench/experiment.py --summarize-only      # only the table, the plot and the sentence
Finished rounds are skipped, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pipeline.errors import PipelineError  # noqa: E402

# name -> (label, config overrides). The lists keys are written out even where they
# equal configs/default.yaml, so that another --config gets the same lists.
METHODS: dict[str, tuple[str, list[str]]] = {
    "dpo": ("iterative DPO (pairwise, K=2)",
            ["train.objective=dpo", "generate.num_samples=2",
             "lists.strategy=top_bottom", "lists.num_positives=1", "lists.num_negatives=1"]),
    "contrastive": ("LarPO contrastive (K=4, top-1 vs rest)",
                    ["train.objective=contrastive", "generate.num_samples=4",
                     "lists.strategy=top_rest", "lists.num_positives=1"]),
    "lambdarank": ("LarPO LambdaRank (K=4, top-2 vs bottom-2)",
                   ["train.objective=lambdarank", "generate.num_samples=4",
                    "lists.strategy=top_bottom", "lists.num_positives=2", "lists.num_negatives=2"]),
    "listmle": ("LarPO ListMLE (K=4, top-2 vs bottom-2)",
                ["train.objective=listmle", "generate.num_samples=4",
                 "lists.strategy=top_bottom", "lists.num_positives=2", "lists.num_negatives=2"]),
}
PAIRWISE = "dpo"
# Its overrides are configs/default.yaml's own lists and objective: its run is a default run.
DEFAULT_METHOD = "contrastive"
LARPO = ("contrastive", "lambdarank", "listmle")
SHORT = {"dpo": "iterative DPO", "contrastive": "contrastive", "lambdarank": "LambdaRank", "listmle": "ListMLE"}

RESULTS_MD = REPO_ROOT / "docs" / "results.md"
RESULTS_TITLE = "# Results\n"
# (row key, column header, format) of the per-round table.
TABLE_COLUMNS = [("reward_mean", "eval reward", "{:.3f}"), ("win_rate", "win rate vs round 0", "{:.3f}"),
                 ("pass_rate", "pass rate", "{:.3f}"), ("response_tokens_mean", "mean length (tokens)", "{:.1f}")]


# --- running ---------------------------------------------------------------------

def run_method(name: str, args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "pipeline", "rounds", str(args.rounds), "--config", args.config,
               "--run", f"{args.prefix}-{name}"]
    if args.output:
        command += ["--output", args.output]
    # The method's overrides first, so that the user's may change them.
    command += METHODS[name][1] + list(args.overrides)
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


def output_root(args: argparse.Namespace) -> Path:
    if args.output:
        root = Path(args.output)
    else:
        from pipeline.config import load_config

        root = Path(load_config(args.config, list(args.overrides)).output)
    return root if root.is_absolute() else REPO_ROOT / root


# --- summarising -----------------------------------------------------------------

def collect(root: Path, prefix: str, methods: list[str]) -> dict[str, list[dict[str, Any]] | None]:
    """Each method's report rows (round 0 first), or None when its run has no finished round."""
    from pipeline.report import read_run, table_row

    found: dict[str, list[dict[str, Any]] | None] = {}
    for name in methods:
        run_dir = root / f"{prefix}-{name}"
        if not run_dir.is_dir() or not any(run_dir.glob("round_[0-9][0-9][0-9]/metrics.json")):
            found[name] = None  # not run (yet); a broken metrics.json is an error read_run names
            continue
        found[name] = [table_row(metrics, log) for metrics, log in read_run(run_dir)]
    return found


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _cell(value: Any, fmt: str) -> str:
    number = _num(value)
    return "-" if number is None else fmt.format(number)


def judge(results: dict[str, list[dict[str, Any]] | None]) -> tuple[bool | None, str]:
    """Whether the paper's ordering held, and one plain sentence saying so.

    Held: at the last round every method finished, each LarPO objective's held-out
    mean reward is at least the pairwise baseline's, and every method's is above
    its round 0. None when that cannot be judged (a method or a number missing).
    """
    missing = [SHORT[m] for m in (PAIRWISE, *LARPO) if not results.get(m)]
    if missing:
        return None, f"The paper's ordering could not be checked: no finished rounds for {', '.join(missing)}."
    by_round = {m: {row["round"]: row for row in results[m]} for m in (PAIRWISE, *LARPO)}
    common = set.intersection(*(set(rounds) for rounds in by_round.values())) - {0}
    if not common or not all(0 in rounds for rounds in by_round.values()):
        return None, "The paper's ordering could not be checked: the methods share no trained round and round 0."
    last = max(common)
    reward = {m: _num(by_round[m][last]["reward_mean"]) for m in by_round}
    base = {m: _num(by_round[m][0]["reward_mean"]) for m in by_round}
    if None in reward.values() or None in base.values():
        return None, f"The paper's ordering could not be checked: a held-out reward of round 0 or {last} is missing."

    below = [m for m in LARPO if reward[m] < reward[PAIRWISE]]
    no_gain = [m for m in (PAIRWISE, *LARPO) if reward[m] <= base[m]]
    larpo_text = ", ".join(f"{SHORT[m]} {reward[m]:.3f}" for m in LARPO)
    dpo_text = f"{SHORT[PAIRWISE]} {reward[PAIRWISE]:.3f}"
    if not below and not no_gain:
        return True, (f"The paper's ordering held at round {last}: every LarPO objective ({larpo_text}) reached at "
                      f"least the pairwise baseline's held-out reward ({dpo_text}), and every method gained over "
                      "round 0 (" + ", ".join(f"{SHORT[m]} {base[m]:.3f} → {reward[m]:.3f}"
                                              for m in (PAIRWISE, *LARPO)) + ").")
    reasons = []
    if below:
        reasons.append(", ".join(f"{SHORT[m]} ({reward[m]:.3f})" for m in below)
                       + f" ended below {dpo_text}")
    else:
        reasons.append(f"every LarPO objective ({larpo_text}) reached at least {dpo_text}")
    if no_gain:
        reasons.append("no gain over round 0 for " + ", ".join(f"{SHORT[m]} ({base[m]:.3f} → {reward[m]:.3f})"
                                                                for m in no_gain))
    else:
        reasons.append("every method gained over round 0")
    return False, f"The paper's ordering did not hold at round {last}: " + "; ".join(reasons) + "."


def results_table(results: dict[str, list[dict[str, Any]] | None]) -> str:
    lines = ["| method | round | " + " | ".join(header for _, header, _ in TABLE_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(TABLE_COLUMNS)]
    for name, rows in results.items():
        if not rows:
            lines.append(f"| {METHODS[name][0]} | not run | " + " | ".join("-" for _ in TABLE_COLUMNS) + " |")
            continue
        for row in rows:
            lines.append(f"| {METHODS[name][0]} | {row['round']} | "
                         + " | ".join(_cell(row[key], fmt) for key, _, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, list[dict[str, Any]] | None]) -> bytes:
    """Held-out reward, win rate and pass rate against round, one line per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, [("reward_mean", "held-out mean reward"),
                                       ("win_rate", "win rate vs round 0"), ("pass_rate", "pass rate")]):
        for name, rows in results.items():
            points = [(row["round"], _num(row[key])) for row in rows or [] if _num(row[key]) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=SHORT[name])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylim(-0.05, 1.05)
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def run_settings(root: Path, prefix: str, results: dict[str, Any]) -> str:
    """What the runs were, read back from the first run's config.yaml (when there is one)."""
    import yaml

    for name, rows in results.items():
        # The newest round's config: the run's own config.yaml is its first invocation's,
        # and keys outside the run identity (the learning rate) may change between rounds.
        rounds = sorted((root / f"{prefix}-{name}").glob("round_[0-9][0-9][0-9]/config.yaml"))
        path = rounds[-1] if rounds else root / f"{prefix}-{name}" / "config.yaml"
        if rows and path.is_file():
            config = yaml.safe_load(path.read_text())
            evaluate = config.get("evaluate", {})
            prompts = config.get("prompts", {})
            return (f"Model `{config.get('model', {}).get('name')}`, reward `{config.get('reward', {}).get('name')}`, "
                    f"seed {config.get('seed')}, {prompts.get('per_round')} training prompts per round, "
                    f"{prompts.get('eval_size')} held-out prompts answered at temperature "
                    f"{evaluate.get('temperature')} (max {evaluate.get('max_tokens')} tokens), "
                    f"beta {config.get('train', {}).get('beta')}, learning rate "
                    f"{config.get('train', {}).get('learning_rate')}. ")
    return ""


def summarize(root: Path, prefix: str, methods: list[str], results_md: Path = RESULTS_MD) -> bool | None:
    """Write the experiment section of results_md and the plot beside it; return the verdict."""
    from pipeline.report import atomic_write_bytes

    results = collect(root, prefix, methods)
    if not any(results.values()):
        raise PipelineError(f"no finished rounds under {root}/{prefix}-<method> for any of {', '.join(methods)}: "
                            "run `make experiment` first")
    held, sentence = judge(results)
    png = results_md.with_suffix(".png")
    default_png = results_md.parent / "default-run.png"
    default_text = default_run(root, prefix, results, default_png)
    body = "\n".join([
        "## Alignment gains (`make experiment`)",
        "",
        f"Written by `bench/experiment.py` from `{repo_relative(root)}/{prefix}-<method>/round_NNN/metrics.json`. "
        + run_settings(root, prefix, results)
        + "Every method ran on the same config, prompts and seed; round 0 is the base model, the baseline of "
          "every win rate. One seed per method: differences of a few hundredths are not evidence. "
          "As the issue asks, iterative DPO samples 2 answers per prompt and the LarPO methods 4, so the "
          "comparison is of the whole recipe (how many candidates are ranked, and how they are trained on), "
          "not of the loss alone; with a reward of few distinct values, 2 samples also tie more often and "
          "leave fewer prompts with a list (the `lists` column of `python -m pipeline report`).",
        "",
        f"**{sentence}**",
        "",
        results_table(results),
        f"![held-out reward, win rate and pass rate per round]({png.name})",
        *default_text,
    ])
    replace_section(results_md, "experiment", body)
    atomic_write_bytes(png, plot_results(results))
    print(results_table(results) + "\n" + sentence)
    print(f"wrote {results_md} and {png}")
    return held


def default_run(root: Path, prefix: str, results: dict[str, Any], png: Path) -> list[str]:
    """The default method's run as `python -m pipeline report` plots it (written to png), and
    whether it raised the held-out mean reward over round 0; no lines when it has no rounds."""
    from pipeline.layout import atomic_write_bytes
    from pipeline.report import plot_png, read_run, table_row

    rows = results.get(DEFAULT_METHOD)
    if not rows:
        return []
    rounds = read_run(root / f"{prefix}-{DEFAULT_METHOD}")
    atomic_write_bytes(png, plot_png([table_row(m, log) for m, log in rounds], [log for _, log in rounds]))
    by_round = {row["round"]: _num(row["reward_mean"]) for row in rows}
    last = max(by_round)
    if 0 in by_round and last > 0 and None not in (by_round[0], by_round[last]):
        raised = "raised" if by_round[last] > by_round[0] else "did not raise"
        verdict = (f"The default config ({SHORT[DEFAULT_METHOD]}, its run `{prefix}-{DEFAULT_METHOD}`) {raised} "
                   f"the held-out mean reward over round 0 by round {last}: {by_round[0]:.3f} → {by_round[last]:.3f} "
                   "(round by round: " + ", ".join(f"{by_round[r]:.3f}" for r in sorted(by_round)) + ").")
    else:
        verdict = f"The default config's run `{prefix}-{DEFAULT_METHOD}` has no trained round to compare with round 0."
    return ["", "### A default run", "", verdict, "",
            "Its `python -m pipeline report` plot: reward and pass rate, win rate and length per round, and the "
            "training loss of every step:", "", f"![the default run, round by round]({png.name})"]


def repo_relative(path: Path) -> str:
    """The path as docs show it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def replace_section(path: Path, name: str, body: str) -> None:
    """Put `body` between the `<!-- name:start/end -->` markers of `path`, keeping the rest of the file."""
    from pipeline.layout import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else RESULTS_TITLE
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--output", help="output root of the runs (default: the config's `output`)")
    parser.add_argument("--prefix", default="experiment", help="runs are named <prefix>-<method>")
    parser.add_argument("--results", default=str(RESULTS_MD), help="markdown file to write (the PNG goes beside it)")
    parser.add_argument("--summarize-only", action="store_true", help="only summarise the runs that exist")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")
    # Overrides may come before or after options (ARGS="--rounds 1 train.beta=0.2").
    args = parser.parse_intermixed_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    # The runs and the config's relative paths are the repository's, wherever this is started from.
    args.config = str(Path(args.config).resolve())
    try:
        root = output_root(args)
        failed = []
        if not args.summarize_only:
            failed = [m for m in methods if run_method(m, args) != 0]
        summarize(root, args.prefix, methods, Path(args.results))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: these methods failed (their finished rounds are summarised): {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
