"""Training health: a run that diverges stops in one line instead of saving a broken policy.

Checked: a step whose loss or gradient norm is not finite raises TrainingDiverged before the
optimizer applies it (one worker in-process; two gloo workers, replicated and FSDP, reaching the
same decision); a policy with a NaN weight is neither written (save_policy) nor trained from
(set_up); a round whose policy answers every held-out prompt, or samples every candidate, empty
stops before the next stage; and, end to end, `train.learning_rate=1e30` ends the command with
exit status 2 and the step and key on its error line, leaving no policy.
"""

import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from core import schema
from core.config import TrainConfig
from core.errors import PipelineError, TrainingDiverged
from core.layout import shard_name, write_parquet
from core.timing import Timings
from pipeline.settings import load_config
from pools.logprob_scorer import load_policy
from stages import evaluate, generate
from stages.train.checkpoint import first_non_finite
from stages.train.loop import LoopConfig, divergence, save_policy, set_up, train_and_save, train_step
from tests.conftest import ray_orphans_since, run_cli, survivors
from tests.test_evaluate import evaluate_round, plan_for, prompts
from tests.test_fsdp2 import MODEL, free_port

# 5 lists, 4 a step, two epochs: 4 steps. At 1e30 the first update is finite and the second
# step's gradients are NaN.
TRAIN = TrainConfig(objective="contrastive", learning_rate=1e30, batch_size=4, micro_batch_size=2, epochs=2,
                    max_length=128, warmup_ratio=0.0, autocast="off")
DIVERGED_AT = (r"^training diverged at step 2 of 4: the (loss|gradient norm) is nan.*; "
               r"train\.learning_rate=1e\+30 is likely too high")


@pytest.fixture(scope="module")
def shard(tmp_path_factory, tiny_model):
    from tests.test_data_parallel import train_shard

    return train_shard(tmp_path_factory.mktemp("health-data"), tiny_model)


def loop_config(shard: Path, out: Path, policy: Path = MODEL, **options) -> LoopConfig:
    out.mkdir(parents=True, exist_ok=True)
    return LoopConfig(train=replace(TRAIN, **options), seed=0, policy_in=str(policy), trust_remote_code=False,
                      train_shard=str(shard), output_dir=str(out))


