"""`make bench-round`: where a round's wall time goes, stage by stage.

Runs `python -m pipeline rounds 3 --config configs/default.yaml --run bench-round`
and times the whole command (the run is the benchmark's own: one left by an
earlier benchmark, known by its `.bench-round` marker file, is removed first so
the rounds really run; a directory without the marker is never touched), or,
with --from-run, only reads the finished rounds of an existing run, leaving out
those recorded before the per-stage timings existed. With --compare-old it first
runs the same rounds on the old path, `<run>-old` (engines started by every
sampling stage, the reference as its own stage: OLD_PATH), so that both are
measured side by side on the same machine. Each stage's
wall time is split with the timings the driver records in the stage's stats
(round_NNN/metrics.json, `stages.<stage>`; see core/timing.py), each
measured where it happens:

  start-up     imports and model or engine load inside the Ray actor, task or
               Ray Train worker, until the work can start
  Parquet I/O  reading and writing the stage's Parquet shards, Arrow conversion included
  save         writing the trained policy's checkpoint (train)
  work         sampling (vLLM), reward scoring and list building, reference
               log-probs, tokenizing lists and the training steps
  Ray and orchestration
               the rest of the stage's wall time: starting actor and worker
               processes and their runtime envs, Ray Train's worker group,
               scheduling, moving data between processes, the driver's glue

The round adds `ray.init` (once per round command) and the driver's time
between stages (importing each stage's module, bookkeeping), both counted as
Ray and orchestration. Raw numbers go to docs/bench/round.json and the table
to the `round` section of docs/results.md.

Usage:
  python bench/round_breakdown.py [--config configs/default.yaml] [--run bench-round] [--rounds 3]
                                  [--compare-old] [--output ROOT] [key=value ...]
  python bench/round_breakdown.py --from-run runs/<run> [--old-from-run runs/<run>-old] [--results FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_MD, output_root, replace_section, repo_relative
from bench.generate_bench import machine, machine_line, versions
from core.errors import PipelineError
from core.layout import STAGES

ROUND_JSON = REPO_ROOT / "docs" / "bench" / "round.json"
# (key, column header), in the table's order; "ray" is the remainder.
COLUMNS = [("wall", "wall"), ("startup", "start-up"), ("ray", "Ray & orchestration"), ("io", "Parquet I/O"),
           ("save", "checkpoint save"), ("work", "work")]
MEASURED = ("startup", "io", "save", "work")
# Written into a run directory the benchmark creates: only such a directory is ever removed.
MARKER = ".bench-round"
# The path before engines were kept and the reference was scored in the train workers.
OLD_PATH = ("generate.keep_engines=off", "reference.in_train_workers=false")


# --- the breakdown ---------------------------------------------------------------

def stage_breakdown(stats: dict[str, Any]) -> dict[str, float] | None:
    """One stage's wall time and its parts; None for a stage recorded before the timings existed."""
    if not all(f"{part}_seconds" in stats for part in ("startup", "io", "work")):
        return None
    parts = {part: float(stats.get(f"{part}_seconds", 0.0)) for part in MEASURED}
    wall = float(stats["wall_seconds"])
    return {"wall": wall, **parts, "ray": wall - sum(parts.values())}


