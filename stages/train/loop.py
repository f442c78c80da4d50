"""The training loop one Ray Train worker runs: LarPO objectives over ranked lists.

Data parallelism is explicit rather than through DDP: each worker takes its
share of every global batch, weights its per-example losses by
1 / global batch size, and the gradients are summed across workers before the
step. That gives the same update for any number of workers and lets the
forward pass call into the model however the log-prob code needs.

Under FSDP (`train.sharding: fsdp`) the workers run FSDP2 as GPU users do:
each decoder layer's weights are gathered in bf16 where the forward passes
compute in bf16 (`mixed_precision`), gradients are reduced in fp32 into fp32
master weights (train.dtype), and only after a step's last micro-batch: the
others accumulate each worker's unsharded fp32 gradients (a full model's worth
per worker, the price of reducing once a step instead of once a micro-batch).
Checkpoints are sharded (stages/train/checkpoint.py), and a reference scored
here is scored by the sharded model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config import TrainConfig
from core.errors import PipelineError, TrainingDiverged
from core.gpu_layout import where_this_runs
from core.objectives import OBJECTIVES, REFERENCE_FREE, mean_margin, objective_options, ranking_accuracy
from core.progress import worker_bar
from core.timing import Timings
from pools.logprob_scorer import (DTYPES, autocast, autocast_enabled, check_logprob_path, load_policy, pad_token_id,
                                  use_all_cpu_threads)
from pools.logprobs import list_batch, sequence_logprobs
from stages.reference.in_train_workers import ReferenceJob, score_reference
from stages.train.checkpoint import TrainingCheckpoint, fingerprint, first_non_finite
from stages.train.data import ListExample, add_lora, build_examples, use_sparse_embedding_grad
from stages.train.optim import build_optimizer


# Rank 0's start-up, I/O, work and save seconds, for the driver to add to the stage's (stages/train/stage.py).
TIMINGS_FILE = "_timings.json"


def list_scores(model, examples: list[ListExample], tokenizer, objective: str, beta: float,
                chunk_size: int, share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [B, K] (beta * log-ratio, or beta * mean log-prob for reference-free
    objectives), the mask of real items, and the rewards, padded at the end."""
    batch = list_batch([example.tokens for example in examples], pad_token_id(tokenizer), share_prompt)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    reference_free = objective in REFERENCE_FREE
    logps = sequence_logprobs(model, batch, chunk_size, average=reference_free)
    width = max(len(example.tokens) for example in examples)
    scores = logps.new_zeros(len(examples), width)
    mask = torch.zeros(len(examples), width, dtype=torch.bool, device=logps.device)
    rewards = logps.new_zeros(len(examples), width)
    offset = 0
    for row, example in enumerate(examples):
        k = len(example.tokens)
        ref = 0.0 if reference_free else torch.tensor(example.ref_logps, dtype=logps.dtype, device=logps.device)
        scores[row, :k] = beta * (logps[offset:offset + k] - ref)
        mask[row, :k] = True
        rewards[row, :k] = torch.tensor(example.rewards, dtype=logps.dtype, device=logps.device)
        offset += k
    return scores, mask, rewards


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def global_batches(num_examples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: a fresh seeded shuffle each epoch."""
    batches = []
    for epoch in range(epochs):
        order = list(range(num_examples))
        random.Random(seed + epoch).shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    return batches


def mixed_precision(train: TrainConfig):
    """FSDP2's precision: the weights a layer gathers to run are bf16 where the forward passes
    compute in bf16 (train.autocast on, or auto on hardware with native bf16; half the bytes to
    gather), train.dtype otherwise; gradients are reduced in fp32, and the sharded weights the
    optimizer updates (the master weights) stay in train.dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    param_dtype = torch.bfloat16 if autocast_enabled(train.autocast) else DTYPES[train.dtype]
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard_model(model, policy=None) -> None:
    """FSDP2: each decoder layer, then the whole model, holds 1/world of its weights,
    gradients and optimizer state; layers gather their weights only while they run,
    in `policy`'s precision (a MixedPrecisionPolicy; None: FSDP's default, all in the weights' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = policy or MixedPrecisionPolicy()
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def micro_batches(mine: list[int], micro_batch_size: int, count: int) -> list[tuple[list[int], float]]:
    """This worker's micro-batches of a step, padded to `count` with zero-weight repeats.

    Under FSDP every forward and backward is a collective, so every worker must
    run as many micro-batches as the busiest one, even with nothing of its own to train.
    """
    batches = [(mine[i:i + micro_batch_size], 1.0) for i in range(0, len(mine), micro_batch_size)]
    return batches + [([0], 0.0)] * (count - len(batches))


@dataclass(frozen=True)
class LoopConfig:
    """What every training worker is given: the typed train config and the round's inputs."""

    train: TrainConfig
    seed: int
    policy_in: str
    trust_remote_code: bool
    train_shard: str
    output_dir: str
    # The reference stage, when these workers score it before training (the round plan's
    # reference_in_train_workers; stages/reference/in_train_workers.py).
    reference: ReferenceJob | None = None


@dataclass
class Trainer:
    """What set-up builds once and every step uses."""

    cfg: LoopConfig
    rank: int
    world: int
    sharded: bool
    model: Any
    tokenizer: Any
    params: list
    examples: list[ListExample]
    steps: list[list[int]]
    optimizer: Any
    scheduler: Any
    checkpoints: TrainingCheckpoint
    history: list[dict[str, float]]


def set_up(cfg: LoopConfig, clock: Timings, rank: int | None = None, world: int | None = None) -> Trainer:
    """Model, data, optimizer and any in-training checkpoint, with their time on `clock`.

    `rank` and `world` are Ray Train's unless given (a process group of one's own, as in tests).
    """
    import pyarrow.parquet as pq

    if rank is None or world is None:
        import ray.train

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        # Into the stage's log (stderr is captured there), not onto the terminal.
        print(f"train worker {rank} of {world} runs on {where_this_runs()}", file=sys.stderr, flush=True)
    train = cfg.train
    sharded = train.sharding == "fsdp" and world > 1
    # Scoring the reference here, the model load is the reference stage's start-up.
    scores_reference = cfg.reference is not None and cfg.reference.pending()
    load_clock, started = (Timings() if scores_reference else clock), time.perf_counter()
    with load_clock("startup"):
        use_all_cpu_threads()
        if world > 1 and not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch.get_num_threads() // world))
        torch.manual_seed(cfg.seed)
        # Weights first: the log-prob check on a model with NaN weights would blame its family.
        model, tokenizer = load_policy(cfg.policy_in, train.dtype, cfg.trust_remote_code, check=False)
        check_starting_weights(model, cfg.policy_in)
        check_logprob_path(model, tokenizer, cfg.policy_in)
    if scores_reference and not sharded:
        score_reference(cfg.reference, model, tokenizer, train, rank, world, load_clock, started)
    # Under FSDP the reference is scored once the model is sharded, so no worker holds all of it
    # longer than loading takes; sharding is then part of the reference stage's start-up.
    with (load_clock if scores_reference and sharded else clock)("startup"):
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.lora_rank:
            model = add_lora(model, train.lora_rank, train.lora_alpha, train.lora_dropout, train.lora_target_modules)
        if sharded:
            shard_model(model, mixed_precision(train))
        elif not train.lora_rank:
            use_sparse_embedding_grad(model)
    if scores_reference and sharded:
        score_reference(cfg.reference, model, tokenizer, train, rank, world, load_clock, started, sharded=True)
    with clock("startup"):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
    with clock("io"):
        rows = pq.read_table(cfg.train_shard).to_pylist()
    with clock("work"):
        examples = build_examples(rows, tokenizer, train.max_length, train.max_list_size)
    steps = global_batches(len(examples), train.batch_size, train.epochs, cfg.seed)
    with clock("startup"):
        optimizer = build_optimizer(train.optimizer, params, train.learning_rate, train.weight_decay, seed=cfg.seed)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(int(train.warmup_ratio * len(steps)), len(steps)))
        checkpoints = TrainingCheckpoint(Path(cfg.output_dir) / "checkpoint",
                                         fingerprint(dataclasses.asdict(cfg), len(examples)), sharded, rank, world)
        history = checkpoints.restore(model, optimizer, scheduler)
    return Trainer(cfg, rank, world, sharded, model, tokenizer, params, examples, steps, optimizer, scheduler,
                   checkpoints, history)


