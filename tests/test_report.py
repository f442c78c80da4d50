"""`python -m pipeline report` on a hand-made run directory: the table, report.md and a real PNG."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import PipelineError
from pipeline.report import main, read_run, table_row
from tests.conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_round(run_dir: Path, number: int, eval_metrics: dict, losses: list[float] | None = None,
                lists: int | None = None, seconds: dict | None = None) -> Path:
    round_dir = run_dir / f"round_{number:03d}"
    round_dir.mkdir(parents=True)
    metrics = {"round": number, "eval": eval_metrics, "stage_seconds": seconds or {"evaluate": 2.0}}
    if lists is not None:
        metrics["stages"] = {"rerank": {"lists": lists}}
    if losses:
        # The summary deliberately disagrees with the log: the report must prefer the log.
        metrics["train"] = {"steps": len(losses), "loss_last": 99.0, "loss_mean": 99.0}
        (round_dir / "policy").mkdir()
        (round_dir / "policy" / "training_log.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": loss, "ranking_accuracy": 0.5}) + "\n"
                    for i, loss in enumerate(losses)))
    (round_dir / "metrics.json").write_text(json.dumps(metrics))
    return round_dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "myrun"
    write_round(run, 0, {"reward_mean": 0.25, "win_rate": 0.5, "pass_rate": 0.125, "response_tokens_mean": 20.0})
    write_round(run, 1, {"reward_mean": 0.5, "win_rate": 0.625, "pass_rate": 0.25, "response_tokens_mean": 18.5},
                losses=[2.0, 1.5, 1.0], lists=10,
                seconds={"generate": 10.0, "rerank": 1.0, "reference": 2.0, "train": 5.0, "evaluate": 3.5})
    write_round(run, 2, {"reward_mean": 0.75, "win_rate": 0.875, "pass_rate": 0.5, "response_tokens_mean": 16.0},
                losses=[0.9, 0.7], lists=9,
                seconds={"generate": 11.0, "rerank": 1.0, "reference": 2.0, "train": 5.0, "evaluate": 3.0})
    # An unfinished round (no metrics.json) is not reported.
    (run / "round_003" / "candidates").mkdir(parents=True)
    return run


def table_lines(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_table_has_one_row_per_finished_round(run_dir, capsys):
    assert main(argparse.Namespace(run_dir=str(run_dir))) == 0
    printed = capsys.readouterr().out
    header, _, *rows = table_lines(printed)
    assert header[:3] == ["round", "eval reward", "win rate vs round 0"]
    by_round = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(by_round) == ["0", "1", "2"]
    assert by_round["0"]["win rate vs round 0"] == "0.500"
    assert by_round["0"]["train loss (last)"] == "-"  # round 0 trains nothing
    assert by_round["1"]["eval reward"] == "0.500"
    assert by_round["1"]["pass rate"] == "0.250"
    assert by_round["1"]["mean length (tokens)"] == "18.5"
    assert by_round["1"]["train loss (last)"] == "1.0000"
    assert by_round["1"]["train loss (mean)"] == "1.5000"
    assert by_round["2"]["train loss (last)"] == "0.7000"
    assert by_round["2"]["lists kept"] == "9"
    assert by_round["1"]["wall time (s)"] == "21.5"
    markdown = (run_dir / "report.md").read_text()
    assert table_lines(markdown) == table_lines(printed)
    assert "report.png" in markdown
    assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"


def colour_share(pixels: np.ndarray, rgb: tuple[int, int, int]) -> float:
    return float((np.abs(pixels - np.array(rgb)).max(axis=-1) < 40).mean())


def test_plot_is_a_real_png_with_the_data_drawn_in_every_panel(run_dir):
    main(argparse.Namespace(run_dir=str(run_dir)))
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    image = np.asarray(Image.open(run_dir / "report.png").convert("RGB"), dtype=int)
    height, width, _ = image.shape
    assert width >= 600 and height >= 400
    quadrants = {(i, j): image[i * height // 2:(i + 1) * height // 2, j * width // 2:(j + 1) * width // 2]
                 for i in (0, 1) for j in (0, 1)}
    # matplotlib's first two colours: every panel draws a first series (reward, win rate,
    # length, round 1's loss); the reward panel (pass rate) and the loss panel (round 2) a second.
    blue, orange = (31, 119, 180), (255, 127, 14)
    for position, pixels in quadrants.items():
        assert colour_share(pixels, blue) > 0.001, f"panel {position} has no first series"
    for position in ((0, 0), (1, 1)):
        assert colour_share(quadrants[position], orange) > 0.001, f"panel {position} has no second series"
    assert colour_share(quadrants[(1, 0)], orange) == 0.0


def test_the_report_command_line(run_dir):
    result = run_cli("report", str(run_dir), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "win rate vs round 0" in result.stdout
    # run_dir's round 3 has started, not finished: named, not silently left out.
    assert "not reported, not finished yet (no metrics.json): round_003" in result.stdout
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_run_without_finished_rounds_is_a_one_line_error(tmp_path):
    run = tmp_path / "empty"
    (run / "round_001" / "candidates").mkdir(parents=True)
    result = run_cli("report", str(run), timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(run) in lines[0] and "no finished rounds" in lines[0]
    assert not (run / "report.md").exists() and not (run / "report.png").exists()


def test_a_missing_run_directory_is_named(tmp_path):
    with pytest.raises(PipelineError, match="nope.*does not exist"):
        read_run(tmp_path / "nope")


def test_a_broken_metrics_file_is_named(run_dir):
    (run_dir / "round_001" / "metrics.json").write_text("{not json")
    with pytest.raises(PipelineError, match=r"round_001/metrics.json is not valid JSON"):
        read_run(run_dir)


def test_a_broken_training_log_line_is_named(run_dir):
    (run_dir / "round_002" / "policy" / "training_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2}\n')
    with pytest.raises(PipelineError, match=r"training_log.jsonl line 2 has no numeric 'loss'"):
        read_run(run_dir)


def test_summary_loss_is_used_when_the_training_log_is_gone():
    row = table_row({"round": 4, "eval": {}, "train": {"loss_last": 0.3, "loss_mean": 0.4}}, [])
    assert (row["loss_last"], row["loss_mean"], row["win_rate"], row["wall_seconds"]) == (0.3, 0.4, None, None)


def interval(value: float, baseline: float, low: float, high: float) -> dict:
    return {"value": value, "baseline": baseline, "difference": value - baseline, "low": low, "high": high,
            "prompts": 8}


def test_intervals_and_kinds_in_the_table_and_the_plot(tmp_path, capsys):
    run = tmp_path / "ci"
    write_round(run, 0, {"reward_mean": 0.25, "win_rate": 0.5, "pass_rate": 0.125, "response_tokens_mean": 20.0,
                         "pass_rate_by_kind": {"lowercase": 0.0, "max_words": 0.25}})
    write_round(run, 1, {"reward_mean": 0.5, "win_rate": 0.625, "pass_rate": 0.25, "response_tokens_mean": 18.5,
                         "vs_round_0": {"reward_mean": interval(0.5, 0.25, 0.1, 0.4),
                                        "win_rate": interval(0.625, 0.5, 0.05, 0.2),
                                        "pass_rate": interval(0.25, 0.125, -0.02, 0.27)},
                         "pass_rate_by_kind": {"lowercase": 0.5, "max_words": 0.125}, "truncated_rate": 0.25,
                         "pass_count_by_kind": {"lowercase": [2, 4], "max_words": [1, 8]}})
    assert main(argparse.Namespace(run_dir=str(run))) == 0
    header, _, *rows = table_lines(capsys.readouterr().out)
    by_round = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_round["0"]["reward change [95% CI]"] == "-"  # round 0 against itself
    assert by_round["1"]["reward change [95% CI]"] == "+0.250 [+0.100, +0.400]"
    assert by_round["1"]["win rate [95% CI]"] == "0.625 [0.550, 0.700]"
    assert by_round["1"]["pass rate change, points [95% CI]"] == "+12.5 [-2.0, +27.0]"
    report = (run / "report.md").read_text()
    # Counts beside a rate where the round kept them (round 0 here predates them).
    assert "| lowercase | 0.000 | 0.500 (2/4) |" in report and "| max_words | 0.250 | 0.125 (1/8) |" in report
    assert by_round["1"]["cut at max_tokens"] == "0.250"
    from pipeline.report import interval_bars, read_run
    rows = [table_row(m, log) for m, log in read_run(run)]
    rounds, values, (below, above) = interval_bars(rows, "pass_rate")
    assert rounds == [0, 1] and values == [0.125, 0.25]
    assert below == pytest.approx([0.0, 0.145]) and above == pytest.approx([0.0, 0.145])
    assert Image.open(run / "report.png").size[0] > 0


def test_report_and_inspect_path_mistakes_are_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for command, path, fragment in (("report", a_file, "is a file; give a run directory"),
                                    ("report", tmp_path / "nope", "does not exist"),
                                    ("inspect", a_file, "is not a round directory"),
                                    ("inspect", tmp_path / "nope", "is not a round directory"),
                                    ("inspect", tmp_path, "is not a round directory")):
        result = run_cli(command, str(path), timeout=120)
        assert result.returncode == 2, (command, path, result.stderr)
        assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr, result.stderr