def round_breakdown(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rows of one round's table: its stages, ray.init, the driver between stages, and the round.

    Every second of the round lands in exactly one column, so each row's parts add up to its wall
    time and the round's percentages to 100. A round without the timings raises PipelineError.
    """
    stages = metrics.get("stages", {})
    rows: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        row = stage_breakdown(stages.get(stage, {}))
        if row is None:
            raise PipelineError(f"round {metrics.get('round')}'s {stage} stage has no start-up/io/work timings: "
                                "it was run before they were recorded")
        rows[stage] = row
    # A reference scored in the train workers ran inside the train stage's wall time: counted once, as reference.
    inside = float(stages.get("train", {}).get("reference_seconds_inside", 0.0))
    rows["train"]["wall"] -= inside
    rows["train"]["ray"] -= inside
    if "ray_init_seconds" not in metrics or "round_seconds" not in metrics:
        raise PipelineError(f"round {metrics.get('round')}'s metrics.json has no ray_init_seconds/round_seconds")
    empty = dict.fromkeys(MEASURED, 0.0)
    ray_init = float(metrics["ray_init_seconds"])
    rows["ray.init"] = {"wall": ray_init, **empty, "ray": ray_init}
    # Round 0 (the base model's answers) is its own stage now, run before round 1's generate and
    # timed in metrics.json; older rounds made it inside their evaluate stage (already in its wall).
    baseline = metrics.get("baseline_seconds")
    between = (float(metrics["round_seconds"]) - ray_init - sum(rows[stage]["wall"] for stage in STAGES)
               - float(baseline or 0.0))
    rows["driver"] = {"wall": between, **empty, "ray": between}
    rows["round"] = {key: sum(row[key] for row in rows.values()) for key, _ in COLUMNS}
    return {"round": metrics.get("round"), "rows": rows,
            "baseline_seconds": baseline if baseline is not None else stages.get("evaluate", {}).get("baseline_seconds")}


def mean_rows(breakdowns: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each cell's mean over rounds (one round: that round)."""
    names = breakdowns[0]["rows"]
    return {name: {key: sum(b["rows"][name][key] for b in breakdowns) / len(breakdowns) for key, _ in COLUMNS}
            for name in names}


ROW_LABELS = {"ray.init": "`ray.init` (driver)", "driver": "driver, between stages", "round": "**round**"}


def breakdown_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown: per row, each column in seconds and in % of the round."""
    total = rows["round"]["wall"]

    def cell(seconds: float) -> str:
        share = f" ({seconds / total * 100:.1f}%)" if total else ""
        return f"{seconds:.1f} s{share}"

    lines = ["| | " + " | ".join(header for _, header in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in rows.items():
        # "-": a part this row cannot have (ray.init does no I/O; only train saves a checkpoint).
        has = {key for key, _ in COLUMNS if row[key] or name == "round" or (name in STAGES and key != "save")}
        cells = [cell(row[key]) if key in has | {"wall"} else "-" for key, _ in COLUMNS]
        if name == "round":
            cells = [f"**{c}**" for c in cells]
        lines.append(f"| {ROW_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the section -----------------------------------------------------------------

def outside_work(row: dict[str, float]) -> str:
    """A round row's seconds outside the work itself (start-up, Ray, I/O, save), and their share."""
    seconds = row["wall"] - row["work"]
    return f"{seconds:.1f} s ({seconds / row['wall'] * 100:.1f}%)" if row["wall"] else f"{seconds:.1f} s"


def comparison_table(results: dict[str, Any]) -> str:
    """Markdown: per round and for the whole run, wall time and the part outside the work, per path."""
    paths = [("this path", results)] + ([("old path", results["old_path"])] if "old_path" in results else [])
    header = "| round | " + " | ".join(f"{name}: wall | {name}: outside the work" for name, _ in paths) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(paths)]
    # Round 0 (evaluate only) is where kept engines start: left out, they would look free.
    by_round = [{**({0: path["round_0"]} if path.get("round_0") else {}), **{b["round"]: b["rows"]["round"]
                                                                           for b in path["rounds"]}}
                for _, path in paths]
    for number in sorted(set().union(*by_round)):
        cells = [f"{rows[number]['wall']:.1f} s | {outside_work(rows[number])}" if number in rows else "- | -"
                 for rows in by_round]
        lines.append(f"| {number if number else '0 (base model, evaluate only)'} | " + " | ".join(cells) + " |")
    totals = []
    for rows in by_round:
        total = {key: sum(row[key] for row in rows.values()) for key in ("wall", "work")}
        totals.append(f"**{total['wall']:.1f} s** | **{outside_work(total)}**")
    lines.append("| **all** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def settings_sentence(config: dict[str, Any]) -> str:
    """What the round did, from the run's resolved config.yaml."""
    if not config:
        return ""
    def get(section: str, key: str) -> Any:
        return config.get(section, {}).get(key)

    return (f"Model `{get('model', 'name')}`, {get('prompts', 'per_round')} prompts x {get('generate', 'num_samples')} "
            f"samples x up to {get('generate', 'max_tokens')} new tokens, objective `{get('train', 'objective')}`, "
            f"{get('train', 'num_workers')} Ray Train worker(s), {get('generate', 'num_actors')} generation actor(s), "
            f"{get('prompts', 'eval_size')} held-out prompts. ")


def left_out_sentence(left_out: list[int]) -> str:
    """Which rounds of the run the table leaves out, and why; "" when none."""
    if not left_out:
        return ""
    if len(left_out) == 1:
        return (f"Round {left_out[0]} is left out: it ran, at least in part, before the per-stage timings were "
                "recorded. ")
    return (f"Rounds {', '.join(map(str, left_out))} are left out: they ran, at least in part, before the per-stage "
            "timings were recorded. ")


def round_section(results: dict[str, Any]) -> str:
    rounds = [b["round"] for b in results["rounds"]]
    which = f"round {rounds[0]}" if len(rounds) == 1 else f"the mean of rounds {', '.join(map(str, rounds))}"
    lines = [
        "## Where a round's time goes (`make bench-round`)",
        "",
        f"Machine: {machine_line(results['machine'], results['versions'])}. "
        f"Run `{results['run']}`, {which}. " + left_out_sentence(results.get("left_out", []))
        + settings_sentence(results.get("config", {})) + f"Raw numbers: `{results['json']}`.",
        "",
        breakdown_table(results["rows"]),
        "",
        ("Measured inside the process that does each part (`core/timing.py`): start-up is imports and model "
         "or engine load in the Ray actor, task or Ray Train worker; Parquet I/O the stage's shard reads and "
         "writes; work the sampling, scoring, reference log-probs and training steps; checkpoint save the trained "
         "policy's. Ray & orchestration is the rest of each stage's wall time (actor and worker processes, their "
         "runtime envs, Ray Train's worker group, scheduling, moving data between processes), plus `ray.init` and "
         "the driver's time between stages."),
    ]
    notes = []
    if any(row["ray"] < 0 for row in results["rows"].values()):
        notes.append("A negative Ray & orchestration share means measured parts overlapped (with several actors "
                     "the driver writes one actor's shard while another still samples) or, in the driver row, "
                     "that the round was resumed: its earlier stages ran under another command.")
    baseline = [b["baseline_seconds"] for b in results["rounds"] if b.get("baseline_seconds")]
    if baseline:
        notes.append(f"The evaluate stage includes {sum(baseline) / len(results['rounds']):.1f} s "
                     f"{'per round ' if len(results['rounds']) > 1 else ''}of evaluating round 0 (the base "
                     "model's held-out answers), done once per run by its first round.")
    if results.get("process_seconds") is not None:
        # Every round the command ran, round 0 included (its own stage, timed apart from round 1).
        rounds = sum(b["rows"]["round"]["wall"] for b in results["rounds"]) + \
            float((results.get("round_0") or {}).get("wall", 0.0))
        plural = "s" if len(results["rounds"]) > 1 else ""
        notes.append(f"The `{results['command']}` command took {results['process_seconds']:.1f} s in all; the "
                     f"{results['process_seconds'] - rounds:.1f} s outside the round{plural} are Python's start-up "
                     "and imports, planning (tokenizer, prompts, checks) and Ray's shutdown.")
    if notes:
        lines += ["", " ".join(notes)]
    if "old_path" in results:
        old = results["old_path"]
        lines += ["", f"### Side by side with the old path (`{old['run']}`)", "",
                  f"The same rounds, one after the other on this machine: the old path ({', '.join(f'`{o}`' for o in OLD_PATH)}: "
                  "every generate and evaluate stage starts its own vLLM engine, and the reference is a stage of "
                  "its own with its own model load) ran first. Outside the work is start-up, Ray and "
                  "orchestration, Parquet I/O and checkpoint saves: everything but sampling, scoring, reference "
                  "log-probs and training steps.", "", comparison_table(results)]
    return "\n".join(lines) + "\n"


# --- reading and running ---------------------------------------------------------

def read_rounds(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], list[int]]:
    """The breakdown of every finished round (1 and later) of a run that has the timings, the last such
    round's resolved config, and the numbers of the finished rounds left out for predating the timings."""
    import yaml

    from pipeline.report import read_run

    metrics = [m for m, _ in read_run(run_dir) if m.get("round", 0) >= 1]
    if not metrics:
        raise PipelineError(f"{run_dir} has no finished round after round 0")
    breakdowns, left_out = [], []
    for m in metrics:
        try:
            breakdowns.append(round_breakdown(m))
        except PipelineError:  # recorded before the per-stage timings existed
            left_out.append(m.get("round"))
    if not breakdowns:
        raise PipelineError(f"no finished round of {run_dir} has per-stage timings: each ran, at least in part, "
                            "before they were recorded")
    config_path = run_dir / f"round_{breakdowns[-1]['round']:03d}" / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return breakdowns, config, left_out