def check_starting_weights(model, policy_in: str) -> None:
    """Refuse a starting policy with a NaN or infinite weight: every step from it would diverge.
    Every worker loads the whole model, so all of them reach the same answer without a collective."""
    bad = first_non_finite(model.named_parameters())
    if bad:
        name, count = bad
        raise PipelineError(f"policy {policy_in}: weight {name} holds {count} NaN or infinite values, so it cannot "
                            "be trained; check model.name, or start a new run if it is a diverged round's policy")


def lower_the_rate(train: TrainConfig) -> str:
    """What to change after a divergence, for the end of a one-line error."""
    return (f"train.learning_rate={train.learning_rate} is likely too high; lower it or train.beta and run the "
            "round again (a diverged train stage keeps nothing)")


def divergence(step: int, total: int, loss: float, grad_norm: float, train: TrainConfig) -> str | None:
    """Why training must stop at `step` (1-based, of `total`), in one line naming the value that is not
    finite and the key to change; None when the step's loss and gradient norm are finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm} (loss {loss:.4g})"
    # Before the first update the weights are the starting policy's, checked finite at load: the scores
    # themselves overflow, which the learning rate cannot have caused.
    cause = (f"no update was applied yet, so train.beta={train.beta} is likely too high for "
             f"train.dtype={train.dtype}; lower it" if step == 1 else lower_the_rate(train))
    return f"training diverged at step {step} of {total}: {what}; {cause}"


def train_step(trainer: Trainer, indices: list[int]) -> dict[str, float]:
    """One optimizer step over a global batch; its metrics, read from the device once.

    A step whose loss or gradient norm is not finite raises TrainingDiverged before the optimizer
    applies it. It stops at the first such step rather than skipping a few: a skipped step hides a
    learning rate or beta that is too high, the steps after one diverge as well, and a retry would
    repeat it (same data, seed and settings)."""
    train, world = trainer.cfg.train, trainer.world
    objective, options = OBJECTIVES[train.objective], objective_options(train)
    mine = indices[trainer.rank::world]
    count = math.ceil(math.ceil(len(indices) / world) / train.micro_batch_size) if trainer.sharded else 0
    # Losses are divided by the global batch size, and the workers' gradients must add
    # up; FSDP averages them over workers instead (gloo has no pre-scaled sum), so undo it.
    scale = world / len(indices) if trainer.sharded else 1 / len(indices)
    # Summed on the device, read back once after the step: a read per micro-batch would sync each time.
    device = trainer.params[0].device
    loss = accuracy = margin = torch.zeros((), dtype=torch.float64, device=device)
    examples = tokens = 0.0
    batches = micro_batches(mine, train.micro_batch_size, count)
    for index, (micro_indices, weight) in enumerate(batches):
        if trainer.sharded:
            # FSDP reduce-scatters the gradients once a step, in the last micro-batch's backward;
            # the backward passes before it add to each worker's unsharded gradients.
            trainer.model.set_requires_gradient_sync(index == len(batches) - 1)
        micro = [trainer.examples[i] for i in micro_indices]
        with autocast(train.autocast):
            scores, mask, rewards = list_scores(trainer.model, micro, trainer.tokenizer, train.objective, train.beta,
                                                train.logprob_chunk_size, train.share_prompt)
        losses = objective(scores.float(), mask, rewards=rewards.float(), **options)
        (weight * scale * losses.sum()).backward()
        with torch.no_grad():
            loss = loss + weight * losses.detach().sum().double()
            accuracy = accuracy + weight * ranking_accuracy(scores, mask).sum().double()
            margin = margin + weight * mean_margin(scores, mask).detach().sum().double()
        examples += weight * len(micro)
        tokens += weight * sum(len(ids) for e in micro for ids, _ in e.tokens)
    totals = torch.stack([loss, accuracy, margin, torch.tensor(examples, dtype=torch.float64, device=device),
                          torch.tensor(tokens, dtype=torch.float64, device=device)])
    if world > 1:
        if not trainer.sharded:
            # Every worker reduces every gradient, in the same order, even one whose
            # share of a short last batch was empty: a skipped collective would hang the rest.
            for param in trainer.params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad)
        dist.all_reduce(totals)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.params, train.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    # Read before the update rather than after it, so a non-finite value never reaches the weights.
    # The totals and the norm are the all-reduced ones: every worker reads the same and stops alike.
    loss, accuracy, margin, examples, tokens, norm = \
        torch.cat([totals, grad_norm.detach().double().to(device).reshape(1)]).tolist()
    problem = divergence(len(trainer.history) + 1, len(trainer.steps), loss / examples, norm, train)
    if problem:
        raise TrainingDiverged(problem)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss / examples, "ranking_accuracy": accuracy / examples, "margin": margin / examples,
            "grad_norm": norm, "learning_rate": trainer.scheduler.get_last_lr()[0], "tokens": tokens}


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry point on every worker: `config["loop"]` is the round's LoopConfig."""
    import ray.train

    ray.train.report({"steps": train_and_save(config["loop"])})


