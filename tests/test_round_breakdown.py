"""bench/round_breakdown.py on hand-made metrics.json files: the split of each stage, the table, the section."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.round_breakdown import (
    breakdown_table,
    main,
    mean_rows,
    round_breakdown,
    stage_breakdown,
)
from core.errors import PipelineError

# (wall, startup, io, work, save) per stage; the Ray share is what is left of the wall time.
STAGE_TIMES = {
    "generate": (80.0, 20.0, 1.0, 55.0, None),     # ray 4.0
    "rerank": (6.0, 2.0, 0.5, 1.5, None),          # ray 2.0
    "reference": (20.0, 5.0, 0.5, 12.0, None),     # ray 2.5
    "train": (60.0, 6.0, 0.2, 40.0, 3.0),          # ray 10.8
    "evaluate": (28.0, 8.0, 0.3, 15.0, None),      # ray 4.7
}


def metrics(number: int = 1, scale: float = 1.0, **extra) -> dict:
    stages = {}
    for stage, (wall, startup, io, work, save) in STAGE_TIMES.items():
        stats = {"wall_seconds": wall * scale, "startup_seconds": startup * scale, "io_seconds": io * scale,
                 "work_seconds": work * scale, "peak_memory_gib": 3.0}
        if save is not None:
            stats["save_seconds"] = save * scale
        stages[stage] = stats
    stages["generate"]["generate_seconds"] = 75.0 * scale
    # 194 s of stages, 4 s of ray.init and 2 s of the driver between stages.
    return {"round": number, "stages": stages, "stage_seconds": {s: v["wall_seconds"] for s, v in stages.items()},
            "ray_init_seconds": 4.0 * scale, "round_seconds": 200.0 * scale, **extra}


def test_a_stage_is_split_into_its_parts_and_the_ray_remainder():
    row = stage_breakdown(metrics()["stages"]["train"])
    assert row == pytest.approx({"wall": 60.0, "startup": 6.0, "io": 0.2, "save": 3.0, "work": 40.0, "ray": 10.8})
    assert stage_breakdown({"wall_seconds": 5.0, "lists": 3}) is None  # recorded before the timings


def test_every_second_of_the_round_lands_in_one_column():
    rows = round_breakdown(metrics())["rows"]
    assert list(rows) == ["generate", "rerank", "reference", "train", "evaluate", "ray.init", "driver", "round"]
    assert rows["ray.init"] == {"wall": 4.0, "startup": 0.0, "io": 0.0, "save": 0.0, "work": 0.0, "ray": 4.0}
    assert rows["driver"]["wall"] == pytest.approx(2.0) and rows["driver"]["ray"] == pytest.approx(2.0)
    total = rows["round"]
    assert total == pytest.approx({"wall": 200.0, "startup": 41.0, "ray": 30.0, "io": 2.5, "save": 3.0,
                                   "work": 123.5})
    assert sum(total[k] for k in ("startup", "ray", "io", "save", "work")) == pytest.approx(total["wall"])


def test_the_table_gives_seconds_and_shares_of_the_round():
    table = breakdown_table(round_breakdown(metrics())["rows"])
    lines = table.splitlines()
    assert lines[0] == "| | wall | start-up | Ray & orchestration | Parquet I/O | checkpoint save | work |"
    assert "| generate | 80.0 s (40.0%) | 20.0 s (10.0%) | 4.0 s (2.0%) | 1.0 s (0.5%) | - | 55.0 s (27.5%) |" in lines
    assert "| train | 60.0 s (30.0%) | 6.0 s (3.0%) | 10.8 s (5.4%) | 0.2 s (0.1%) | 3.0 s (1.5%) | " \
           "40.0 s (20.0%) |" in lines
    assert "| `ray.init` (driver) | 4.0 s (2.0%) | - | 4.0 s (2.0%) | - | - | - |" in lines
    assert lines[-1] == ("| **round** | **200.0 s (100.0%)** | **41.0 s (20.5%)** | **30.0 s (15.0%)** | "
                         "**2.5 s (1.2%)** | **3.0 s (1.5%)** | **123.5 s (61.8%)** |")


def test_rounds_are_averaged_cell_by_cell():
    rows = mean_rows([round_breakdown(metrics(1)), round_breakdown(metrics(2, scale=2.0))])
    assert rows["round"]["wall"] == pytest.approx(300.0)
    assert rows["train"]["save"] == pytest.approx(4.5)


def test_a_reference_scored_inside_the_train_stage_is_counted_once():
    fused = metrics(1)
    reference = fused["stages"]["reference"]["wall_seconds"]
    fused["stages"]["train"]["wall_seconds"] += reference  # the train stage's wall held the reference's
    fused["stages"]["train"]["reference_seconds_inside"] = reference
    rows = round_breakdown(fused)["rows"]
    plain = round_breakdown(metrics(1))["rows"]
    assert rows["train"] == pytest.approx(plain["train"])
    assert rows["round"] == pytest.approx(plain["round"])


def test_metrics_without_timings_are_refused():
    old = metrics()
    del old["stages"]["rerank"]["io_seconds"]
    with pytest.raises(PipelineError, match="rerank stage has no start-up/io/work timings"):
        round_breakdown(old)
    with pytest.raises(PipelineError, match="ray_init_seconds"):
        round_breakdown({k: v for k, v in metrics().items() if k != "round_seconds"})


def write_run(run: Path, rounds: list[dict]) -> None:
    (run / "round_000").mkdir(parents=True)
    (run / "round_000" / "metrics.json").write_text(json.dumps(
        {"round": 0, "stage_seconds": {"evaluate": 9.0}, "stages": {"evaluate": {"wall_seconds": 9.0}}}))
    for m in rounds:
        round_dir = run / f"round_{m['round']:03d}"
        round_dir.mkdir()
        (round_dir / "metrics.json").write_text(json.dumps(m))
        (round_dir / "config.yaml").write_text(
            "model: {name: embedded:smollm2-135m-instruct}\nprompts: {per_round: 64, eval_size: 64}\n"
            "generate: {num_samples: 4, max_tokens: 128, num_actors: 1}\n"
            "train: {objective: contrastive, num_workers: 1}\n")


def test_from_run_writes_the_round_section_and_the_raw_numbers(tmp_path):
    run = tmp_path / "runs" / "somerun"
    first = metrics(1)
    first["stages"]["evaluate"]["baseline_seconds"] = 9.0
    write_run(run, [first])
    results_md = tmp_path / "results.md"
    results_md.write_text("# Results\n\n<!-- experiment:start -->\nkept\n<!-- experiment:end -->\n\n"
                          "<!-- round:start -->\nold table\n<!-- round:end -->\n\nafter\n")
    out_json = tmp_path / "round.json"
    assert main(["--from-run", str(run), "--results", str(results_md), "--json", str(out_json)]) == 0

    text = results_md.read_text()
    assert "kept" in text and text.rstrip().endswith("after") and "old table" not in text
    section = text[text.index("<!-- round:start -->"):text.index("<!-- round:end -->")]
    assert "## Where a round's time goes (`make bench-round`)" in section
    assert "Machine: " in section and "-core " in section
    assert "round 1." in section and "Model `embedded:smollm2-135m-instruct`, 64 prompts x 4 samples" in section
    assert "| **round** | **200.0 s (100.0%)** |" in section
    assert "includes 9.0 s of evaluating round 0" in section
    assert "command took" not in section  # nothing was run, so no process time

    raw = json.loads(out_json.read_text())
    assert raw["process_seconds"] is None and [r["round"] for r in raw["rounds"]] == [1]
    assert raw["rows"]["train"]["ray"] == pytest.approx(10.8)
    assert {"cpu", "cores", "memory_gib"} <= set(raw["machine"])


def test_from_run_without_finished_rounds_is_an_error(tmp_path, capsys):
    run = tmp_path / "empty"
    write_run(run, [])
    assert main(["--from-run", str(run), "--results", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 2
    assert "no finished round after round 0" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def old_round(number: int) -> dict:
    """A round's metrics.json from before the per-stage timings: no `<part>_seconds`, no round_seconds."""
    old = metrics(number)
    for stats in old["stages"].values():
        for part in ("startup", "io", "work", "save"):
            stats.pop(f"{part}_seconds", None)
    del old["ray_init_seconds"], old["round_seconds"]
    return old


