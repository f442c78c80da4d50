"""The replay ablation's section of docs/results.md (bench/replay_summary.py), from stored runs."""

import json
from pathlib import Path

from bench.experiment import main, seed_dir
from bench.experiment_summary import summarize
from tests.test_experiment import store, table_rows, write_machine, write_seed  # noqa: F401 (store: a fixture)


def test_the_replay_ablation_gets_its_own_table_and_verdicts(tmp_path):
    root = tmp_path / "experiments"
    for seed in (0, 1, 2):
        write_seed(root, "contrastive", seed, [0.4, 0.5, 0.6])
        write_seed(root, "replay-previous", seed, [0.4, 0.5, 0.6])  # the same answers: no difference
        write_seed(root, "replay-all", seed, [0.4, 0.7, 0.9])
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0, 1, 2], results_md)
    text = results_md.read_text()
    assert "### Replaying earlier rounds' lists" in text
    assert "- replay previous minus none, round 3 (3 seeds): strict pass rate +0.0 [+0.0, +0.0] points: " \
           "not distinguishable" in text
    assert "- replay all minus none, round 3 (3 seeds): strict pass rate +30.0 [" in text
    assert "points: better (seed by seed +30.0, +30.0, +30.0)\n" in text
    # Round 1 replays nothing: the same computation, shown as the check it is.
    assert "- replay all minus none, round 1 (3 seeds; nothing to replay yet, the same computation): " \
           "strict pass rate +0.0 [+0.0, +0.0] points: not distinguishable" in text
    assert "| LarPO contrastive + rounds 1..N-1's lists | 3 | 3 |" in text
    assert "the same computation in replay previous and replay all" not in text  # one kind of machine throughout


def add_training_stats(directory: Path, lists_by_round: dict[int, tuple[int, int]], seconds_per_list: float) -> None:
    """Give a stored seed's rounds the reference and train stage numbers a real round writes."""
    for number, (current, replayed) in lists_by_round.items():
        path = directory / f"round_{number:03d}" / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["stages"]["reference"] = {"lists_current": current, "lists_replayed": replayed,
                                          "wall_seconds": 0.1 * seconds_per_list * (current + replayed)}
        metrics["stages"]["train"] = {"train_seconds": seconds_per_list * (current + replayed)}
        path.write_text(json.dumps(metrics))


def test_the_replay_ablation_says_what_replay_costs_on_the_seeds_both_ran(tmp_path):
    root = tmp_path / "experiments"
    for seed in (0, 1):
        none = write_seed(root, "contrastive", seed, [0.4, 0.5, 0.6])
        add_training_stats(none, {1: (100, 0), 2: (100, 0), 3: (100, 0)}, 2.0)
        replay = write_seed(root, "replay-all", seed, [0.4, 0.5, 0.6])
        add_training_stats(replay, {1: (100, 0), 2: (100, 100), 3: (100, 200)}, 2.0 + 5 * seed)
    # Seed 1's replay ran on another kind of machine than its contrastive run: a `replay-none` run
    # on that kind is its none, not the contrastive run that would time the CPUs.
    write_machine(seed_dir(root, "replay-all", 1), "AMD EPYC", ["avx2"])
    again = write_seed(root, "replay-none", 1, [0.4, 0.5, 0.6])
    write_machine(again, "AMD EPYC", ["avx2"])
    add_training_stats(again, {1: (100, 0), 2: (100, 0), 3: (100, 0)}, 7.0)
    # A seed of replay without one of none beside it is left out of the means.
    add_training_stats(write_seed(root, "replay-all", 2, [0.4, 0.5, 0.6]), {3: (100, 900)}, 9.0)
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0, 1, 2], results_md)
    text = results_md.read_text().split("What replay costs")[1]
    # Seed 0 against its contrastive run (2 s a list), seed 1 against its replay-none run (7 s a list).
    assert "| replay all | 2 | 2 | 200 against 100 (2.00x) | 90 against 45 (2.00x) | 900 against 450 (2.00x) |" \
        in text
    assert "| replay all | 3 | 2 | 300 against 100 (3.00x) | 135 against 45 (3.00x) | 1350 against 450 (3.00x) |" \
        in text
    assert "replay previous" not in text  # not run: no rows