def train_and_save(cfg: LoopConfig, rank: int | None = None, world: int | None = None) -> int:
    """One worker's training, from any in-training checkpoint to the saved policy; the steps done.
    `rank` and `world`: as for `set_up`."""
    # Rank 0's clock: the workers wait for each other at every collective, so one speaks for all.
    clock = Timings()
    trainer = set_up(cfg, clock, rank, world)
    history, steps = trainer.history, trainer.steps
    progress = worker_bar(steps, desc="train", unit="step", disable=trainer.rank != 0, initial=len(history))
    for step in range(len(history), len(steps)):
        start = time.perf_counter()
        metrics = train_step(trainer, steps[step])
        seconds = time.perf_counter() - start
        clock.add({"work": seconds})
        tokens = metrics.pop("tokens")
        history.append({"step": step + 1, **metrics, "tokens_per_second": tokens / seconds, "seconds": seconds})
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['ranking_accuracy']:.2f}")
        every = cfg.train.checkpoint_every
        if every and (step + 1) % every == 0 and step + 1 < len(steps):
            with clock("save"):
                trainer.checkpoints.save(trainer.model, trainer.optimizer, trainer.scheduler, history)
    progress.close()
    output_dir = Path(cfg.output_dir)
    with clock("save"):
        save_policy(trainer.model, trainer.tokenizer, cfg.train, output_dir, trainer.rank, trainer.sharded)
    if trainer.rank == 0:
        with (output_dir / "training_log.jsonl").open("w") as f:
            for record in history:
                f.write(json.dumps(record) + "\n")
        trainer.checkpoints.remove()
        # Ray Train V2 keeps reported metrics only beside a checkpoint: the driver reads this file instead.
        (output_dir / TIMINGS_FILE).write_text(json.dumps(clock.seconds))
    return len(history)


