"""FSDP2 as GPU users run it, on two gloo workers (CPU) and the tiny Llama.

The workers run the real training loop (stages/train/loop.py, `train_and_save`)
in a process group of their own, without Ray. Checked: two sharded workers that
reduce gradients once a step (after several micro-batches) make the same update
as one unsharded worker; a run killed after a sharded checkpoint resumes to the
uninterrupted run's weights, each worker reading only its own shards; a sharded
worker holds half the weights and optimizer state; the mixed-precision policy
gathers bf16 weights over gloo and keeps fp32 master weights and gradients; a
reference scored in the workers is scored by the sharded model.
"""

import json
import os
import resource
import shutil
import signal
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from core.config import TrainConfig
from core.hardware import native_bf16
from stages.train.loop import LoopConfig, mixed_precision

# 5 lists, 4 a step, two epochs: steps of 4, 1, 4 and 1 lists. Two workers: 2 micro-batches
# each in the steps of 4; in the steps of 1, worker 1 runs a zero-weight one.
TRAIN = TrainConfig(objective="contrastive", learning_rate=1e-3, batch_size=4, micro_batch_size=1, epochs=2,
                    max_length=128, warmup_ratio=0.0, autocast="off", checkpoint_every=1)
STEPS = 4
KILLED_AFTER = 2  # the second checkpoint: it replaces the first
MODEL = Path(__file__).resolve().parent.parent / ".cache" / "models" / "tiny-random-llama"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_bytes(trainer) -> dict[str, int]:
    """Bytes of the weights and of the optimizer state this worker holds (its shards under FSDP)."""
    def size(tensor):
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    return {"params": sum(size(p) for p in trainer.model.parameters()),
            "optimizer": sum(size(v) for state in trainer.optimizer.state.values() for v in state.values()
                             if torch.is_tensor(v))}