def run_round(args: argparse.Namespace, name: str, path_overrides: tuple[str, ...] = ()) -> tuple[Path, float, str]:
    """Run rounds 1..args.rounds as the fresh run `name`; (its run directory, the command's wall
    seconds, the command)."""
    run_dir = output_root(args) / name
    if run_dir.exists():
        if not (run_dir / MARKER).is_file():
            raise PipelineError(f"{run_dir} exists and was not made by this benchmark (no {MARKER} file); "
                                "pass another --run or remove it yourself")
        print(f"removing the benchmark's previous run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("made by bench/round_breakdown.py, which removes this run before each round\n")
    command = [sys.executable, "-m", "pipeline", "rounds", str(args.rounds), "--config", args.config, "--run", name]
    if args.output:
        command += ["--output", args.output]
    command += [*path_overrides, *args.overrides]
    shown = " ".join(["python", *command[1:6], repo_relative(Path(args.config)), *command[7:]])
    print(f"== {shown}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(command, check=False, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise PipelineError(f"the rounds failed (exit status {code}); their log: {run_dir / 'pipeline.log'}")
    return run_dir, seconds, shown


def path_results(run_dir: Path, process_seconds: float | None, command: str | None) -> dict[str, Any]:
    """One run's part of round.json: its rounds' breakdowns and their mean."""
    breakdowns, config, left_out = read_rounds(run_dir)
    return {"run": repo_relative(run_dir), "command": command, "process_seconds": process_seconds, "config": config,
            "rows": mean_rows(breakdowns), "rounds": breakdowns, "left_out": left_out,
            "round_0": round_0_breakdown(run_dir)}


def round_0_breakdown(run_dir: Path) -> dict[str, float] | None:
    """Round 0's one stage (the base model's answers), run by the first round's command: with kept
    engines, it is where they start. None when the run has no timed round 0."""
    path = run_dir / "round_000" / "metrics.json"
    if not path.is_file():
        return None
    return stage_breakdown(json.loads(path.read_text()).get("stages", {}).get("evaluate", {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--run", default="bench-round",
                        help=f"the run the benchmark makes (replaced each time; never a directory without {MARKER})")
    parser.add_argument("--output", help="output root of the run (default: the config's `output`)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds the benchmark's run goes through")
    parser.add_argument("--compare-old", action="store_true",
                        help="first run the same rounds on the old path as <run>-old (" + " ".join(OLD_PATH) + ")")
    parser.add_argument("--from-run", help="only read this run's finished rounds, e.g. runs/default")
    parser.add_argument("--old-from-run", help="with --from-run: the old path's run to read beside it")
    parser.add_argument("--results", default=str(RESULTS_MD), help="markdown file whose `round` section is written")
    parser.add_argument("--json", default=str(ROUND_JSON), help="where the raw numbers go")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the round")
    args = parser.parse_intermixed_args(argv)
    args.config = str(Path(args.config).resolve())
    try:
        old = None
        if args.from_run:
            new = (Path(args.from_run).resolve(), None, None)
            if args.old_from_run:
                old = (Path(args.old_from_run).resolve(), None, None)
        else:
            # The old path first: a machine that warms up (page cache, CPU clocks) favours the second run.
            if args.compare_old:
                old = run_round(args, f"{args.run}-old", OLD_PATH)
            new = run_round(args, args.run)
        results = {**path_results(*new), "json": repo_relative(Path(args.json)), "machine": machine(),
                   "versions": versions()}
        if old:
            results["old_path"] = path_results(*old)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    section = round_section(results)
    replace_section(Path(args.results), "round", section)
    print(section)
    print(f"wrote {args.json} and the `round` section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