def test_from_run_leaves_out_rounds_from_before_the_timings_and_says_so(tmp_path):
    run = tmp_path / "runs" / "mixed"
    no_round_seconds = metrics(2)
    del no_round_seconds["round_seconds"]
    write_run(run, [old_round(1), no_round_seconds, metrics(3), metrics(4, scale=2.0)])
    results_md, out_json = tmp_path / "results.md", tmp_path / "round.json"
    assert main(["--from-run", str(run), "--results", str(results_md), "--json", str(out_json)]) == 0

    raw = json.loads(out_json.read_text())
    assert [r["round"] for r in raw["rounds"]] == [3, 4] and raw["left_out"] == [1, 2]
    assert raw["rows"]["round"]["wall"] == pytest.approx(300.0)
    section = results_md.read_text()
    assert "the mean of rounds 3, 4. " in section
    assert ("Rounds 1, 2 are left out: they ran, at least in part, before the per-stage timings were "
            "recorded.") in section

    one = tmp_path / "runs" / "one-old"
    write_run(one, [old_round(1), metrics(2)])
    assert main(["--from-run", str(one), "--results", str(results_md), "--json", str(out_json)]) == 0
    assert (", round 2. Round 1 is left out: it ran, at least in part, before the per-stage timings were "
            "recorded.") in results_md.read_text()