def train_worker(rank: int, world: int, port: int, cfg: LoopConfig, kill_after: int) -> None:
    """One worker of `world` running the training loop; what it saw goes to <output_dir>/rank<rank>.json.
    With `kill_after`, it SIGKILLs itself once the checkpoint of that step is saved."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import stages.train.loop as loop
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.fsdp import FSDPModule

    from stages.train.checkpoint import TrainingCheckpoint

    seen = {"reduce_scatters": 0, "reads": {}, "gathered_dtypes": [], "reduced_dtypes": []}
    out = Path(cfg.output_dir) / f"rank{rank}.json"

    reduce_scatter = dist.reduce_scatter_single  # FSDP2's gradient reduction

    def counted(output, input, *args, **kwargs):
        seen["reduce_scatters"] += 1
        seen["reduced_dtypes"].append(str(input.dtype))
        return reduce_scatter(output, input, *args, **kwargs)

    all_gather = dist.all_gather_single  # FSDP2's weight gathering

    def gathered(output, input, *args, **kwargs):
        seen["gathered_dtypes"].append(str(input.dtype))
        return all_gather(output, input, *args, **kwargs)

    dist.reduce_scatter_single, dist.all_gather_single = counted, gathered

    read_data = FileSystemReader.read_data

    def reading(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            read = seen["reads"].setdefault(info.relative_path, {"bytes": 0, "keys": []})
            read["bytes"] += info.length
            read["keys"].append(item.storage_index.fqn)
        return read_data(self, plan, planner)

    FileSystemReader.read_data = reading

    train_step = loop.train_step

    def step(trainer, indices):
        if "bytes" not in seen:
            seen["groups"] = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
            seen["master_dtype"] = str(trainer.params[0].dtype)

            def before_update(optimizer, args, kwargs):
                seen.setdefault("grad_dtype", str(trainer.params[0].grad.dtype))

            trainer.optimizer.register_step_pre_hook(before_update)
        metrics = train_step(trainer, indices)
        seen.setdefault("bytes", local_bytes(trainer))  # after the first step: the optimizer state exists
        return metrics

    loop.train_step = step

    if kill_after:
        save = TrainingCheckpoint.save

        def save_then_die(self, model, optimizer, scheduler, history):
            save(self, model, optimizer, scheduler, history)
            if len(history) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        TrainingCheckpoint.save = save_then_die

    try:
        loop.train_and_save(cfg, rank, world)
        seen["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def run(shard: Path, out: Path, world: int, kill_after: int = 0, **options) -> dict:
    """Train with `world` workers (FSDP for two) into `out`; the log, weights and each worker's record."""
    out.mkdir(exist_ok=True)
    train = replace(TRAIN, sharding="fsdp" if world > 1 else "none", **options)
    cfg = LoopConfig(train=train, seed=0, policy_in=str(MODEL), trust_remote_code=False, train_shard=str(shard),
                     output_dir=str(out))
    mp.spawn(train_worker, args=(world, free_port(), cfg, kill_after), nprocs=world, join=True)
    return {"log": [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()],
            "weights": load_file(out / "model.safetensors"),
            "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]}


@pytest.fixture(scope="module")
def shard(tmp_path_factory, tiny_model):
    from tests.test_data_parallel import train_shard

    return train_shard(tmp_path_factory.mktemp("fsdp2-data"), tiny_model)


@pytest.fixture(scope="module")
def one_worker(shard):
    return run(shard, shard.parent / "one", 1)


@pytest.fixture(scope="module")
def two_workers(shard):
    return run(shard, shard.parent / "two", 2)


def test_mixed_precision_gathers_bf16_where_forward_passes_compute_in_bf16():
    on = mixed_precision(replace(TRAIN, autocast="on"))
    assert (on.param_dtype, on.reduce_dtype) == (torch.bfloat16, torch.float32)
    off = mixed_precision(replace(TRAIN, autocast="off"))
    assert (off.param_dtype, off.reduce_dtype) == (torch.float32, torch.float32)
    bf16 = mixed_precision(replace(TRAIN, autocast="off", dtype="bfloat16"))
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    auto = mixed_precision(replace(TRAIN, autocast="auto"))
    assert auto.param_dtype == (torch.bfloat16 if native_bf16() else torch.float32)


def test_two_fsdp_workers_reducing_once_a_step_make_the_update_of_one(one_worker, two_workers):
    base = load_file(MODEL / "model.safetensors")
    log1, log2 = one_worker["log"], two_workers["log"]
    assert len(log1) == len(log2) == STEPS
    for one, two in zip(log1, log2):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
        assert one["ranking_accuracy"] == pytest.approx(two["ranking_accuracy"])
        # The norm is taken after the reduction: equal norms, equal summed gradients.
        assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)
    weights1, weights2 = one_worker["weights"], two_workers["weights"]
    assert set(weights1) == set(weights2)
    updates = {k: (weights1[k] - base[k]).abs().max().item() for k in base}
    assert max(updates.values()) > 1e-3
    for k in base:
        # fp32 sums in another order; Adam's steps of about lr on gradients near zero keep a few
        # elements of that rounding (measured: at most 4e-6 of updates of 2.5e-3).
        torch.testing.assert_close(weights2[k], weights1[k], rtol=0, atol=1e-5, msg=k)
        update1, update2 = (weights1[k] - base[k]).flatten(), (weights2[k] - base[k]).flatten()
        assert torch.nn.functional.cosine_similarity(update1, update2, dim=0) > 0.99999, k
    for rank in two_workers["ranks"]:
        # Two layers and the root: one reduce-scatter each a step, not one each a micro-batch.
        assert rank["groups"] == 3
        assert rank["reduce_scatters"] == rank["groups"] * STEPS
        assert set(rank["gathered_dtypes"]) == {"torch.float32"}  # autocast off: fp32 all through


