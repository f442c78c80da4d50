"""`larpo diff` on hand-made eval shards, and `larpo sample` on the shared smoke run's policy."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from core import schema
from core.layout import write_parquet
from tests.conftest import run_cli

MAX_WORDS_3 = json.dumps({"constraints": [{"kind": "max_words", "limit": 3}, {"kind": "lowercase"}]})


def eval_row(prompt_id: str, response: str, reward: float, finish_reason: str = "stop", met=None) -> dict:
    return {"prompt_id": prompt_id, "prompt": [{"role": "user", "content": f"Answer {prompt_id} briefly."}],
            "response": response, "reward": reward, "num_tokens": len(response.split()), "round": 0,
            "policy": "p", "metadata": MAX_WORDS_3, "finish_reason": finish_reason,
            "response_token_ids": [1, 2], "constraints_met": met}


def write_eval(round_dir: Path, rows: list[dict]) -> None:
    write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), round_dir / "eval" / "part-00000.parquet")


def test_diff_lists_the_answers_that_lost_worst_first(tmp_path):
    run = tmp_path / "run"
    write_eval(run / "round_000", [eval_row("a", "short answer", 1.0), eval_row("b", "two words", 1.0),
                                   eval_row("c", "Not Lower", 0.0)])
    # Round 0's shard above predates constraints_met (None): diff computes them.
    write_eval(run / "round_001", [eval_row("a", "A Much Longer Answer Here", 0.0, "length", [False, False]),
                                   eval_row("b", "Two words here", 0.5, met=[True, False]),
                                   eval_row("c", "fine", 1.0, met=[True, True])])
    result = run_cli("diff", str(run / "round_001"), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("2 of 3 held-out answers of round_001 have a lower reward than round 0's")
    assert out.index("a  reward 1.000 -> 0.000") < out.index("b  reward 1.000 -> 0.500")
    assert "constraints (round 0 -> this round): max_words met -> missed, lowercase met -> missed" in out
    assert '"A Much Longer Answer Here" [cut at max_tokens]' in out
    assert "\nc  reward" not in out


@pytest.mark.parametrize("target, fragment", [("round_000", "round 0 itself"), ("round_009", "not a round directory"),
                                              ("round_002", "has not been evaluated")])
def test_diff_mistakes_are_one_line(tmp_path, target, fragment):
    run = tmp_path / "run"
    write_eval(run / "round_000", [eval_row("a", "x", 1.0)])
    (run / "round_002").mkdir()
    result = run_cli("diff", str(run / target), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and fragment in result.stderr


def test_sample_refuses_a_round_without_a_policy(tmp_path):
    (tmp_path / "run" / "round_001").mkdir(parents=True)
    result = run_cli("sample", str(tmp_path / "run" / "round_001"), "hi", timeout=120)
    assert result.returncode == 2 and "has no finished policy" in result.stderr


@pytest.mark.e2e
def test_sample_answers_with_the_rounds_policy(smoke_run):
    result = run_cli("sample", str(smoke_run / "round_001"), "Say hi.", "--max-tokens", "8", "-n", "2",
                     "--temperature", "1.0", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("--- ")]
    assert len(headers) == 2 and str(smoke_run / "round_001" / "policy") in headers[0]
    assert "WARNING" not in result.stderr
