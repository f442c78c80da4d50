"""`python -m pipeline report <run dir>`: every round of a run side by side.

Reads each `round_NNN/metrics.json` (round 0, the base model's evaluation,
included when it exists) and each round's `policy/training_log.jsonl`, prints
a table, and writes it as `report.md` with a plot, `report.png`, into the run
directory. Every trained round's reward, win rate and strict pass rate come
with the 95% paired bootstrap interval of their difference against round 0
(stages/evaluate.py, `intervals_vs_round_0`), in the table and as error bars.
Only finished rounds have a metrics.json, so a round in progress is left out
rather than shown half-done.
"""

from __future__ import annotations

import errno
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from core.errors import PipelineError
from core.layout import atomic_write_bytes, atomic_write_text
from core.timing import round_wall_seconds

ROUND_DIR = re.compile(r"round_(\d{3})")

# (key of a table row, column header, format); "interval" cells are formatted by format_interval.
COLUMNS = [
    ("round", "round", "{}"),
    ("reward_mean", "eval reward", "{:.3f}"),
    ("win_rate", "win rate vs round 0", "{:.3f}"),
    ("pass_rate", "pass rate", "{:.3f}"),
    ("reward_mean_interval", "reward change [95% CI]", "interval"),
    ("win_rate_interval", "win rate [95% CI]", "interval"),
    ("pass_rate_interval", "pass rate change, points [95% CI]", "interval"),
    ("response_tokens_mean", "mean length (tokens)", "{:.1f}"),
    ("truncated_rate", "cut at max_tokens", "{:.3f}"),
    ("loss_last", "train loss (last)", "{:.4f}"),
    ("loss_mean", "train loss (mean)", "{:.4f}"),
    ("lists", "lists kept", "{}"),
    ("wall_seconds", "wall time (s)", "{:.1f}"),
]


