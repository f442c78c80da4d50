"""Retrieve: sample K responses per prompt from the round's starting policy with vLLM.

The engines, their shards and their temperature blocks are pools/vllm_engines.py's;
this stage turns their samples into candidate rows (schema.CANDIDATES) and writes
them, one Parquet shard per engine (`generate_shards`, which evaluate uses too).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from core import schema, timing
from core.errors import PipelineError
from core.layout import atomic_write_json, read_parquet_dir, shard_name, write_parquet
from core.prompts import Prompt
from core.retries import WorkerRetries
from core.seeds import derive_seed
from pools.vllm_engines import EnginePool, SamplingSpec, sample_shards


def generate_shards(prompts: list[Prompt], model_path: str, spec: SamplingSpec, config, out_dir: Path, seed: int,
                    make_table: Callable[[list[Prompt], list[list[dict]]], pa.Table],
                    engines: EnginePool | None = None, stage: str = "generate") -> dict[str, Any]:
    """Sample `prompts` on the engines and write one shard per engine as it finishes (`make_table`
    turns a shard's samples into its rows); shards already on disk are kept, not sampled again.

    `engines` is the command's pool (kept engines); without one, the call starts its own and
    kills them at its end. `stage` names the call in the log line of a dead engine.
    """
    engines = engines if engines is not None else EnginePool(config, keep=False)
    num_shards = shard_count(out_dir, [p.prompt_id for p in prompts], min(config.generate.num_actors, len(prompts)))
    done = {i for i in range(num_shards) if (out_dir / shard_name(i)).exists()}
    retries = WorkerRetries(stage, "engine", config.worker_retries)
    start = time.perf_counter()
    shards = sample_shards(engines, prompts, num_shards, done, model_path, spec, seed, retries)
    # Closed when a write fails, so that the pool stops the engines still sampling.
    with contextlib.closing(shards):
        for index, chunk, outputs in shards:
            with timing.timed("io"):
                write_parquet(make_table(chunk, outputs), out_dir / shard_name(index))
    seconds = time.perf_counter() - start
    return {"shards_generated": num_shards - len(done), "generate_seconds": round(seconds, 2), **retries.stats(),
            "engines_kept": engines.keep}


def shard_count(out_dir: Path, prompt_ids: list[str], wanted: int) -> int:
    """How many shards this output is split into, fixed when it was first started.

    Shards on disk are only reusable under the split that made them: a re-run
    with another `generate.num_actors` would otherwise assign prompts to shards
    differently and duplicate some rows and lose others. `_shards.json` (pyarrow,
    pandas and DuckDB skip `_` files) records the split; shards written for
    other prompts are removed.
    """
    layout_file = out_dir / "_shards.json"
    if layout_file.is_file():
        layout = json.loads(layout_file.read_text())
        if layout.get("prompt_ids") == prompt_ids:
            return int(layout["num_shards"])
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    atomic_write_json(layout_file, {"num_shards": wanted, "prompt_ids": prompt_ids})
    return wanted


def candidate_rows(prompts: list[Prompt], outputs: list[list[dict]], round_number: int,
                   policy: str) -> list[dict[str, Any]]:
    rows = []
    for prompt, samples in zip(prompts, outputs, strict=True):
        metadata = json.dumps(prompt.metadata, sort_keys=True)
        for index, sample in enumerate(samples):
            rows.append({
                "prompt_id": prompt.prompt_id, "prompt": prompt.messages, "response": sample["text"],
                "sample_index": index, "round": round_number, "policy": policy,
                "temperature": sample["temperature"], "num_tokens": sample["num_tokens"],
                "finish_reason": sample["finish_reason"], "metadata": metadata,
                "response_token_ids": sample["token_ids"],
            })
    return rows


def check_not_all_empty(responses: list[str], round_number: int, policy: str) -> None:
    """Stop before rerank when every candidate of the round is empty: nothing could be ranked, the
    round would train no step and pass its policy on unchanged. Round 1 samples the base model; a
    later round the policy the round before trained (collapsed, when its evaluation was off)."""
    if not responses or any(response.strip() for response in responses):
        return
    if round_number == 1:
        what = f"the starting model {policy} answers nothing; check model.name, its chat template and generate.*"
    else:
        what = (f"training collapsed round {round_number - 1}'s policy {policy}; see its training_log.jsonl (and "
                "the trackers) for the loss and ranking accuracy, and start a new run with a lower "
                "train.learning_rate")
    raise PipelineError(f"round {round_number}: every one of the {len(responses)} candidates is empty: {what}")


def run_stage(plan, out_dir: Path) -> dict[str, Any]:
    config = plan.config
    spec = SamplingSpec(config.generate.num_samples, config.generate.temperature, config.generate.top_p,
                        config.generate.max_tokens, tuple(config.generate.temperatures))
    seed = derive_seed(config.seed, "generate", plan.round.number)
    def make_table(prompts: list[Prompt], outputs: list[list[dict]]) -> pa.Table:
        rows = candidate_rows(prompts, outputs, plan.round.number, plan.policy_in)
        return pa.Table.from_pylist(rows, schema=schema.CANDIDATES)

    stats = generate_shards(plan.prompts, plan.policy_in, spec, config, out_dir, seed, make_table, plan.engines)
    with timing.timed("io"):
        table = read_parquet_dir(out_dir)
    check_not_all_empty(table.column("response").to_pylist(), plan.round.number, plan.policy_in)
    tokens = sum(table.column("num_tokens").to_pylist())
    reasons = table.column("finish_reason").to_pylist()
    return {
        **stats,
        "prompts": len(plan.prompts),
        "candidates": table.num_rows,
        "tokens": tokens,
        "tokens_per_second": round(tokens / stats["generate_seconds"], 1) if stats["generate_seconds"] else None,
        "finish_reasons": {r: reasons.count(r) for r in sorted(set(reasons))},
        "samples_per_temperature": {str(temperature): count for temperature, count in spec.blocks()},
        "policy": plan.policy_in,
    }
