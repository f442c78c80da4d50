"""Two Ray Train workers on CPU (gloo) make the same update as one worker on the same global batch."""

import json

import pyarrow as pa
import pytest
import ray
import torch
from safetensors.torch import load_file

from core import schema
from core.config import TrainConfig
from core.layout import write_parquet
from stages.train.loop import LoopConfig
from stages.train.stage import fit
from tests.conftest import REPO_ROOT
from tests.test_reference_numerics import lists_rows, with_reference


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    ray.shutdown()


def train_shard(tmp_path, tiny_model):
    # 5 lists in batches of 4: the second step's single list leaves worker 1 nothing to do.
    rows = with_reference(lists_rows() * 2 + lists_rows()[:1], tiny_model)
    for i, row in enumerate(rows):
        row.update(prompt_id=f"p{i}", metadata="{}", reference=str(tiny_model))
    path = tmp_path / "train.parquet"
    write_parquet(pa.Table.from_pylist(rows, schema=schema.TRAIN), path)
    return path


def run(tmp_path, tiny_model, shard, workers, **options):
    out = tmp_path / f"policy-{workers}-{'-'.join(map(str, options.values()))}"
    out.mkdir()
    train = TrainConfig(objective="contrastive", learning_rate=1e-3, batch_size=4, micro_batch_size=1,
                        max_length=128, warmup_ratio=0.0, **options)
    config = LoopConfig(train=train, seed=0, policy_in=str(tiny_model), trust_remote_code=False,
                        train_shard=str(shard), output_dir=str(out))
    fit(config, workers, tmp_path / "ray_train", out.name)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    return log, load_file(out / "model.safetensors")


# FSDP computes in bf16 where autocast is on (stages/train/loop.py, mixed_precision), with weights
# rounded to bf16 where one worker's autocast keeps fp32 between matmuls: the same update only in fp32.
@pytest.mark.parametrize("options", [{}, {"sharding": "fsdp", "autocast": "off"},
                                     {"sharding": "fsdp", "autocast": "off", "optimizer": "adamw_bf16"}],
                         ids=["replicated", "fsdp", "fsdp-adamw_bf16"])
def test_two_workers_match_one(local_ray, tmp_path, tiny_model, options):
    shard = train_shard(tmp_path, tiny_model)
    base = load_file(tiny_model / "model.safetensors")
    single = {k: v for k, v in options.items() if k != "sharding"}
    log1, weights1 = run(tmp_path, tiny_model, shard, 1, **single)
    log2, weights2 = run(tmp_path, tiny_model, shard, 2, **options)
    assert set(weights2) == set(weights1) and all(weights2[k].shape == base[k].shape for k in base)
    assert len(log1) == len(log2) == 2
    for one, two in zip(log1, log2):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["ranking_accuracy"] == pytest.approx(two["ranking_accuracy"])
        # The gradient norm is taken after the all-reduce: equal norms mean equal summed gradients.
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    update1 = torch.cat([(weights1[k] - base[k]).flatten() for k in sorted(base)])
    update2 = torch.cat([(weights2[k] - base[k]).flatten() for k in sorted(base)])
    assert update1.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(update1, update2, dim=0) > 0.999