def written(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.exists() else set()


# --- the step guard -------------------------------------------------------------

def test_divergence_names_the_step_the_value_and_the_key():
    nan, inf = float("nan"), float("inf")
    assert divergence(3, 8, 0.7, 12.0, TRAIN) is None
    message = divergence(2, 8, nan, nan, TRAIN)
    assert message == ("training diverged at step 2 of 8: the loss is nan; train.learning_rate=1e+30 is likely "
                       "too high; lower it or train.beta and run the round again (a diverged train stage keeps "
                       "nothing)")
    grad = divergence(5, 8, 0.25, inf, TRAIN)
    assert "step 5 of 8: the gradient norm is inf (loss 0.25)" in grad and "train.learning_rate" in grad
    # Before any update the learning rate cannot be the cause.
    first = divergence(1, 8, -inf, nan, TRAIN)
    assert "step 1 of 8: the loss is -inf" in first and "train.beta=0.1" in first
    assert "learning_rate" not in first
    assert all("\n" not in m for m in (message, grad, first))


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_saves_nothing(shard, tmp_path):
    out = tmp_path / "policy"
    with pytest.raises(TrainingDiverged, match=DIVERGED_AT) as raised:
        train_and_save(loop_config(shard, out), rank=0, world=1)
    assert "\n" not in str(raised.value)
    assert written(out) == set()  # no weights, config, tokenizer or training log


def test_a_non_finite_gradient_stops_the_step_before_the_update(shard, tmp_path):
    trainer = set_up(loop_config(shard, tmp_path / "policy", learning_rate=1e-3), Timings(), rank=0, world=1)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    # A finite loss whose gradient overflows in one weight.
    trainer.params[-1].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(TrainingDiverged, match=r"step 1 of 4: the gradient norm is inf \(loss [0-9.]+\)"):
        train_step(trainer, trainer.steps[0])
    assert not trainer.optimizer.state  # never stepped
    assert trainer.scheduler.last_epoch == 0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def diverging_worker(rank: int, world: int, port: int, cfg: LoopConfig) -> None:
    """One of `world` gloo workers training `cfg`; the error it stopped with goes to <output_dir>/rank<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    outcome = {"error": None}
    try:
        train_and_save(cfg, rank, world)
    except TrainingDiverged as exc:
        outcome["error"] = str(exc)
    finally:
        (Path(cfg.output_dir) / f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_every_worker_stops_at_the_same_step(shard, tmp_path, sharding):
    out = tmp_path / sharding
    mp.spawn(diverging_worker, args=(2, free_port(), loop_config(shard, out, sharding=sharding)), nprocs=2, join=True)
    errors = [json.loads((out / f"rank{rank}.json").read_text())["error"] for rank in range(2)]
    assert errors[0] and errors[0] == errors[1]
    assert re.match(DIVERGED_AT, errors[0]), errors[0]
    assert written(out) == {"rank0.json", "rank1.json"}


# --- the weights: never written, never loaded -----------------------------------

def test_first_non_finite_names_the_first_bad_tensor():
    tensors = [("a", torch.ones(3)), ("ids", torch.arange(3)), ("b", torch.tensor([1.0, float("inf"), float("nan")])),
               ("c", torch.tensor([float("nan")]))]
    assert first_non_finite(tensors) == ("b", 2)
    assert first_non_finite(tensors[:2]) is None


def test_a_policy_with_a_nan_weight_is_not_written(tiny_model, tmp_path):
    model, tokenizer = load_policy(str(tiny_model), "float32", check=False)
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    out = tmp_path / "policy"
    out.mkdir()
    with pytest.raises(TrainingDiverged, match=rf"policy not saved to {out}: weight {name} holds 1 NaN or infinite "
                                               r"values.*train\.learning_rate"):
        save_policy(model, tokenizer, replace(TRAIN, learning_rate=1e-3), out, rank=0, sharded=False)
    assert written(out) == set()


def test_a_finite_policy_is_written(tiny_model, tmp_path):
    model, tokenizer = load_policy(str(tiny_model), "float32", check=False)
    save_policy(model, tokenizer, TRAIN, tmp_path, rank=0, sharded=False)
    assert load_file(tmp_path / "model.safetensors")


def test_a_starting_policy_with_a_nan_weight_is_refused_at_load(tiny_model, shard, tmp_path):
    model, tokenizer = load_policy(str(tiny_model), "float32", check=False)
    name = "model.embed_tokens.weight"
    with torch.no_grad():
        model.get_parameter(name)[3] = float("inf")
    broken = tmp_path / "broken"
    model.save_pretrained(broken, safe_serialization=True)
    tokenizer.save_pretrained(broken)
    count = model.config.hidden_size  # one row of the embedding
    with pytest.raises(PipelineError, match=rf"^policy {broken}: weight {name} holds {count} NaN or infinite "
                                            r"values.*model\.name") as raised:
        set_up(loop_config(shard, tmp_path / "policy", policy=broken), Timings(), rank=0, world=1)
    assert not isinstance(raised.value, TrainingDiverged)  # a bad input, not this round's training


# --- divergence without NaN: empty answers ---------------------------------------

@pytest.fixture
def config():
    return load_config("configs/smoke.yaml")


def answering(texts: list[str], base: list[str] | None = None):
    """Stands in for evaluate.respond: a trained round's policy answers prompt i with texts[i],
    round 0's (the base model) with base[i] (by default an answer to each)."""
    def respond(heldout, policy, round_number, config, out_dir, engines=None, reward_gpus=0.0):
        answers = texts if round_number else base or ["an answer"] * len(heldout)
        outputs = [[{"text": text, "num_tokens": 1, "finish_reason": "stop", "token_ids": [2]}] for text in answers]
        rows = evaluate.eval_rows(heldout, outputs, round_number, policy)
        for row in rows:
            row["reward"] = 0.0
        write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), out_dir / shard_name(0))
        return rows, {"policy": policy, "temperature": config.evaluate.temperature,
                      "max_tokens": config.evaluate.max_tokens}
    return respond


def test_a_round_answering_every_held_out_prompt_empty_is_stopped(tmp_path, config, monkeypatch):
    # Round 0 (the base model) answers; round 1's policy answers nothing but blanks.
    monkeypatch.setattr(evaluate, "respond", answering(["", " ", "\n"]))
    plan = plan_for(tmp_path, config, 1, prompts(3))
    with pytest.raises(PipelineError, match=r"^round 1: training collapsed the policy: every one of the 3 held-out "
                                            r"answers is empty; see .*round_001/policy/training_log\.jsonl.*"
                                            r"train\.learning_rate$"):
        evaluate_round(plan)
    assert not plan.round.is_done("evaluate")


