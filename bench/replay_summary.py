"""The replay ablation's section (`make experiment-replay`, the paper's Table 4, small).

The default config (`train.replay: none`) against the same with earlier rounds'
lists trained on again: strict pass rate differences seed by seed paired by
prompt (bench/experiment_tables.py), and what the replayed lists cost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.experiment import DEFAULT_METHOD, METHODS, REPLAY_METHODS, seed_dir
from bench.experiment_tables import Results, between_methods, interval_text, load, results_table, seeds_text, \
    verdict_word


def replay_section(store: Path, seeds: list[int]) -> list[str]:
    """The replay ablation (`make experiment-replay`): its table and each replay against none, by round."""
    results = load(store, list(REPLAY_METHODS), seeds)
    if not any(method in results for method in REPLAY_METHODS[1:]):
        return []
    shared = METHODS["replay-all"].same_as[1]
    lines = ["", "### Replaying earlier rounds' lists (`train.replay`, the paper's Table 4)", "",
             "The default config (`train.replay: none`) against the same with round N-1's lists (`previous`) "
             "or every earlier round's (`all`) trained on again, same seeds. Differences: paired bootstrap "
             "over the held-out prompts, seeds averaged per prompt. With one earlier round, `all` replays what "
             "`previous` does, so a seed's `all` run starts from its `previous` run's rounds "
             f"1-{shared} (bench/experiment.py, `Method.same_as`) and differs from round {shared + 1} on.", ""]
    last = max((n for by_seed in results.values() for rounds in by_seed.values() for n in rounds), default=0)
    for method in REPLAY_METHODS[1:]:
        for number in range(2, last + 1):  # round 1 has nothing earlier to replay
            found = between_methods(results, method, DEFAULT_METHOD, number, "pass_rate")
            if found:
                interval, count = found
                lines.append(f"- {METHODS[method].short} minus none, round {number} ({seeds_text(count)}): "
                             f"strict pass rate {interval_text(interval)} points: {verdict_word(interval)}")
    return lines + ["", results_table(results, list(REPLAY_METHODS)), *replay_cost_lines(results, store)]


def machine_kind(store: Path, method: str, seed: int) -> tuple | None:
    """The CPU, its SIMD and its cores that a stored (method, seed) ran on (its machine.json); None if not recorded."""
    path = seed_dir(store, method, seed) / "machine.json"
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return found.get("cpu"), tuple(found.get("simd") or ()), found.get("cores")


def same_machine_kind(store: Path, method: str, seed: int) -> bool:
    """Whether a seed's run of `method` and its run of none are known to have run on one kind of machine."""
    ours = machine_kind(store, method, seed)
    return ours is not None and ours == machine_kind(store, DEFAULT_METHOD, seed)


def replay_cost_lines(results: Results, store: Path) -> list[str]:
    """What replay costs: lists trained, reference and train seconds per round, against none on the same seeds.

    Lists count on every seed both ran; seconds only on the seeds whose two runs ran on one kind of
    machine, since a seed's pair split across an AVX2 and an AMX machine times the CPUs, not replay."""
    def mean_of(method: str, number: int, seeds: list[int], key: Callable[[dict[str, Any]], float]) -> float | None:
        try:
            values = [key(results[method][seed][number].metrics.get("stages", {})) for seed in seeds]
        except (KeyError, TypeError):  # a round stored before replay was counted
            return None
        return sum(values) / len(values) if values else None

    def lists(stages: dict[str, Any]) -> float:
        return stages["reference"]["lists_current"] + stages["reference"]["lists_replayed"]

    seconds = (lambda s: s["reference"]["wall_seconds"], lambda s: s["train"]["train_seconds"])
    lines = []
    for method in REPLAY_METHODS[1:]:
        for number in sorted({n for r in results.get(method, {}).values() for n in r if n > 0}):
            seeds = sorted(s for s, r in results[method].items()
                           if number in r and number in results.get(DEFAULT_METHOD, {}).get(s, {}))
            timed = [s for s in seeds if same_machine_kind(store, method, s)]
            cells = [(mean_of(method, number, seeds, lists), mean_of(DEFAULT_METHOD, number, seeds, lists))]
            cells += [(mean_of(method, number, timed, key), mean_of(DEFAULT_METHOD, number, timed, key))
                      for key in seconds]
            if not seeds or all(ours is None for ours, _ in cells):  # no seed of none beside it, or nothing counted
                continue
            lines.append(f"| {METHODS[method].short} | {number} | {len(seeds)} | {len(timed)} | "
                         + " | ".join(cost_cell(ours, none) for ours, none in cells) + " |")
    if not lines:
        return []
    return ["", "What replay costs (means over the seeds both ran; seconds only over the seeds whose two runs "
            "ran on one kind of machine, by their machine.json, and wall time, which other load on the "
            "machine also moves; the reference stage rescored the replayed lists under the round's "
            "reference). Round 1 has nothing to replay, so both runs do the same work there: how far its "
            "seconds stray from 1.00x is how far other load alone moved them.", "",
            "| method | round | seeds | seeds timed on one machine kind | lists trained, against none "
            "| reference seconds | train seconds |",
            "|---|---:|---:|---:|---:|---:|---:|", *lines]


def cost_cell(ours: float | None, none: float | None) -> str:
    text = " against ".join("-" if v is None else f"{v:.0f}" for v in (ours, none))
    return text + (f" ({ours / none:.2f}x)" if ours is not None and none else "")
