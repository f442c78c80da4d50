"""Every objective trains two smoke rounds end to end (real vLLM, Ray, Ray Train).

The contrastive objective (the default) is covered, with evaluation, by
test_e2e_rounds.py; here evaluation is off to keep each run to about two
minutes.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from stages.train.objectives import OBJECTIVES
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("objective", sorted(set(OBJECTIVES) - {"contrastive"}))
def test_objective_trains_two_rounds(tmp_path, tiny_model, objective):
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
