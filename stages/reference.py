"""Reference log-probs of every list item, stored beside the lists.

The trainer then holds no reference model: it reads `ref_logp` from the
train shard. Scoring runs in one Ray task through the trainer's own code
(`stages.train.data`, `stages.train.logprobs`) and dtype, so that
log pi_theta - log pi_ref is exactly zero before the first update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline import schema, timing
from pipeline.hardware import cluster_has_gpus
from pipeline.layout import read_parquet_dir, shard_name, write_parquet


def reference_logprobs(model_path: str, requests: list[tuple[list[dict], str]], dtype: str, max_length: int,
                       batch_size: int, chunk_size: int, trust_remote_code: bool = False,
                       autocast_setting: str = "off") -> list[float]:
    """log pi(response | prompt) for each (messages, response), in the given order."""
    with timing.timed("startup"):
        import torch
        from tqdm import tqdm

        from stages.train.data import autocast, load_policy, pad_token_id, use_all_cpu_threads
        from stages.train.logprobs import collate, sequence_logprobs, tokenize_example

        use_all_cpu_threads()
        model, tokenizer = load_policy(model_path, dtype, trust_remote_code)
        model.eval()
    with timing.timed("work"), torch.no_grad(), autocast(autocast_setting):
        examples = [tokenize_example(tokenizer, messages, response, max_length) for messages, response in requests]
        # Similar lengths in a batch waste less compute on padding.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
        results = [0.0] * len(examples)
        for start in tqdm(range(0, len(order), batch_size), desc="reference log-probs", unit="batch"):
            index = order[start:start + batch_size]
            batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in index],
                                                               pad_token_id(tokenizer)).items()}
            for i, value in zip(index, sequence_logprobs(model, batch, chunk_size).tolist()):
                results[i] = value
    return results


@ray.remote
def score_items(*args, **kwargs) -> tuple[list[float], dict[str, float]]:
    """reference_logprobs as a Ray task, so the model's memory is released when scoring ends;
    returns the log-probs and the task's own timings."""
    timings = timing.Timings()
    with timings.active():
        return reference_logprobs(*args, **kwargs), timings.seconds


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    with timing.timed("io"):
        rows = read_parquet_dir(plan.round.lists).to_pylist()
    requests = [(row["prompt"], item["response"]) for row in rows for item in row["positives"] + row["negatives"]]
    gpus = 1 if cluster_has_gpus() else 0
    logps: list[float] = []
    if requests:
        logps, seconds = ray.get(score_items.options(num_gpus=gpus).remote(
            plan.reference, requests, config.train.dtype, config.train.max_length, config.reference.batch_size,
            config.train.logprob_chunk_size, config.model.trust_remote_code, config.train.autocast))
        timing.add(seconds)
    values = iter(logps)
    for row in rows:
        row["positives"] = [{**item, "ref_logp": next(values)} for item in row["positives"]]
        row["negatives"] = [{**item, "ref_logp": next(values)} for item in row["negatives"]]
        row["reference"] = plan.reference
    with timing.timed("io"):
        write_parquet(pa.Table.from_pylist(rows, schema=schema.TRAIN), out_dir / shard_name(0))
    return {"lists": len(rows), "items": len(requests), "reference": plan.reference}