def test_runs_on_two_kinds_of_machine_are_not_compared(tmp_path):
    root = tmp_path / "experiments"
    write_seed(root, "contrastive", 0, [0.4, 0.5, 0.6])
    write_seed(root, "replay-previous", 0, [0.4, 0.5, 0.6])
    write_seed(root, "contrastive", 1, [0.3, 0.5, 0.6])
    write_machine(write_seed(root, "replay-previous", 1, [0.6, 0.5, 0.6]), "AMD EPYC", ["avx2"])
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0, 1], results_md)
    text = results_md.read_text().split("### Replaying")[1]
    # Seed 1 is left out of every comparison: seed 0 alone, which agrees with none at every round.
    assert "- replay previous minus none, round 3 (1 seed): strict pass rate +0.0 [+0.0, +0.0] points" in text
    assert "- replay previous: seed 1 left out, no run of none on its kind of machine" in text
    assert "- not compared: seed 1 of replay previous (AMD EPYC, AVX2) against its `contrastive` run " \
           "(Intel Xeon, AMX): at round 1, the same computation, they pass 0.600 and 0.300" in text
    assert "What replay costs" not in text  # no pair has the stage numbers


def test_two_kinds_with_one_cpu_name_are_told_apart(tmp_path):
    # Two AMD EPYC kinds, one with native bf16 (AVX512_BF16) and one without: not one kind.
    root = tmp_path / "experiments"
    write_seed(root, "contrastive", 0, [0.3, 0.5])  # on the Intel Xeon with AMX
    write_machine(write_seed(root, "replay-none", 0, [0.3, 0.5]), "AMD EPYC", ["avx2"])
    write_machine(write_seed(root, "replay-all", 0, [0.6, 0.5]), "AMD EPYC", ["avx2", "avx512f", "avx512_bf16"])
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0], results_md)
    text = results_md.read_text().split("### Replaying")[1]
    assert "- replay all: seed 0 left out, no run of none on its kind of machine" in text
    assert "- not compared: seed 0 of replay all (AMD EPYC, AVX512_BF16) against its `replay-none` run " \
           "(AMD EPYC, AVX2): at round 1, the same computation, they pass 0.600 and 0.300" in text


def test_one_computation_on_two_kinds_of_machine_shows_the_machines_spread(tmp_path):
    # Round 2 of replay-all is replay-previous's round 2: here on two kinds, each beside its own none.
    root = tmp_path / "experiments"
    write_seed(root, "contrastive", 0, [0.4, 0.5])
    write_seed(root, "replay-previous", 0, [0.4, 0.6])
    epyc = ("AMD EPYC", ["avx2"])
    write_machine(write_seed(root, "replay-none", 0, [0.3, 0.5]), *epyc)
    write_machine(write_seed(root, "replay-all", 0, [0.3, 0.4]), *epyc)
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0], results_md)
    text = results_md.read_text().split("### Replaying")[1]
    assert "- round 2, the same computation in replay previous and replay all: seed 0 ran them on two kinds " \
           "of machine (Intel Xeon, AMX; AMD EPYC, AVX2), each beside a none of its own kind, and they differ " \
           "from it by +10.0 and -10.0 points\n" in text


def test_a_run_without_machine_json_is_not_known_to_match(tmp_path):
    root = tmp_path / "experiments"
    write_seed(root, "contrastive", 0, [0.4, 0.5])
    replay = write_seed(root, "replay-previous", 0, [0.4, 0.5])
    (replay / "machine.json").unlink()
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0], results_md)
    text = results_md.read_text().split("### Replaying")[1]
    assert "- replay previous: seed 0 left out" in text and "minus none" not in text


def test_rounds_stored_before_replay_was_counted_get_no_cost_rows(tmp_path):
    root = tmp_path / "experiments"
    write_seed(root, "contrastive", 0, [0.4, 0.5])
    write_seed(root, "replay-previous", 0, [0.4, 0.5])
    results_md = tmp_path / "results.md"
    summarize(root, ["contrastive"], [0], results_md)
    assert "### Replaying earlier rounds' lists" in results_md.read_text()
    assert "What replay costs" not in results_md.read_text()


def test_the_replay_ablation_leaves_the_main_table_whole(store, tmp_path):
    for seed in (0, 1, 2):
        write_seed(store, "replay-all", seed, [0.4, 0.7, 0.9])
    results_md = tmp_path / "results.md"
    # As `make experiment-replay` calls it: only the ablation's methods named.
    assert main(["--summarize-only", "--methods", "contrastive,replay-previous,replay-all",
                 "--store", str(store), "--results", str(results_md)]) == 0
    text = results_md.read_text()
    rows = table_rows(text.split("### Replaying")[0])
    assert ("iterative DPO (K=2, best vs worst)", "3") in rows and ("LarPO ListMLE (top-2 vs bottom-2)", "3") in rows
    assert text.count("| LarPO contrastive + rounds 1..N-1's lists | 3 |") == 1
