"""`python -m pipeline inspect <round dir>` on hand-made rounds, and the README's "Reading the shards" code."""

import contextlib
import io
import math
import re

import numpy as np
import pytest
import yaml

from core.layout import atomic_write_text
from pipeline.cli import main as cli_main
from pipeline.inspect_round import histogram, quantile, shorten
from tests.conftest import REPO_ROOT
from tests.test_rerank_stage import generate, make_plan, run_rerank

LONG = "word " * 60
RESPONSES = {
    "p-a": ["best", "mid", "low", "also best"],
    "p-long": [LONG, "short"],
    "p-tied": ["t1", "t2"],
    "p-nan": ["n1", "n2"],
}
REWARDS = {"best": 1.0, "mid": 0.5, "low": 0.0, "also best": 1.0, LONG: 0.75, "short": 0.25,
           "t1": 0.5, "t2": 0.5, "n1": math.nan, "n2": math.nan}


@pytest.fixture
def round_dir(tmp_path, monkeypatch):
    """Round 1 reranked (rewards looked up by response), with the config.yaml the driver leaves."""
    plan = make_plan(tmp_path, 1, "reward.on_invalid=drop")
    generate(plan, RESPONSES)
    run_rerank(plan, monkeypatch, REWARDS)
    atomic_write_text(plan.round.config, yaml.safe_dump(plan.config.to_dict(), sort_keys=False))
    return plan.round.dir


def inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_prints_counts_rewards_ties_sizes_and_examples(round_dir, capsys):
    code, out, err = inspect(capsys, str(round_dir), "--examples", "1")
    assert code == 0, err
    assert f"round 1  {round_dir}" in out
    assert "candidates       10 for 4 prompts; temperatures 1: 10" in out
    assert re.search(r"lists +2 of 4 prompts +\(strategy top_rest, .*ties drop", out)
    assert "all_tied 1" in out and "no_negative 0" in out and "all_invalid 1" in out
    assert "invalid rewards  2 dropped" in out
    # LONG stands for an answer cut at max_tokens: it leads p-long's list under lists.truncated keep
    assert ("truncated        1 of 10 candidates (10%) stopped at max_tokens; in lists: 1 of 2 positives, "
            "0 of 3 negatives  (lists.truncated keep)") in out
    # reward distribution over the 8 finite rewards
    assert "rewards of 8 candidates (2 NaN or infinite left out)" in out
    assert "min 0.000   q1 0.438   median 0.500   q3 0.812   max 1.000   mean 0.562" in out
    bars = [line for line in out.splitlines() if re.match(r"  \[ *-?\d", line)]
    assert len(bars) == 10 and sum(int(line.split()[-1]) for line in bars) == 8
    # ties: p-tied all ties; p-a's best is shared; "also best" sits out as a tie with the positive
    assert re.search(r"prompts whose candidates all tie +1 of 3", out)
    assert re.search(r"prompts whose best reward is shared +2", out)
    assert re.search(r"tied with their list's lowest positive +1", out)
    assert re.search(r"positives +mean 1.00 +\(size: lists\) 1: 2", out)
    assert re.search(r"negatives +mean 1.50 +\(size: lists\) 1: 1, 2: 1", out)
    # one example: p-a, its positive and its negatives best-first, nothing of p-long
    examples = out[out.index("examples"):]
    assert "examples (1 of 2 lists" in examples
    assert '  p-a  "Answer p-a in 3 words."' in examples
    assert re.search(r'\+ 1\.000 +round 1 sample 0 +"best"', examples)
    assert examples.index('"mid"') < examples.index('"low"')
    assert "also best" not in examples and "p-long" not in examples


def test_inspect_truncates_long_responses(round_dir, capsys):
    code, out, _ = inspect(capsys, str(round_dir), "--examples", "5")
    assert code == 0
    line = next(line for line in out.splitlines() if "0.750" in line and "sample 0" in line)
    assert line.endswith("…\"") and len(line) < 160


