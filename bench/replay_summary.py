"""The replay ablation's section (`make experiment-replay`, the paper's Table 4, small).

The default config (`train.replay: none`) against the same with earlier rounds'
lists trained on again: strict pass rate differences seed by seed paired by
prompt (bench/experiment_tables.py), and what the replayed lists cost.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.experiment_store import DEFAULT_METHOD, METHODS, REPLAY_METHODS, machine_kind as kind_of, stored_machine
from bench.experiment_tables import Results, RoundResult, between_methods, interval_text, load, points, \
    results_table, seeds_text, verdict_word

# The ablation's baseline, the default with no replay: a seed's `contrastive` run, or its `replay-none`
# run where that one ran on the replay run's kind of machine with its code and `contrastive` did not.
NONE_METHODS = (DEFAULT_METHOD, "replay-none")
REPLAYING = tuple(m for m in REPLAY_METHODS if m not in NONE_METHODS)
NONE = "none"  # the key of the matched baseline runs in paired_with_none's results


def replay_section(store: Path, seeds: list[int]) -> list[str]:
    """The replay ablation (`make experiment-replay`): its table and each replay against none, by round."""
    results = load(store, list(REPLAY_METHODS), seeds)
    if not any(method in results for method in REPLAYING):
        return []
    shared = METHODS["replay-all"].same_as[0][1]
    lines = ["", "### Replaying earlier rounds' lists (`train.replay`, the paper's Table 4)", "",
             "The default config (`train.replay: none`) against the same with round N-1's lists (`previous`) "
             "or every earlier round's (`all`) trained on again, same seeds. Differences: paired bootstrap "
             "over the held-out prompts, seeds averaged per prompt. With one earlier round, `all` replays what "
             "`previous` does, so a seed's `all` run starts from its `previous` run's rounds "
             f"1-{shared} (bench/experiment.py, `Method.same_as`) and differs from round {shared + 1} on. "
             "A seed's runs are compared only when they ran on one kind of machine (their machine.json) and "
             "with the same code (metrics.json's `code`). "
             "Round 1 replays nothing, so there the two runs compute the same thing: on one kind of machine "
             "they agree prompt by prompt (the round 1 lines below); across kinds (bf16 with AMX or with "
             "AVX512_BF16 alone, float32 on AVX2) the base model's answers already differ and the runs drift "
             "apart (\"not compared\", below). Where a seed's `contrastive` run ran on another kind or other "
             "code, its none is a `replay-none` run: the default again, on the replay run's kind of machine "
             "and code. Each "
             "interval holds the trained runs fixed, as above; the seeds' own differences after it show how "
             "far another run may land.", ""]
    last = max((n for by_seed in results.values() for rounds in by_seed.values() for n in rounds), default=0)
    for method in REPLAYING:
        paired, left_out = paired_with_none(results, store, method)
        for number in range(1, last + 1):
            found = between_methods(paired, method, NONE, number, "pass_rate")
            if found:
                interval, count = found
                what = "; nothing to replay yet, the same computation" if number == 1 else ""
                lines.append(f"- {METHODS[method].short} minus none, round {number} ({seeds_text(count)}{what}): "
                             f"strict pass rate {interval_text(interval)} points: {verdict_word(interval)}"
                             + seed_by_seed(paired, method, number))
        if left_out:
            lines.append(f"- {METHODS[method].short}: seed {', '.join(map(str, left_out))} left out, "
                         "no run of none on its kind of machine with its code")
    lines += same_computation_lines(results, store) + cross_machine_lines(results, store)
    shown = [m for m in REPLAY_METHODS if m in results or m != "replay-none"]  # replay-none: a row once run
    return lines + ["", results_table(results, shown), *replay_cost_lines(results, store)]


def seed_by_seed(paired: Results, method: str, number: int) -> str:
    """Each seed's own difference at a round, where more than one seed is pooled: how far apart the seeds land."""
    differences = [found for seed in sorted(paired[method]) if (found := seed_difference(paired, method, seed, number))]
    return f" (seed by seed {', '.join(differences)})" if len(differences) > 1 else ""


def seed_difference(paired: Results, method: str, seed: int, number: int) -> str | None:
    """One seed's strict pass rate difference against its none at a round, in points; None if either lacks it."""
    one = {m: {seed: paired[m][seed]} for m in (method, NONE)}
    found = between_methods(one, method, NONE, number, "pass_rate")
    return points(found[0].difference) if found else None


def code_line(rounds: dict[int, RoundResult]) -> str:
    """The commit that trained a run's first round (metrics.json's `code`); "" from before it was recorded.
    A replay run and its none compare only on the same code: a change of the trainer moves both."""
    first = rounds.get(1)
    return ((first.metrics.get("code") or {}).get("commit") or "") if first else ""


def machine_kind(store: Path, method: str, seed: int) -> tuple | None:
    """The kind of machine a stored (method, seed) ran on (bench/experiment.py); None if not recorded."""
    return kind_of(stored_machine(store, method, seed))


def paired_with_none(results: Results, store: Path, method: str) -> tuple[Results, list[int]]:
    """A replay method's seeds beside the none run (under NONE) that ran on the same kind of machine with the
    same code (code_line); and the seeds that have none such. A seed's run unknown to machine.json is not
    known to match any."""
    ours: dict[int, dict[int, RoundResult]] = {}
    none: dict[int, dict[int, RoundResult]] = {}
    left_out = []
    for seed, rounds in sorted(results.get(method, {}).items()):
        kind, code = machine_kind(store, method, seed), code_line(results[method][seed])
        match = next((m for m in NONE_METHODS if seed in results.get(m, {})
                      and kind is not None and machine_kind(store, m, seed) == kind
                      and code_line(results[m][seed]) == code), None)
        if match is None:
            left_out.append(seed)
            continue
        ours[seed], none[seed] = rounds, results[match][seed]
    return {method: ours, NONE: none}, left_out