def check_saved_weights(state: dict[str, torch.Tensor], train: TrainConfig, output_dir: Path) -> None:
    """Refuse to write a policy with a NaN or infinite weight: the next round would sample from it."""
    bad = first_non_finite(state.items())
    if bad:
        name, count = bad
        raise TrainingDiverged(f"policy not saved to {output_dir}: weight {name} holds {count} NaN or infinite "
                               f"values after training; {lower_the_rate(train)}")


def save_policy(model, tokenizer, train: TrainConfig, output_dir: Path, rank: int, sharded: bool) -> None:
    """Rank 0 writes the HF checkpoint (LoRA merged, in train.save_dtype); under FSDP
    every worker takes part in gathering the full weights first. Weights that are not finite
    are refused (TrainingDiverged) before anything is written."""
    save_dtype = DTYPES[train.save_dtype]
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            # Tied weights (lm_head = embed_tokens) come back as two tensors; save the source only,
            # as save_pretrained does for an unsharded model.
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            state = {name: tensor.to(save_dtype) for name, tensor in state.items() if name not in tied}
            # The gathered copy, as written: only rank 0 raises, and no collective follows the save.
            check_saved_weights(state, train, output_dir)
            model.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
    elif rank == 0:
        if train.lora_rank:
            model = model.merge_and_unload()
        model = model.to(save_dtype)
        check_saved_weights(model.state_dict(), train, output_dir)
        model.save_pretrained(output_dir, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(output_dir)


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    if not history:
        return {"steps": 0}
    mean = lambda key: sum(r[key] for r in history) / len(history)  # noqa: E731
    return {
        "steps": len(history), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
        "loss_mean": mean("loss"), "ranking_accuracy_mean": mean("ranking_accuracy"),
        "ranking_accuracy_last": history[-1]["ranking_accuracy"], "margin_last": history[-1]["margin"],
        "tokens_per_second": mean("tokens_per_second"), "train_seconds": sum(r["seconds"] for r in history),
    }
