"""The command line itself: help and defaults, --version, mistakes, `config`, `--dry-run`, the summary line."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, main
from pipeline.plan_view import describe_keys, summary_line
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def _restore_logging():
    # main() configures the `pipeline` logger for a terminal (pipeline/console.py), as the
    # command does; other tests expect it as they found it.
    import logging

    pipeline, root = logging.getLogger("pipeline"), logging.getLogger()
    saved = (pipeline.handlers[:], pipeline.level, pipeline.propagate, root.handlers[:], root.level)
    yield
    pipeline.handlers[:], pipeline.level, pipeline.propagate = saved[0], saved[1], saved[2]
    root.handlers[:], root.level = saved[3], saved[4]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_every_option_of_round_has_help_and_shows_its_default(capsys):
    code, out, _ = run_main(capsys, "round", "--help")
    assert code == 0
    out = " ".join(out.split())  # help text wraps at the terminal's width
    assert "configs/default.yaml)" in out and "(default: default)" in out
    assert "the round to run" in out and "--dry-run" in out
    for action in build_parser()._subparsers._group_actions[0].choices["round"]._actions:
        assert action.help, action.dest


def test_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.split()[-1][0].isdigit()


def test_rounds_without_a_number_names_only_the_number(capsys):
    code, _, err = run_main(capsys, "rounds")
    assert code == 2
    assert "the following arguments are required: number" in err and "key=value" not in err.splitlines()[-1]


def test_a_mistyped_flag_gets_the_subcommands_usage(capsys):
    code, _, err = run_main(capsys, "round", "1", "--confg", "x")
    assert code == 2
    assert err.startswith("usage: ") and " round " in err.splitlines()[0]
    assert "unrecognized arguments: --confg x" in err


def test_overrides_may_follow_options(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("pipeline.cli.run_rounds", lambda args: seen.setdefault("overrides", args.overrides) and 0)
    main(["round", "1", "train.beta=0.2", "--run", "x", "seed=3"])
    assert seen["overrides"] == ["train.beta=0.2", "seed=3"]


def test_config_lists_every_key_with_its_default_and_help(capsys):
    lines = describe_keys()
    assert "train.beta = 0.1" in lines and "lists.truncated = keep" in lines
    code, out, _ = run_main(capsys, "config")
    assert code == 0 and "train.objective = contrastive" in out


def test_config_resolves_a_file_plus_overrides(capsys):
    code, out, _ = run_main(capsys, "config", "--config", "configs/smoke.yaml", "train.beta=0.3")
    assert code == 0 and "beta: 0.3" in out and "smoke_train.jsonl" in out
    code, _, err = run_main(capsys, "config", "--config", "configs/smoke.yaml", "train.bta=0.3")
    assert code == 2 and "did you mean 'train.beta'" in err


def test_dry_run_shows_the_plan_and_writes_nothing(capsys, tmp_path, tiny_model):
    output = tmp_path / "runs"
    code, out, err = run_main(capsys, "round", "1", "--config", "configs/smoke.yaml", "--run", "dry",
                              "--output", str(output), "--dry-run")
    assert code == 0, err
    assert "dry run: nothing is written" in out and "resolved config:" in out
    assert "prompts    12 from " + str(REPO_ROOT / "data" / "prompts" / "smoke_train.jsonl") in out
    assert "generate would run" in out and "round 0's answers would be made first" in out
    assert "12 prompts x 4 samples = 48 answers" in out
    assert not output.exists()


def test_dry_run_refuses_what_the_round_would_refuse(capsys, tmp_path):
    code, _, err = run_main(capsys, "round", "2", "--config", "configs/smoke.yaml", "--run", "dry",
                            "--output", str(tmp_path), "--dry-run")
    assert code == 2 and "round 1 of run 'dry' is not finished" in err


def test_the_summary_line_is_short_and_human():
    metrics = {"round": 1, "wall_seconds": 1460.2,
               "eval": {"pass_rate": 0.411, "reward_mean": 0.53, "win_rate": 0.62,
                        "vs_round_0": {"pass_rate": {"difference": 0.13, "low": 0.052, "high": 0.208}}}}
    line = summary_line(metrics, "runs/default/round_001")
    assert line == ("round 1 done in 1460 s: pass rate 0.411 (+13.0 points [+5.2, +20.8] vs round 0), reward 0.530, "
                    "win rate vs round 0 0.62  (runs/default/round_001/metrics.json)")
    assert len(line) < 200


def test_larpo_runs_from_any_directory_with_the_default_config(tmp_path):
    import subprocess

    from tests.conftest import LARPO

    # No --config: the bundled default, whose paths are the project's wherever larpo starts.
    result = subprocess.run([str(LARPO), "round", "1", "--run", "anywhere", "--output", "out", "--dry-run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Run {tmp_path / 'out' / 'anywhere'}" in result.stdout  # --output is read from here
    assert str(REPO_ROOT / "data" / "prompts" / "train_multi.jsonl") in result.stdout
    assert not (tmp_path / "out").exists()