def same_computation_lines(results: Results, store: Path) -> list[str]:
    """Up to round `shared`, replay-all computes what replay-previous does. A seed that ran the two on different
    kinds of machine, each beside a none of its own kind, shows how far the machine alone moves a difference:
    the run-to-run spread that the prompt bootstrap, holding the runs fixed, leaves out."""
    shared = METHODS["replay-all"].same_as[0][1]
    methods = ("replay-previous", "replay-all")
    paired = {method: paired_with_none(results, store, method)[0] for method in methods}
    lines = []
    for seed in sorted(set(paired[methods[0]][methods[0]]) & set(paired[methods[1]][methods[1]])):
        kinds = [machine_kind(store, method, seed) for method in methods]
        found = [seed_difference(paired[method], method, seed, shared) for method in methods]
        if kinds[0] != kinds[1] and all(found):
            lines.append(f"- round {shared}, the same computation in replay previous and replay all: seed {seed} "
                         f"ran them on two kinds of machine ({kind_label(kinds[0])}; {kind_label(kinds[1])}), each "
                         f"beside a none of its own kind, and they differ from it by {found[0]} and {found[1]} points")
    return lines


def cross_machine_lines(results: Results, store: Path) -> list[str]:
    """Round 1 of a replay run against a none run of the same seed on another kind of machine: the same
    computation, so how far apart they land is how far the machine alone moves a run."""
    lines = []
    for method in REPLAYING:
        for seed, rounds in sorted(results.get(method, {}).items()):
            kind = machine_kind(store, method, seed)
            for none in NONE_METHODS:
                theirs = results.get(none, {}).get(seed, {})
                other = machine_kind(store, none, seed)
                if 1 in rounds and 1 in theirs and kind and other and other != kind:
                    lines.append(f"- not compared: seed {seed} of {METHODS[method].short} ({kind_label(kind)}) "
                                 f"against its `{none}` run ({kind_label(other)}): at round 1, the same computation, "
                                 f"they pass {pass_rate(rounds[1]):.3f} and {pass_rate(theirs[1]):.3f}")
    return lines


def kind_label(kind: tuple) -> str:
    """A machine kind in words: its CPU and the widest bf16 support among its SIMD flags, which is what
    sets the numerics (two AMD EPYC kinds differ by AVX512_BF16 alone)."""
    cpu, simd, _ = kind
    widest = "AMX" if "amx_bf16" in simd else "AVX512_BF16" if "avx512_bf16" in simd else "AVX2"
    return f"{cpu}, {widest}"


def pass_rate(result: RoundResult) -> float:
    return sum(result.passed.values()) / len(result.passed) if result.passed else float("nan")


def replay_cost_lines(results: Results, store: Path) -> list[str]:
    """What replay costs: lists trained, reference and train seconds per round, against none on the same seeds.

    Only the seeds whose none ran on the same kind of machine count (paired_with_none): a pair split
    across an AVX2 and an AMX machine would time the CPUs, not replay."""
    def mean_of(paired: Results, method: str, number: int, key: Callable[[dict[str, Any]], float]) -> float | None:
        try:
            values = [key(rounds[number].metrics.get("stages", {})) for rounds in paired[method].values()]
        except (KeyError, TypeError):  # a round stored before replay was counted
            return None
        return sum(values) / len(values) if values else None

    def lists(stages: dict[str, Any]) -> float:
        return stages["reference"]["lists_current"] + stages["reference"]["lists_replayed"]

    keys = (lists, lambda s: s["reference"]["wall_seconds"], lambda s: s["train"]["train_seconds"])
    lines = []
    for method in REPLAYING:
        full, _ = paired_with_none(results, store, method)
        for number in sorted({n for r in full[method].values() for n in r if n > 0}):
            seeds = [s for s, r in full[method].items() if number in r and number in full[NONE][s]]
            paired = {m: {s: full[m][s] for s in seeds} for m in (method, NONE)}
            cells = [(mean_of(paired, method, number, key), mean_of(paired, NONE, number, key)) for key in keys]
            if not seeds or all(ours is None for ours, _ in cells):  # no seed of none beside it, or nothing counted
                continue
            lines.append(f"| {METHODS[method].short} | {number} | {len(seeds)} | "
                         + " | ".join(cost_cell(ours, none) for ours, none in cells) + " |")
    if not lines:
        return []
    return ["", "What replay costs (means over the seeds compared above; wall time, which other load on the "
            "machine also moves; the reference stage rescored the replayed lists under the round's "
            "reference). Round 1 has nothing to replay, so both runs do the same work there: how far its "
            "seconds stray from 1.00x is how far other load alone moved them.", "",
            "| method | round | seeds | lists trained, against none | reference seconds | train seconds |",
            "|---|---:|---:|---:|---:|---:|", *lines]


def cost_cell(ours: float | None, none: float | None) -> str:
    text = " against ".join("-" if v is None else f"{v:.0f}" for v in (ours, none))
    return text + (f" ({ours / none:.2f}x)" if ours is not None and none else "")
