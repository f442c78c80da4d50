"""The vLLM engine pool: each engine in its own Ray actor, a contiguous shard of the prompts each.

Generate (K samples per training prompt) and evaluate (one answer per held-out
prompt) both sample through `generate_shards`. A shard is the unit of
resumption: a re-run keeps the shards that were written and regenerates the
rest. The actors are killed when the call ends, so the engines' memory is free
before training starts.

With several temperatures (`generate.temperatures`), the K samples of a prompt
are split into consecutive blocks of sample indices, one block per temperature
in the configured order, as evenly as possible: the first K mod T temperatures
take one sample more (K=5 over [0.6, 1.0] gives samples 0-2 at 0.6 and 3-4 at
1.0). Each block is one vLLM request with `n` samples and its own
SamplingParams, and every candidate row records its temperature.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import ray

from pipeline import timing
from pipeline.console import engine_bar
from pipeline.errors import PipelineError
from pipeline.hardware import cluster_has_gpus, native_bf16
from pipeline.layout import atomic_write_json, shard_name, write_parquet
from pipeline.prompts import Prompt

log = logging.getLogger("pipeline.generate")


@dataclass(frozen=True)
class SamplingSpec:
    num_samples: int
    temperature: float
    top_p: float
    max_tokens: int
    # Temperatures that share the num_samples (see split_samples); empty: all at `temperature`.
    temperatures: tuple[float, ...] = ()

    def blocks(self) -> list[tuple[float, int]]:
        return split_samples(self.num_samples, list(self.temperatures) or [self.temperature])


def split_samples(num_samples: int, temperatures: list[float]) -> list[tuple[float, int]]:
    """(temperature, samples) blocks, in order, as even as possible; blocks of 0 samples are left out."""
    base, extra = divmod(num_samples, len(temperatures))
    blocks = [(temperature, base + (i < extra)) for i, temperature in enumerate(temperatures)]
    return [(temperature, count) for temperature, count in blocks if count]


def group_samples(outputs: list[Any], blocks: list[tuple[float, int]]) -> list[list[dict]]:
    """vLLM's outputs (one per prompt and block, prompt-major) as each prompt's samples, in block order."""
    per_prompt = len(blocks)
    grouped = []
    for start in range(0, len(outputs), per_prompt):
        samples = []
        for out, (temperature, _) in zip(outputs[start:start + per_prompt], blocks, strict=True):
            samples += [{"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": str(c.finish_reason),
                         "temperature": temperature} for c in out.outputs]
        grouped.append(samples)
    return grouped


@ray.remote
class GenerationWorker:
    """One vLLM engine. Only this actor imports vllm, so the driver stays light."""

    def __init__(self, model_path: str, engine_args: dict[str, Any]):
        self.clock = timing.Timings()
        with self.clock("startup"):
            from vllm import LLM

            if engine_args["dtype"] == "auto":
                engine_args = {**engine_args, "dtype": "bfloat16" if native_bf16() else "float32"}
            self.llm = LLM(model=model_path, **engine_args)

    def generate(self, conversations: list[list[dict[str, str]]], spec: SamplingSpec) -> list[list[dict]]:
        from vllm import SamplingParams

        # Per-request seeds fail on CPU (vLLM's CPU generator has no offset);
        # the engine-level seed makes sampling reproducible instead.
        blocks = spec.blocks()
        params = [SamplingParams(n=count, temperature=temperature, top_p=spec.top_p, max_tokens=spec.max_tokens)
                  for temperature, count in blocks]
        # One request per (prompt, temperature block); chat() takes one SamplingParams per request.
        requests = [conversation for conversation in conversations for _ in blocks]
        with self.clock("work"):
            outputs = self.llm.chat(requests, params * len(conversations), use_tqdm=engine_bar)
        return group_samples(outputs, blocks)

    def timings(self) -> dict[str, float]:
        return self.clock.seconds


def engine_args(config, seed: int, use_gpu: bool) -> dict[str, Any]:
    gen = config.generate
    args: dict[str, Any] = dict(dtype=gen.dtype, seed=seed, max_model_len=config.model.max_model_len,
                                enforce_eager=gen.enforce_eager, trust_remote_code=config.model.trust_remote_code,
                                tensor_parallel_size=gen.tensor_parallel_size)
    if use_gpu:
        args["gpu_memory_utilization"] = gen.gpu_memory_utilization
    return args


def worker_options(config, use_gpu: bool) -> dict[str, Any]:
    gen = config.generate
    if use_gpu:
        return {"num_gpus": gen.tensor_parallel_size, "num_cpus": 1}
    # On CPU the engine's threads are what matter; the Ray CPU count only schedules.
    threads = max(1, (os.cpu_count() or 1) // gen.num_actors)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(gen.cpu_kv_cache_gib), "OMP_NUM_THREADS": str(threads),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {"num_cpus": 1, "runtime_env": {"env_vars": env}}


def generate_shards(prompts: list[Prompt], model_path: str, spec: SamplingSpec, config, out_dir: Path,
                    seed: int, make_table: Callable[[list[Prompt], list[list[dict]]], pa.Table]) -> dict[str, Any]:
    """Write one shard per engine (`make_table` turns its outputs into rows); shards on disk are kept."""
    num_shards = shard_count(out_dir, [p.prompt_id for p in prompts], min(config.generate.num_actors, len(prompts)))
    chunks = [prompts[i::num_shards] for i in range(num_shards)]
    todo = [i for i in range(num_shards) if not (out_dir / shard_name(i)).exists()]
    use_gpu = cluster_has_gpus()
    start = time.perf_counter()
    workers: dict[int, Any] = {}
    retries = {i: 0 for i in todo}

    def submit(i: int) -> Any:
        # The same engine seed for a replacement: a redone shard samples what the lost one would have.
        workers[i] = GenerationWorker.options(**worker_options(config, use_gpu)).remote(
            model_path, engine_args(config, seed + i, use_gpu))
        return workers[i].generate.remote([p.messages for p in chunks[i]], spec)

    try:
        pending = {submit(i): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                outputs = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                retries[index] += 1
                if retries[index] > config.worker_retries:
                    raise PipelineError(f"the vLLM engine of shard {index} died {retries[index]} times "
                                        f"(worker_retries is {config.worker_retries}); last: "
                                        f"{str(exc).splitlines()[0]}") from None
                log.warning("generate: the vLLM engine of shard %d died; starting another (retry %d of %d); "
                            "finished shards are kept", index, retries[index], config.worker_retries)
                pending[submit(index)] = index
                continue
            with timing.timed("io"):
                write_parquet(make_table(chunks[index], outputs), out_dir / shard_name(index))
        timing.add_slowest(ray.get([worker.timings.remote() for worker in workers.values()]))
    finally:
        for worker in workers.values():
            ray.kill(worker)
    seconds = time.perf_counter() - start
    return {"shards_generated": len(todo), "generate_seconds": round(seconds, 2),
            "engine_retries": sum(retries.values())}


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
