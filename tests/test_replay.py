"""train.replay: earlier rounds' lists join this round's training data, scored under this round's reference."""

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core import schema
from core.errors import PipelineError
from core.layout import RunLayout, shard_name, write_parquet
from pipeline.driver import plan_round
from pipeline.settings import load_config
from pools.logprob_scorer import reference_logprobs
from stages.reference import stage as reference


def list_row(prompt_id: str, round_number: int, good: str, bad: str) -> dict:
    item = {"sample_index": 0, "round": round_number, "num_tokens": 3, "temperature": 0.8}
    return {"prompt_id": prompt_id, "prompt": [{"role": "user", "content": f"Say {prompt_id}."}],
            "positives": [{**item, "response": good, "reward": 1.0}],
            "negatives": [{**item, "response": bad, "reward": 0.0, "sample_index": 1}],
            "metadata": "{}"}


def write_lists(run: RunLayout, number: int) -> list[dict]:
    rows = [list_row(f"r{number}-p{i}", number, f"Answer {i} of round {number}.", "No.") for i in range(2)]
    partial = run.round(number).begin_stage("rerank")
    write_parquet(pa.Table.from_pylist(rows, schema=schema.LISTS), partial / shard_name(0))
    run.round(number).finish_stage("rerank", {})
    return rows


@pytest.fixture(scope="module")
def other_reference(tiny_model, tmp_path_factory):
    """The tiny model with its weights moved: a later round's reference is another checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("moved")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def run_reference(run: RunLayout, number: int, replay: str, model) -> tuple[list[dict], dict]:
    config = load_config("configs/smoke.yaml", [f"train.replay={replay}"])
    plan = SimpleNamespace(config=config, run=run, round=run.round(number), reference=str(model), engines=None)
    out_dir = run.round(number).begin_stage("reference")
    stats = reference.run_stage(plan, out_dir)
    return pq.read_table(out_dir / shard_name(0)).to_pylist(), stats


def direct_logps(rows: list[dict], model) -> list[list[float]]:
    lists = [(row["prompt"], [item["response"] for item in row["positives"] + row["negatives"]]) for row in rows]
    config = load_config("configs/smoke.yaml")
    return reference_logprobs(str(model), lists, config.train.dtype, config.train.max_length,
                              config.reference.batch_size, config.train.logprob_chunk_size,
                              autocast_setting=config.train.autocast, share_prompt=config.train.share_prompt)


def item_logps(row: dict) -> list[float]:
    return [item["ref_logp"] for item in row["positives"] + row["negatives"]]


def test_replayed_lists_are_scored_under_this_rounds_reference(tmp_path, tiny_model, other_reference, local_ray):
    run = RunLayout.at(tmp_path, "replay")
    first, second, third = (write_lists(run, n) for n in (1, 2, 3))

    rows, stats = run_reference(run, 2, "previous", other_reference)
    assert sorted((row["round"], row["prompt_id"]) for row in rows) == [(1, "r1-p0"), (1, "r1-p1"),
                                                                       (2, "r2-p0"), (2, "r2-p1")]
    assert stats["lists_current"] == 2 and stats["lists_replayed"] == 2
    replayed = sorted((row for row in rows if row["round"] == 1), key=lambda row: row["prompt_id"])
    under_this_round = direct_logps(first, other_reference)
    under_round_1 = direct_logps(first, tiny_model)
    for row, expected, before in zip(replayed, under_this_round, under_round_1, strict=True):
        assert item_logps(row) == pytest.approx(expected, abs=1e-5)
        assert item_logps(row) != pytest.approx(before, abs=1e-3)  # not round 1's own reference
        assert row["reference"] == str(other_reference)
    # inspect counts the two apart.
    from pipeline.inspect_round import training_lines

    run.round(2).finish_stage("reference", stats)
    assert training_lines(run.round(2)) == ["  trained on       2 lists of this round, 2 replayed (round 1: 2)"]

    rows, stats = run_reference(run, 3, "all", other_reference)
    assert sorted({row["round"] for row in rows}) == [1, 2, 3]
    assert stats["lists_current"] == 2 and stats["lists_replayed"] == 4
    assert {row["prompt_id"] for row in rows} == {row["prompt_id"] for row in first + second + third}

    rows, stats = run_reference(run, 3, "none", other_reference)
    assert {row["round"] for row in rows} == {3} and stats["lists_replayed"] == 0


def test_replay_is_part_of_the_run_identity():
    from core.config import RUN_IDENTITY_KEYS

    assert "train.replay" in RUN_IDENTITY_KEYS


def finished_rounds(tmp_path, count: int) -> RunLayout:
    """A run whose rounds 1..count are finished, each with a real lists shard (recorded in rerank's marker)."""
    run = RunLayout.at(tmp_path / "runs", "r")
    for number in range(1, count + 1):
        for stage in ("generate", "rerank", "reference", "train", "evaluate"):
            if stage == "rerank":
                write_lists(run, number)
                continue
            run.round(number).begin_stage(stage)
            run.round(number).finish_stage(stage, {})
    return run


def test_a_round_whose_earlier_lists_lost_their_marker_is_refused_at_planning(tmp_path, tiny_model):
    run = finished_rounds(tmp_path, 2)
    run.round(1).done_marker("rerank").unlink()
    config = load_config("configs/smoke.yaml", ["train.replay=all", f"output={tmp_path / 'runs'}"])
    with pytest.raises(PipelineError, match=r"train.replay=all needs round 1's lists.*_done/rerank is missing"):
        plan_round(config, "r", 3)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_round_whose_earlier_lists_are_damaged_is_refused_at_planning(tmp_path, tiny_model, damage):
    run = finished_rounds(tmp_path, 2)
    shard = run.round(1).dir / "lists" / shard_name(0)
    if damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    config = load_config("configs/smoke.yaml", ["train.replay=all", f"output={tmp_path / 'runs'}"])
    with pytest.raises(PipelineError, match=r"round_001/lists/part-00000\.parquet (is missing|has 100 bytes).*"
                                            r"delete .*round_001/_done/rerank and run round 1 again, then this command"):
        plan_round(config, "r", 3)
