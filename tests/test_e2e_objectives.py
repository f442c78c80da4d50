"""Every objective trains two smoke rounds end to end (real vLLM, Ray, Ray Train).

The contrastive objective (the default) is covered, with evaluation, by
test_e2e_rounds.py; here evaluation is off. Round 1's generate, rerank and
reference outputs do not depend on the objective (same seed, same base model,
same prompts), so each run starts from copies of the session's smoke run's
(conftest.py's `smoke_run`): every objective trains round 1 and then runs all
of round 2 itself.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from core.objectives import OBJECTIVES
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("objective", sorted(set(OBJECTIVES) - {"contrastive"}))
def test_objective_trains_two_rounds(tmp_path, tiny_model, smoke_run, objective):
    shared, first = smoke_run / "round_001", tmp_path / objective / "round_001"
    for name in ("candidates", "scored", "lists", "train"):
        shutil.copytree(shared / name, first / name)
    (first / "_done").mkdir()
    for stage in ("generate", "rerank", "reference"):
        shutil.copy(shared / "_done" / stage, first / "_done" / stage)
    result = run_cli("rounds", "2", "--config", "configs/smoke.yaml", "--run", objective, "--output", str(tmp_path),
                     f"train.objective={objective}", "prompts.eval_size=0", timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    run_dir = tmp_path / objective
    previous = load_file(tiny_model / "model.safetensors")
    for number in (1, 2):
        policy = run_dir / f"round_{number:03d}" / "policy"
        log = [json.loads(line) for line in (policy / "training_log.jsonl").read_text().splitlines()]
        assert log and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
        stats = json.loads((run_dir / f"round_{number:03d}" / "_done" / "train").read_text())
        assert stats["objective"] == objective
        weights = load_file(policy / "model.safetensors")
        assert any(not torch.equal(weights[k].float(), previous[k].float()) for k in previous), \
            f"round {number} did not change the policy"
        previous = weights