def test_inspect_without_examples(round_dir, capsys):
    code, out, _ = inspect(capsys, str(round_dir), "--examples", "0")
    assert code == 0 and "examples (" not in out and "items per list" in out


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp, "is not a round directory"),
    (lambda tmp: tmp / "run" / "round_009", "is not a round directory"),
    (lambda tmp: tmp / "elsewhere.txt", "is not a round directory"),
])
def test_not_a_round_is_a_one_line_error(tmp_path, capsys, make, words):
    (tmp_path / "elsewhere.txt").write_text("x")
    code, out, err = inspect(capsys, str(make(tmp_path)))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1


def test_round_whose_rerank_has_not_finished(tmp_path, capsys):
    plan = make_plan(tmp_path, 2)
    generate(plan, {"q": ["a", "b"]})
    code, _, err = inspect(capsys, str(plan.round.dir))
    assert code == 2 and "rerank stage of round 2 has not finished" in err and err.count("\n") == 1


def test_round_zero_has_nothing_to_inspect(tmp_path, capsys):
    (tmp_path / "round_000" / "_done").mkdir(parents=True)
    code, _, err = inspect(capsys, str(tmp_path / "round_000"))
    assert code == 2 and "round 0, the base model's evaluation only" in err and err.count("\n") == 1


def test_negative_examples_is_an_error(round_dir, capsys):
    code, _, err = inspect(capsys, str(round_dir), "--examples", "-1")
    assert code == 2 and "--examples" in err


# --- helpers -----------------------------------------------------------------------

@pytest.mark.parametrize("values", [[3.0], [0.0, 1.0], [5.0, 1.0, 2.0, 2.0, 9.0, -4.0, 0.5]])
def test_quantile_matches_numpy(values):
    ordered = sorted(values)
    for q in (0, 0.25, 0.5, 0.75, 1):
        assert quantile(ordered, q) == pytest.approx(np.quantile(values, q))


def test_histogram_covers_every_value_once():
    values = sorted([0.0, 0.05, 0.1, 0.5, 0.99, 1.0, 1.0])
    bins = histogram(values, 10)
    assert len(bins) == 10 and sum(count for *_, count in bins) == len(values)
    assert bins[0] == (0.0, 0.1, 2) and bins[-1][1:] == (1.0, 3)
    assert histogram([0.5, 0.5], 10) == [(0.5, 0.5, 2)]


def test_shorten():
    assert shorten("a\n  b") == "a b"
    assert shorten("x" * 10, 5) == "xxxx…"


# --- README ---------------------------------------------------------------------------

def readme_code_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Reading the shards"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_reading_the_shards_code_runs(tmp_path, monkeypatch):
    for number in (1, 2):
        plan = make_plan(tmp_path, number)
        generate(plan, {"q": [f"good {number}", f"bad {number}"], "r": [f"fine {number}", f"poor {number}"]})
        run_rerank(plan, monkeypatch, {f"good {number}": 1.0, f"bad {number}": 0.0,
                                       f"fine {number}": 0.75, f"poor {number}": 0.5})
    blocks = readme_code_blocks()
    assert len(blocks) == 2 and "pd.read_parquet" in blocks[0] and "duckdb.sql" in blocks[1]
    monkeypatch.chdir(tmp_path)   # the README's paths are relative: runs/default/...
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "default").symlink_to(tmp_path / "run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    out = printed.getvalue()
    assert "q good 1 1.0" in out and "0.0" in out
    # DuckDB over both rounds' candidates: one line per round with 4 candidates of 2 prompts
    assert re.search(r"│\s+1 │\s+4 │\s+2 │", out) and re.search(r"│\s+2 │\s+4 │\s+2 │", out)
    # the margin query: q's margin 1.0 ranks above r's 0.25
    assert out.index("│ q ") < out.index("│ r ")