def read_run(run_dir: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(metrics, training log records) of every round with a metrics.json, in round order."""
    if not run_dir.is_dir():
        raise PipelineError(f"run directory {run_dir} does not exist")
    rounds = []
    for round_dir in sorted(p for p in run_dir.iterdir() if ROUND_DIR.fullmatch(p.name)):
        metrics_path = round_dir / "metrics.json"
        if not metrics_path.is_file():
            continue
        metrics = read_json(metrics_path)
        if not isinstance(metrics, dict):
            raise PipelineError(f"{metrics_path} must hold a JSON object, not {type(metrics).__name__}")
        metrics.setdefault("round", int(ROUND_DIR.fullmatch(round_dir.name).group(1)))
        rounds.append((metrics, read_training_log(round_dir / "policy" / "training_log.jsonl")))
    if not rounds:
        raise PipelineError(f"run directory {run_dir} has no finished rounds (no round_NNN/metrics.json)")
    return rounds


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is not valid JSON: {exc}") from None


def read_training_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{path} line {number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("loss"), (int, float)):
            raise PipelineError(f"{path} line {number} has no numeric 'loss'")
        records.append(record)
    return records


# The metrics that carry an interval against round 0.
INTERVAL_KEYS = ("reward_mean", "win_rate", "pass_rate")


def table_row(metrics: dict[str, Any], training_log: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's table row; None where the round has no such number (round 0 trains nothing)."""
    evaluation = metrics.get("eval") or {}
    intervals = evaluation.get("vs_round_0") or {}
    train = metrics.get("train") or {}
    losses = [r["loss"] for r in training_log]
    # The log has every step; metrics.json only a summary, used when the log is gone.
    loss_last = losses[-1] if losses else train.get("loss_last")
    loss_mean = sum(losses) / len(losses) if losses else train.get("loss_mean")
    return {
        "round": metrics["round"],
        **{key: evaluation.get(key) for key in ("reward_mean", "win_rate", "pass_rate", "response_tokens_mean",
                                                "truncated_rate")},
        # Round 0 against itself has no interval to show.
        **{f"{key}_interval": intervals.get(key) if metrics["round"] else None for key in INTERVAL_KEYS},
        "pass_rate_by_kind": evaluation.get("pass_rate_by_kind") or {},
        "pass_count_by_kind": evaluation.get("pass_count_by_kind") or {},
        "loss_last": loss_last,
        "loss_mean": loss_mean,
        "lists": ((metrics.get("stages") or {}).get("rerank") or {}).get("lists"),
        "wall_seconds": round_wall_seconds(metrics),
    }


def format_interval(interval: dict[str, Any], key: str) -> str:
    """'+0.073 [+0.021, +0.120]': reward as a change, pass rate as a change in points,
    the win rate as the rate itself (round 0's 0.5 plus the difference)."""
    parts = ("difference", "low", "high")
    if key == "win_rate_interval":
        return "{:.3f} [{:.3f}, {:.3f}]".format(*(interval["baseline"] + interval[k] for k in parts))
    scale, spec = (100, "{:+.1f}") if key == "pass_rate_interval" else (1, "{:+.3f}")
    difference, low, high = (spec.format(scale * interval[k]) for k in parts)
    return f"{difference} [{low}, {high}]"


def format_cell(value: Any, fmt: str, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "interval":
        try:
            return format_interval(value, key)
        except (KeyError, TypeError, ValueError):  # a hand-edited metrics.json
            return str(value)
    try:
        return fmt.format(value)
    except (TypeError, ValueError):  # a hand-edited metrics.json: show what is there
        return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[key], fmt, key) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def kind_cell(row: dict[str, Any], kind: str) -> str:
    """'0.316 (6/19)': the rate with its counts, which a rate over a few prompts needs beside it."""
    counts = row.get("pass_count_by_kind", {}).get(kind)
    rate = format_cell(row["pass_rate_by_kind"].get(kind), "{:.3f}")
    return f"{rate} ({counts[0]}/{counts[1]})" if counts else rate


def kinds_table(rows: list[dict[str, Any]]) -> str:
    """Strict pass rate per constraint kind (rows) and round (columns), with counts where the round
    kept them; empty when no round has them."""
    kinds = sorted({kind for row in rows for kind in row["pass_rate_by_kind"]})
    if not kinds:
        return ""
    lines = ["| constraint kind | " + " | ".join(f"round {row['round']}" for row in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(kind_cell(row, kind) for row in rows) + " |")
    return "\n".join(lines) + "\n"


def interval_bars(rows: list[dict[str, Any]], key: str) -> tuple[list, list, list[list[float]]]:
    """Rounds, values and [below, above] error-bar lengths of `key` (0 where a round has no interval).

    The interval is of the difference against round 0, drawn around round N's value
    as round 0's value plus that interval.
    """
    rounds, values, below, above = [], [], [], []
    for row in rows:
        value = row[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            continue
        rounds.append(row["round"])
        values.append(value)
        interval = row.get(f"{key}_interval")
        try:
            low, high = (interval["baseline"] + interval[k] for k in ("low", "high"))
        except (KeyError, TypeError):
            low = high = value
        below.append(max(0.0, value - low))
        above.append(max(0.0, high - value))
    return rounds, values, [below, above]


def plot_png(rows: list[dict[str, Any]], training_logs: list[list[dict[str, Any]]]) -> bytes:
    """Reward and pass rate, win rate, and length against round; training loss per step, all rounds."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        (axes[0, 0], [("reward_mean", "eval reward"), ("pass_rate", "strict pass rate")],
         "held-out reward and pass rate (95% CI vs round 0)"),
        (axes[0, 1], [("win_rate", "win rate")], "win rate vs round 0 (95% CI)"),
        (axes[1, 0], [("response_tokens_mean", "mean length")], "response length (tokens)"),
    ]
    for ax, series, title in panels:
        for key, label in series:
            if key in INTERVAL_KEYS:
                rounds, values, bars = interval_bars(rows, key)
                if rounds:
                    ax.errorbar(rounds, values, yerr=bars, marker="o", capsize=4, label=label)
                continue
            points = [(r["round"], r[key]) for r in rows if r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    axes[0, 1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[0, 1].set_ylim(-0.05, 1.05)

    # Steps run on across rounds, so each round's curve starts where the previous one ended.
    ax, offset = axes[1, 1], 0
    for row, records in zip(rows, training_logs, strict=True):
        if records:
            steps = range(offset + 1, offset + len(records) + 1)
            ax.plot(steps, [r["loss"] for r in records], marker=".", label=f"round {row['round']}")
            offset += len(records)
    ax.set_title("training loss per step")
    ax.set_xlabel("step (all rounds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # Without the logs (runs stored in docs/experiments keep only metrics.json), each round's mean loss.
    means = [(row["round"], row["loss_mean"]) for row in rows if isinstance(row["loss_mean"], (int, float))]
    if offset:
        ax.legend(fontsize="small")
    elif means:
        ax.plot(*zip(*means), marker="o")
        ax.set_title("mean training loss per round")
        ax.set_xlabel("round")
    else:
        ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(run_dir: Path) -> str:
    """Write `report.md` and `report.png` into the run directory; return the table."""
    rounds = read_run(run_dir)
    rows = [table_row(metrics, training_log) for metrics, training_log in rounds]
    table = markdown_table(rows)
    title = f"# Run {run_dir.resolve().name}\n\n"
    kinds = kinds_table(rows)
    kinds_text = f"\n## Strict pass rate per constraint kind\n\n{kinds}" if kinds else ""
    atomic_write_text(run_dir / "report.md", title + table + "\nIntervals: 95% paired bootstrap over the held-out "
                      "prompts of the difference against round 0.\n\n![rounds](report.png)\n" + kinds_text)
    atomic_write_bytes(run_dir / "report.png", plot_png(rows, [log for _, log in rounds]))
    return table


# A run directory the report cannot be written into: no permission, a read-only mount, a full disk.
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def main(args) -> int:
    run_dir = Path(args.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"{run_dir} is a file; give a run directory, e.g. runs/default")
    try:
        table = write_report(run_dir)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise PipelineError(f"cannot write the report into {run_dir}: {exc.strerror} ({exc.filename})") from None
    print(table, end="")
    unfinished = sorted(p.name for p in run_dir.glob("round_[0-9][0-9][0-9]*")
                        if p.is_dir() and not (p / "metrics.json").is_file())
    if unfinished:
        print(f"not reported, not finished yet (no metrics.json): {', '.join(unfinished)}")
    print(f"wrote {run_dir / 'report.md'} and {run_dir / 'report.png'}")
    return 0
