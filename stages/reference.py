"""Reference log-probs of every list item, stored beside the lists.

The trainer then holds no reference model: it reads `ref_logp` from the
train shard. Scoring runs in one Ray task through the trainer's own code
(`stages.train.data`, `stages.train.logprobs`), dtype and batch layout
(`train.share_prompt`), so that log pi_theta - log pi_ref is zero, to fp32
rounding, before the first update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline import schema, timing
from pipeline.hardware import cluster_has_gpus
from pipeline.layout import EARLIER_ROUNDS, read_parquet_dir, shard_name, write_parquet


def list_batches(sizes: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of lists, grouped so that a batch holds about ``batch_size`` items (at least one
    list); lists of similar token counts go together, which wastes less compute on padding."""
    batches, current, items = [], [], 0
    for index in sorted((i for i in range(len(sizes)) if sizes[i]), key=lambda i: lengths[i]):
        if current and items + sizes[index] > batch_size:
            batches.append(current)
            current, items = [], 0
        current.append(index)
        items += sizes[index]
    return batches + [current] if current else batches


def reference_logprobs(model_path: str, lists: list[tuple[list[dict], list[str]]], dtype: str, max_length: int,
                       batch_size: int, chunk_size: int, trust_remote_code: bool = False,
                       autocast_setting: str = "off", share_prompt: bool = True) -> list[list[float]]:
    """log pi(response | prompt) of each response of each (messages, responses) list, in order."""
    with timing.timed("startup"):
        import torch
        from tqdm import tqdm

        from stages.train.data import autocast, load_policy, pad_token_id, use_all_cpu_threads
        from stages.train.logprobs import list_batch, sequence_logprobs, tokenize_example

        use_all_cpu_threads()
        model, tokenizer = load_policy(model_path, dtype, trust_remote_code)
        model.eval()
    with timing.timed("work"), torch.no_grad(), autocast(autocast_setting):
        tokens = [[tokenize_example(tokenizer, messages, response, max_length) for response in responses]
                  for messages, responses in lists]
        batches = list_batches([len(items) for items in tokens],
                               [sum(len(ids) for ids, _ in items) for items in tokens], batch_size)
        results: list[list[float]] = [[] for _ in lists]
        pad = pad_token_id(tokenizer)
        for index in tqdm(batches, desc="reference log-probs", unit="batch"):
            batch = list_batch([tokens[i] for i in index], pad, share_prompt)
            values = iter(sequence_logprobs(model, {k: v.to(model.device) for k, v in batch.items()}, chunk_size).tolist())
            for i in index:
                results[i] = [next(values) for _ in tokens[i]]
    return results


@ray.remote
def score_items(*args, **kwargs) -> tuple[list[float], dict[str, float]]:
    """reference_logprobs as a Ray task, so the model's memory is released when scoring ends;
    returns the log-probs and the task's own timings."""
    timings = timing.Timings()
    with timings.active():
        return reference_logprobs(*args, **kwargs), timings.seconds


def replayed_lists(plan) -> list[dict[str, Any]]:
    """The lists of the earlier rounds `train.replay` names, each row marked with its round."""
    rows = []
    for earlier in EARLIER_ROUNDS[plan.config.train.replay](plan.round.number):
        rows += [{**row, "round": earlier} for row in read_parquet_dir(plan.run.round(earlier).lists).to_pylist()]
    return rows


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    with timing.timed("io"):
        current = [{**row, "round": plan.round.number} for row in read_parquet_dir(plan.round.lists).to_pylist()]
        # Scored below under this round's reference, as the current lists are: the log-probs
        # stored with them in their own round were under that round's reference.
        rows = current + replayed_lists(plan)
    lists = [(row["prompt"], [item["response"] for item in row["positives"] + row["negatives"]]) for row in rows]
    gpus = 1 if cluster_has_gpus() else 0
    logps: list[list[float]] = []
    if rows:
        # Ray runs the task again in a new process when its process dies (a system failure).
        logps, seconds = ray.get(score_items.options(num_gpus=gpus, max_retries=config.worker_retries).remote(
            plan.reference, lists, config.train.dtype, config.train.max_length, config.reference.batch_size,
            config.train.logprob_chunk_size, config.model.trust_remote_code, config.train.autocast,
            config.train.share_prompt))
        timing.add(seconds)
    for row, values in zip(rows, logps):
        values = iter(values)
        row["positives"] = [{**item, "ref_logp": next(values)} for item in row["positives"]]
        row["negatives"] = [{**item, "ref_logp": next(values)} for item in row["negatives"]]
        row["reference"] = plan.reference
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.TRAIN), out_dir / shard_name(0))
    return {"lists": len(rows), "lists_current": len(current), "lists_replayed": len(rows) - len(current),
            "items": sum(len(responses) for _, responses in lists), "reference": plan.reference}
