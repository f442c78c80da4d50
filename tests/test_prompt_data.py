import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.constraints import CONSTRAINTS, compatible, describe_all

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPTS_DIR = REPO_ROOT / "data" / "prompts"
MIN_ROWS = {"train": 640, "heldout": 128, "dev": 128, "train_multi": 640}
# Constraints per prompt, and the share of prompts with the larger number.
CONSTRAINT_COUNTS = {"train": (1, 2), "heldout": (1, 2), "dev": (1, 2), "train_multi": (2, 3)}


def load(split: str) -> list[dict]:
    with (PROMPTS_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", sorted(MIN_ROWS))
def test_rows_are_well_formed(split):
    rows = load(split)
    assert len(rows) >= MIN_ROWS[split]
    assert len({row["prompt_id"] for row in rows}) == len(rows)
    for row in rows:
        assert row["prompt_id"].startswith(f"{split.replace('_', '-')}-")
        [message] = row["messages"]
        assert message["role"] == "user"
        assert len(row["constraints"]) in CONSTRAINT_COUNTS[split]
        # The prompt text carries the very instructions the reward checks.
        assert message["content"].endswith(describe_all(row["constraints"]))


@pytest.mark.parametrize("split", sorted(MIN_ROWS))
def test_constraints_cover_every_kind_without_conflicts(split):
    rows = load(split)
    kinds_seen = {c["kind"] for row in rows for c in row["constraints"]}
    assert kinds_seen == set(CONSTRAINTS)
    for row in rows:
        assert compatible(c["kind"] for c in row["constraints"]), row["prompt_id"]
    more = CONSTRAINT_COUNTS[split][1]
    share_of_more = sum(len(row["constraints"]) == more for row in rows) / len(rows)
    assert 0.3 <= share_of_more <= 0.5


@pytest.mark.parametrize("a, b", [("train", "heldout"), ("train", "dev"), ("dev", "heldout"),
                                  ("train_multi", "heldout"), ("train_multi", "dev")])
def test_sets_are_disjoint(a, b):
    def contents(split):
        return {row["messages"][0]["content"] for row in load(split)}

    assert not contents(a) & contents(b)


def test_generator_reproduces_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "data" / "make_prompts.py"), "--out", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path,  # any cwd must work
    )
    for split in MIN_ROWS:
        committed = (PROMPTS_DIR / f"{split}.jsonl").read_bytes()
        assert (tmp_path / f"{split}.jsonl").read_bytes() == committed, split
