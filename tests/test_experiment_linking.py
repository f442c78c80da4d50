"""Runs that share their first rounds with another method's (`Method.same_as`): linked, not run again."""

import subprocess
from pathlib import Path

from bench import experiment
from bench.experiment import main, stored_rounds
from tests.test_experiment import pattern, write_round, write_seed


def finished_run(run: Path, rounds: int) -> None:
    """A run directory whose rounds 0..rounds have finished: every stage's marker, metrics and eval."""
    from core.layout import RoundLayout

    for number in range(rounds + 1):
        layout = RoundLayout(run / f"round_{number:03d}", number)
        write_round(layout.dir, number, pattern(0.5))
        for stage in layout.stages:
            layout.done_marker(stage).parent.mkdir(parents=True, exist_ok=True)
            layout.done_marker(stage).write_text("{}")
        if number:
            (layout.dir / "policy").mkdir()
            (layout.dir / "policy" / "model.safetensors").write_bytes(bytes([number]) * 8)


def run_replay_all(tmp_path: Path, monkeypatch) -> list[list[str]]:
    """`--methods replay-all --rounds 3` with the pipeline faked: it finishes the rounds the run lacks."""
    calls = []

    def fake_pipeline(command, **kwargs):
        calls.append(command)
        run = Path(command[command.index("--output") + 1]) / command[command.index("--run") + 1]
        for number in range(4):
            if not (run / f"round_{number:03d}").exists():
                write_round(run / f"round_{number:03d}", number, pattern(0.6))
        (run / "config.yaml").write_text("seed: 0\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(experiment.subprocess, "run", fake_pipeline)
    write_seed(tmp_path / "store", "contrastive", 0, [0.5, 0.5, 0.5, 0.5])  # something to summarise
    assert main(["--store", str(tmp_path / "store"), "--methods", "replay-all", "--seeds", "0", "--rounds", "3",
                 "--output", str(tmp_path / "runs"), "--results", str(tmp_path / "r.md")]) == 0
    return calls


def test_replay_all_starts_from_replay_previous_rounds_1_and_2(tmp_path, monkeypatch, capsys):
    previous, replay_all = tmp_path / "runs" / "experiment-replay-previous-seed0", \
        tmp_path / "runs" / "experiment-replay-all-seed0"
    finished_run(previous, 3)
    calls = run_replay_all(tmp_path, monkeypatch)
    assert len(calls) == 1 and "train.replay=all" in calls[0]
    for name in ("round_000", "round_001", "round_002"):
        for path in (previous / name).rglob("*"):
            twin = replay_all / path.relative_to(previous)
            assert twin.exists() and (path.is_dir() or twin.read_bytes() == path.read_bytes()), twin
    # Round 3 is replay-all's own: replaying rounds 1 and 2 is not what `previous` computed.
    assert (replay_all / "round_003" / "eval").is_dir() and not (replay_all / "round_003" / "_done").exists()
    assert (replay_all / "round_002" / "policy" / "model.safetensors").read_bytes() == bytes([2]) * 8
    assert not list(replay_all.glob(".*"))  # no linking left half-done
    assert "rounds 0..2 linked from" in capsys.readouterr().out
    assert stored_rounds(tmp_path / "store", "replay-all", 0) == {0, 1, 2, 3}


def test_a_run_with_a_shared_round_of_its_own_is_not_linked_over(tmp_path, monkeypatch):
    previous, replay_all = tmp_path / "runs" / "experiment-replay-previous-seed0", \
        tmp_path / "runs" / "experiment-replay-all-seed0"
    finished_run(previous, 3)
    write_round(replay_all / "round_001", 1, pattern(0.9))  # its own round 1, begun before
    own = (replay_all / "round_001" / "metrics.json").read_bytes()
    run_replay_all(tmp_path, monkeypatch)
    assert (replay_all / "round_001" / "metrics.json").read_bytes() == own
    assert not (replay_all / "round_002" / "_done").exists()  # computed by its own run, not linked


def test_nothing_is_linked_from_a_run_that_has_not_finished_the_shared_rounds(tmp_path, monkeypatch):
    previous, replay_all = tmp_path / "runs" / "experiment-replay-previous-seed0", \
        tmp_path / "runs" / "experiment-replay-all-seed0"
    finished_run(previous, 2)
    (previous / "round_002" / "_done" / "train").unlink()  # round 2 stopped before its train stage finished
    calls = run_replay_all(tmp_path, monkeypatch)
    assert len(calls) == 1
    assert not (replay_all / "round_001" / "_done").exists() and not (replay_all / "round_001" / "policy").exists()


def test_replay_previous_unfinished_round_1_comes_from_a_run_with_no_replay(tmp_path, monkeypatch, capsys):
    # replay-previous has not finished round 2, the longest share; round 1 has nothing to replay.
    previous, none, replay_all = (tmp_path / "runs" / f"experiment-{m}-seed0"
                                  for m in ("replay-previous", "replay-none", "replay-all"))
    finished_run(previous, 1)
    finished_run(none, 3)
    calls = run_replay_all(tmp_path, monkeypatch)
    assert len(calls) == 1
    assert "rounds 0..1 linked from " + str(none) in capsys.readouterr().out
    assert (replay_all / "round_001" / "policy" / "model.safetensors").samefile(
        none / "round_001" / "policy" / "model.safetensors")
    assert not (replay_all / "round_002" / "policy").exists()  # round 2 replays round 1: its own


def test_round_1_is_linked_from_the_default_when_no_replay_run_has_it(tmp_path, monkeypatch, capsys):
    none, replay_all = tmp_path / "runs" / "experiment-contrastive-seed0", \
        tmp_path / "runs" / "experiment-replay-all-seed0"
    finished_run(none, 3)
    run_replay_all(tmp_path, monkeypatch)
    assert "rounds 0..1 linked from " + str(none) in capsys.readouterr().out
    assert (replay_all / "round_001" / "policy" / "model.safetensors").samefile(
        none / "round_001" / "policy" / "model.safetensors")
    assert not (replay_all / "round_002" / "policy").exists()


def run_replay_none(tmp_path: Path, monkeypatch, here: dict) -> list[list[str]]:
    """`--methods replay-none --rounds 3` on a machine described by `here`, with the pipeline faked."""
    import bench.generate_bench

    calls = []

    def fake_pipeline(command, **kwargs):
        calls.append(command)
        run = Path(command[command.index("--output") + 1]) / command[command.index("--run") + 1]
        for number in range(4):
            write_round(run / f"round_{number:03d}", number, pattern(0.6))
        (run / "config.yaml").write_text("seed: 0\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(experiment.subprocess, "run", fake_pipeline)
    monkeypatch.setattr(bench.generate_bench, "machine", lambda: here)
    assert main(["--store", str(tmp_path / "store"), "--methods", "replay-none", "--seeds", "0", "--rounds", "3",
                 "--output", str(tmp_path / "runs"), "--results", str(tmp_path / "r.md")]) == 0
    return calls


XEON = {"cpu": "Intel Xeon", "simd": ["avx2", "amx_bf16"], "cores": 2, "gpu": None, "memory_gib": 23.5,
        "python": "3.11.7"}


def test_replay_none_is_skipped_where_the_default_run_ran_on_this_kind_of_machine(tmp_path, monkeypatch, capsys):
    write_seed(tmp_path / "store", "contrastive", 0, [0.5, 0.5, 0.5])  # its machine.json: the Xeon
    assert run_replay_none(tmp_path, monkeypatch, XEON) == []
    assert "the stored contrastive run ran on this kind of machine" in capsys.readouterr().out
    assert stored_rounds(tmp_path / "store", "replay-none", 0) == set()


def test_replay_none_runs_on_another_kind_of_machine(tmp_path, monkeypatch):
    write_seed(tmp_path / "store", "contrastive", 0, [0.5, 0.5, 0.5])
    epyc = {**XEON, "cpu": "AMD EPYC", "simd": ["avx2"]}
    calls = run_replay_none(tmp_path, monkeypatch, epyc)
    assert len(calls) == 1 and "train.replay=none" in calls[0]
    assert stored_rounds(tmp_path / "store", "replay-none", 0) == {0, 1, 2, 3}
    assert experiment.machine_kind(experiment.stored_machine(tmp_path / "store", "replay-none", 0)) == \
        ("AMD EPYC", ("avx2",), 2)