@pytest.fixture(scope="module")
def killed(shard) -> Path:
    """The output directory of a two-worker run killed after its checkpoint of step KILLED_AFTER;
    a copy of that checkpoint is left in `killed-copy/`."""
    out = shard.parent / "killed"
    with pytest.raises(mp.ProcessExitedException):
        run(shard, out, 2, kill_after=KILLED_AFTER)
    shutil.copytree(out / "checkpoint", shard.parent / "killed-copy" / "checkpoint")
    return out


def test_a_killed_run_resumes_from_its_sharded_checkpoint_to_the_uninterrupted_weights(shard, killed, two_workers):
    out = killed
    checkpoint = out / "checkpoint"
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint.pt").exists()
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir()}
    assert set(files) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.pt"}
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    assert len(state["history"]) == KILLED_AFTER and len(state["rng"]) == 2
    # Every weight (and moment) split in two, one half in each worker's file: no file holds the model.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    model_tensors = {fqn: md for fqn, md in metadata.state_dict_metadata.items()
                     if fqn.startswith("model.") and hasattr(md, "chunks")}
    assert len(model_tensors) >= 20
    for fqn, md in model_tensors.items():
        assert [c.sizes[0] for c in md.chunks] == [md.size[0] // 2] * 2, fqn
        assert {metadata.storage_data[index].relative_path for index in metadata.storage_data
                if index.fqn == fqn} == {"__0_0.distcp", "__1_0.distcp"}, fqn
    shard_bytes = [files["__0_0.distcp"], files["__1_0.distcp"]]
    assert max(shard_bytes) < 0.55 * sum(shard_bytes)

    resumed = run(shard, out, 2)
    assert [r["step"] for r in resumed["log"]] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed["log"], two_workers["log"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    for k, value in two_workers["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], value, rtol=0, atol=1e-7, msg=k)
    for rank, record in enumerate(resumed["ranks"]):
        reads = record["reads"]
        # Its own shards of the weights and moments: its file, about half of the checkpoint.
        assert reads.pop(f"__{rank}_0.distcp")["bytes"] == pytest.approx(shard_bytes[rank], rel=0.05)
        # Of another worker's file only what DCP stores once for all, wherever it put it: the
        # optimizer's hyperparameters and AdamW's step counts (scalars).
        others = [key for read in reads.values() for key in read["keys"]]
        assert all(key.startswith("optimizer.param_groups.") or key.endswith(".step") for key in others), others
        assert sum(read["bytes"] for read in reads.values()) < 0.01 * shard_bytes[1 - rank]
    assert not checkpoint.exists()  # removed once the policy is saved


def test_a_sharded_checkpoint_resumes_on_one_unsharded_worker(shard, killed, two_workers):
    # The worker count and the sharding are not part of the fingerprint: DCP gives one worker the whole state.
    resumed = run(shard, shard.parent / "killed-copy", 1)
    assert [r["step"] for r in resumed["log"]] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed["log"], two_workers["log"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    for k, value in two_workers["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], value, rtol=0, atol=1e-5, msg=k)
    assert set(resumed["ranks"][0]["reads"]) == {"__0_0.distcp", "__1_0.distcp"}


def test_a_sharded_worker_holds_half_the_weights_and_optimizer_state(one_worker, two_workers, record_property):
    whole = one_worker["ranks"][0]["bytes"]
    for rank, record in enumerate(two_workers["ranks"]):
        assert record["master_dtype"] == "torch.float32"
        for part in ("params", "optimizer"):
            assert record["bytes"][part] == pytest.approx(whole[part] / 2, rel=0.01), part
        record_property(f"peak_rss_mib_rank{rank}", record["peak_rss_mib"])
    record_property("peak_rss_mib_one_worker", one_worker["ranks"][0]["peak_rss_mib"])
    print("peak RSS (MiB): one worker", one_worker["ranks"][0]["peak_rss_mib"],
          "| FSDP ranks", [r["peak_rss_mib"] for r in two_workers["ranks"]],
          "| bytes: one worker", whole, "| FSDP ranks", [r["bytes"] for r in two_workers["ranks"]])


@pytest.mark.skipif(not native_bf16(), reason="bf16 matmuls are emulated (slow) on this CPU")
def test_bf16_weights_are_gathered_over_gloo_and_gradients_reduced_in_fp32(shard, one_worker):
    bf16 = run(shard, shard.parent / "bf16", 2, autocast="on", epochs=1, checkpoint_every=0)
    for record in bf16["ranks"]:
        assert set(record["gathered_dtypes"]) == {"torch.bfloat16"}  # weights gathered in bf16
        assert set(record["reduced_dtypes"]) == {"torch.float32"}  # gradients reduced in fp32
        assert record["master_dtype"] == record["grad_dtype"] == "torch.float32"
        assert record["bytes"]["params"] == pytest.approx(one_worker["ranks"][0]["bytes"]["params"] / 2, rel=0.01)
    # bf16 compute: close to the fp32 run, not equal to it.
    assert bf16["log"][0]["loss"] == pytest.approx(one_worker["log"][0]["loss"], rel=2e-2)
    assert all(v.dtype == torch.float32 for v in bf16["weights"].values())


# Lists of 2 or 3 items, 3 items a batch: 5 batches, so worker 1 has one forward fewer to run.
REFERENCE_LISTS = [([{"role": "user", "content": f"Say {i}."}], [f"Answer {j}. " * (i + 1) for j in range(2 + i % 2)])
                   for i in range(5)]


class PendingReference:
    """Stands in for a ReferenceJob: set_up only asks whether the reference is still to score."""

    def pending(self) -> bool:
        return True


def reference_worker(rank: int, world: int, port: int, cfg: LoopConfig) -> None:
    """set_up with a reference to score, its scoring replaced by REFERENCE_LISTS' (what it was given goes
    to <output_dir>/reference<rank>.json)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import stages.train.loop as loop
    from torch.distributed.fsdp import FSDPModule

    from core.timing import Timings
    from pools.logprob_scorer import score_lists

    seen = {}

    def score(job, model, tokenizer, train, rank, world, clock, started, sharded=False):
        forwards = []
        hook = model.register_forward_pre_hook(lambda *args: forwards.append(1))
        seen["logps"] = score_lists(model, tokenizer, REFERENCE_LISTS, train.max_length, 3, train.logprob_chunk_size,
                                    train.autocast, train.share_prompt, part=(rank, world), collective=sharded)
        hook.remove()
        seen.update(sharded=sharded, fsdp=isinstance(model, FSDPModule), forwards=len(forwards))

    loop.score_reference = score
    try:
        loop.set_up(cfg, Timings(), rank, world)
        (Path(cfg.output_dir) / f"reference{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_the_workers_score_the_reference_with_the_sharded_model(shard, tiny_model):
    from pools.logprob_scorer import load_policy, merge_parts, score_lists

    out = shard.parent / "reference"
    out.mkdir()
    cfg = LoopConfig(train=replace(TRAIN, sharding="fsdp"), seed=0, policy_in=str(MODEL), trust_remote_code=False,
                     train_shard=str(shard), output_dir=str(out), reference=PendingReference())
    mp.spawn(reference_worker, args=(2, free_port(), cfg), nprocs=2, join=True)
    seen = [json.loads((out / f"reference{rank}.json").read_text()) for rank in range(2)]
    assert all(s["fsdp"] and s["sharded"] for s in seen)  # scored after sharding
    assert seen[0]["forwards"] == seen[1]["forwards"] == 3  # 5 batches: worker 1 ran one, unscored, to keep up
    model, tokenizer = load_policy(str(tiny_model), TRAIN.dtype)
    whole = merge_parts([score_lists(model, tokenizer, REFERENCE_LISTS, TRAIN.max_length, 3, TRAIN.logprob_chunk_size,
                                     TRAIN.autocast, TRAIN.share_prompt)])
    shared = merge_parts([s["logps"] for s in seen])
    for ours, theirs in zip(shared, whole, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-5)