def test_from_run_with_every_round_from_before_the_timings_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "runs" / "old"
    write_run(run, [old_round(1), old_round(2)])
    assert main(["--from-run", str(run), "--results", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: no finished round of {run} has per-stage timings: each ran, at least in part, "
                   "before they were recorded\n")
    assert not (tmp_path / "r.md").exists() and not (tmp_path / "r.json").exists()


def test_a_run_it_makes_replaces_its_own_previous_run_and_reports_the_command(tmp_path, monkeypatch):
    import bench.round_breakdown as bench

    run = tmp_path / "runs" / "bench-round"
    (run / "round_001").mkdir(parents=True)
    (run / "round_001" / "stale").write_text("from an earlier benchmark")
    (run / ".bench-round").write_text("")  # the benchmark made it
    commands = []

    def fake_round(command, **kwargs):
        commands.append(command)
        assert not (run / "round_001").exists(), "the previous run must be gone before the round starts"
        assert (run / ".bench-round").is_file(), "the fresh run is marked as the benchmark's own"
        write_run(run, [metrics(1)])
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(bench.subprocess, "run", fake_round)
    results_md, out_json = tmp_path / "results.md", tmp_path / "round.json"
    assert main(["--output", str(tmp_path / "runs"), "--results", str(results_md), "--json", str(out_json),
                 "train.beta=0.2"]) == 0
    assert commands[0][1:5] == ["-m", "pipeline", "rounds", "3"] and commands[0][-1] == "train.beta=0.2"
    assert ["--run", "bench-round"] == commands[0][7:9]
    text = results_md.read_text()
    assert "The `python -m pipeline rounds 3 --config configs/default.yaml --run bench-round --output " in text
    raw = json.loads(out_json.read_text())
    assert raw["process_seconds"] >= 0 and raw["command"].startswith("python -m pipeline rounds 3")
    assert "old_path" not in raw and "Side by side" not in text
    assert raw["left_out"] == [] and "left out" not in text
    # Its next run replaces it again: the marker is still there.
    commands.clear()
    assert main(["--output", str(tmp_path / "runs"), "--results", str(results_md), "--json", str(out_json)]) == 0
    assert len(commands) == 1 and (run / ".bench-round").is_file()


def test_compare_old_runs_the_old_path_first_and_tables_both(tmp_path, monkeypatch):
    import bench.round_breakdown as bench

    commands = []

    def fake_rounds(command, **kwargs):
        commands.append(command)
        run = tmp_path / "runs" / command[command.index("--run") + 1]
        write_run(run, [metrics(n, scale=2.0 if run.name.endswith("-old") else 1.0) for n in (1, 2)])
        # Round 0 timed like any stage: where kept engines start.
        (run / "round_000" / "metrics.json").write_text(json.dumps(
            {"round": 0, "stages": {"evaluate": {"wall_seconds": 30.0, "startup_seconds": 20.0, "io_seconds": 0.0,
                                                 "work_seconds": 9.0}}}))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(bench.subprocess, "run", fake_rounds)
    results_md, out_json = tmp_path / "results.md", tmp_path / "round.json"
    assert main(["--output", str(tmp_path / "runs"), "--rounds", "2", "--compare-old", "--results", str(results_md),
                 "--json", str(out_json)]) == 0
    old_command, new_command = commands
    assert old_command[old_command.index("--run") + 1] == "bench-round-old"
    assert set(bench.OLD_PATH) <= set(old_command) and not set(bench.OLD_PATH) & set(new_command)
    assert old_command[3:5] == ["rounds", "2"] == new_command[3:5]
    raw = json.loads(out_json.read_text())
    assert raw["run"].endswith("bench-round") and raw["old_path"]["run"].endswith("bench-round-old")
    assert [b["round"] for b in raw["old_path"]["rounds"]] == [1, 2]
    text = results_md.read_text()
    assert "### Side by side with the old path" in text
    table = text[text.index("| round | this path: wall"):]
    assert "| 1 | " in table and "| 2 | " in table and "| **all** | " in table
    # Round 0 is in the table and in the totals: 30 s of which 21 s outside its 9 s of work.
    assert "| 0 (base model, evaluate only) | 30.0 s | 21.0 s (70.0%) | 30.0 s | 21.0 s (70.0%) |" in table
    assert "| **all** | **430.0 s** |" in table


@pytest.mark.parametrize("make", ["a user's run", "an empty directory"])
def test_a_run_directory_it_did_not_make_is_never_removed(tmp_path, monkeypatch, capsys, make):
    import bench.round_breakdown as bench

    run = tmp_path / "runs" / "default"
    run.mkdir(parents=True)
    if make == "a user's run":
        write_run(run, [metrics(1)])
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    commands = []
    monkeypatch.setattr(bench.subprocess, "run",
                        lambda command, **kwargs: commands.append(command) or SimpleNamespace(returncode=0))
    assert main(["--output", str(tmp_path / "runs"), "--run", "default", "--results", str(tmp_path / "r.md"),
                 "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {run} exists and was not made by this benchmark (no .bench-round file); "
                   "pass another --run or remove it yourself\n")
    assert commands == [], "no round may run over someone else's run"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert not (tmp_path / "r.md").exists()


def test_a_failed_round_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import bench.round_breakdown as bench

    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kwargs: SimpleNamespace(returncode=1))
    assert main(["--output", str(tmp_path), "--results", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 2
    assert "the rounds failed (exit status 1)" in capsys.readouterr().err
    # The failed run is still marked as the benchmark's, so the next benchmark may replace it.
    assert (tmp_path / "bench-round" / ".bench-round").is_file()