def test_a_round_with_some_empty_answers_is_evaluated(tmp_path, config, monkeypatch):
    monkeypatch.setattr(evaluate, "respond", answering(["", "ok", ""]))
    stats = evaluate_round(plan_for(tmp_path, config, 1, prompts(3)))
    assert stats["eval_prompts"] == 3


def test_a_policy_as_empty_as_its_base_model_is_evaluated(tmp_path, config, monkeypatch):
    # A base model that answers nothing (a random-weight test model): training collapsed nothing.
    monkeypatch.setattr(evaluate, "respond", answering(["", "", ""], base=["", "", ""]))
    plan = plan_for(tmp_path, config, 1, prompts(3))
    assert evaluate_round(plan)["eval_prompts"] == 3


def test_an_empty_base_model_is_not_called_collapsed_training(tmp_path, config, monkeypatch):
    # Round 0 is the base model's answers, made before any training: not this guard's business.
    monkeypatch.setattr(evaluate, "respond", answering([], base=["", "", ""]))
    plan = plan_for(tmp_path, config, 0, prompts(3))
    assert evaluate.run_stage(plan, plan.round.begin_stage("evaluate"))["eval_prompts"] == 3


def sampling(texts: list[str]):
    """Stands in for generate_shards: every prompt's samples are `texts`."""
    def generate_shards(prompts, model_path, spec, config, out_dir, seed, make_table, engines=None):
        outputs = [[{"text": text, "temperature": 1.0, "num_tokens": 1, "finish_reason": "stop", "token_ids": [2]}
                    for text in texts] for _ in prompts]
        write_parquet(make_table(prompts, outputs), out_dir / shard_name(0))
        return {"generate_seconds": 1.0}
    return generate_shards


def generate_plan(tmp_path, config, number: int):
    plan = plan_for(tmp_path, config, number, [])
    policy_in = "/models/base" if number == 1 else str(plan.run.round(number - 1).policy)
    return replace(plan, prompts=prompts(2), policy_in=policy_in)


@pytest.mark.parametrize("number, cause", [(1, r"the starting model /models/base answers nothing; check model\.name"),
                                           (2, r"training collapsed round 1's policy .*round_001/policy; .*"
                                               r"train\.learning_rate$")],
                         ids=["base-model", "trained-policy"])
def test_a_round_sampling_only_empty_candidates_stops_before_rerank(tmp_path, config, monkeypatch, number, cause):
    monkeypatch.setattr(generate, "generate_shards", sampling(["", "  "]))
    plan = generate_plan(tmp_path, config, number)
    with pytest.raises(PipelineError, match=rf"^round {number}: every one of the 4 candidates is empty: {cause}"):
        generate.run_stage(plan, plan.round.begin_stage("generate"))


def test_a_round_with_some_empty_candidates_is_kept(tmp_path, config, monkeypatch):
    monkeypatch.setattr(generate, "generate_shards", sampling(["", "an answer"]))
    plan = generate_plan(tmp_path, config, 2)
    assert generate.run_stage(plan, plan.round.begin_stage("generate"))["candidates"] == 4


# --- end to end -----------------------------------------------------------------

@pytest.mark.e2e
def test_a_diverging_round_ends_in_one_line_and_leaves_no_policy(tmp_path, tiny_model):
    start = time.time() - 1
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "nan", "--output", str(tmp_path),
                     "prompts.eval_size=0", "train.learning_rate=1e30", timeout=900)
    assert result.returncode == 2, result.stderr[-5000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-5000:]
    assert "TrainingDiverged" not in errors[0] and "WorkerGroupError" not in errors[0], errors[0]
    assert "training diverged at step " in errors[0] and "train.learning_rate=1e+30" in errors[0], errors[0]
    round_dir = tmp_path / "nan" / "round_001"
    assert not (round_dir / "_done" / "train").exists()
    weights = [p for name in ("policy", "policy.partial") for p in (round_dir / name).glob("*.safetensors")]
    for path in weights:  # none expected; were one there, it would have to be finite
        assert first_non_finite(load_file(path).items()) is None, path
    assert not weights
    leftover = survivors(ray_orphans_since(start), timeout=10)
    assert not leftover, f"still running after the command ended: {leftover}"
