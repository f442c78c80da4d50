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
            # token_ids end with the stop token the engine emitted (eos, or a generation_config
            # stop id such as Gemma's <end_of_turn>) when it stopped on one, and with nothing
            # extra when it hit max_tokens: exactly what the reference and the trainer score.
            samples += [{"text": c.text, "num_tokens": len(c.token_ids), "finish_reason": str(c.finish_reason),
                         "token_ids": list(c.token_ids), "temperature": temperature} for c in out.outputs]
        grouped.append(samples)
    return grouped


@ray.remote
class GenerationWorker:
    """One vLLM engine. Only this actor imports vllm, so the driver stays light."""

    def __init__(self, model_path: str, engine_args: dict[str, Any], sleeps: bool = False):
        self.clock = timing.Timings()
        self.model_path = model_path
        # GPU engines kept between stages sleep while the trainer needs the memory.
        self.sleeps, self.asleep = sleeps, False
        with self.clock("startup"):
            from vllm import LLM

            if engine_args["dtype"] == "auto":
                engine_args = {**engine_args, "dtype": "bfloat16" if native_bf16() else "float32"}
            self.llm = LLM(model=model_path, worker_extension_cls=EXTENSION, **engine_args)

    def load(self, model_path: str, seed: int) -> None:
        """Sample `model_path` from here on, as a fresh engine on it with engine seed `seed` would."""
        with self.clock("startup"):
            if self.asleep:
                self.llm.wake_up()
                self.asleep = False
            if model_path != self.model_path:
                # Read from the checkpoint's safetensors into the live model, layer by layer.
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
                self.llm.collective_rpc("retie_lm_head")
                self.model_path = model_path
            # Block hashes ignore the weights: a cached prefix from another policy, or from the
            # previous call, would be reused silently (and a fresh engine starts with none).
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM kept KV blocks in use after its last request: the prefix cache "
                                   "was not reset")
            self.llm.collective_rpc("reseed", args=(seed,))

    def generate(self, conversations: list[list[dict[str, str]]], spec: SamplingSpec, model_path: str,
                 seed: int) -> list[list[dict]]:
        from vllm import SamplingParams

        self.load(model_path, seed)
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

    def sleep(self) -> None:
        """Give the GPU memory back until the next call (vLLM sleep level 1: weights to CPU RAM,
        KV cache dropped); nothing on CPU, where vLLM has no sleep mode."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def take_timings(self) -> dict[str, float]:
        """The time spent since the last call of this, by part."""
        seconds, self.clock = self.clock.seconds, timing.Timings()
        return seconds


# The engines' extra collective_rpc methods (reseed, retie_lm_head), by qualified name: vLLM imports it in its workers.
EXTENSION = "pools.engine_extension.EngineExtension"
# With engines kept on GPUs, each takes this share of its GPU in Ray's accounting, and the
# reference task and the train workers the rest, so that both fit on one GPU while the engine sleeps.
KEPT_ENGINE_GPU_SHARE = 0.5


def engine_args(config, seed: int, use_gpu: bool, keep: bool = False) -> dict[str, Any]:
    gen = config.generate
    args: dict[str, Any] = dict(dtype=gen.dtype, seed=seed, max_model_len=config.model.max_model_len,
                                enforce_eager=gen.enforce_eager, trust_remote_code=config.model.trust_remote_code,
                                tensor_parallel_size=gen.tensor_parallel_size)
    if use_gpu:
        args["gpu_memory_utilization"] = gen.gpu_memory_utilization
        # Sleep mode exists on GPUs only (vLLM refuses it elsewhere).
        args["enable_sleep_mode"] = keep
    return args


def worker_options(config, use_gpu: bool, keep: bool = False) -> dict[str, Any]:
    gen = config.generate
    if use_gpu:
        return {"num_gpus": gen.tensor_parallel_size * (KEPT_ENGINE_GPU_SHARE if keep else 1), "num_cpus": 1}
    # On CPU the engine's threads are what matter; the Ray CPU count only schedules. A kept
    # engine idles through the other stages, so it holds no CPU that they would wait for.
    threads = max(1, (os.cpu_count() or 1) // gen.num_actors)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(gen.cpu_kv_cache_gib), "OMP_NUM_THREADS": str(threads),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {"num_cpus": 0 if keep else 1, "runtime_env": {"env_vars": env}}


class EnginePool:
    """The vLLM engines of one command; engine i samples shard i of every generate and evaluate call.

    Kept (`generate.keep_engines`), the engines live from the first call to `close()`, the
    end of the `round`/`rounds` command: each call loads the policy it samples into them
    (vLLM's reload_weights, when they hold another) and reseeds them, so that they answer as
    fresh engines on that policy with that seed would (tests/test_engine_reuse.py). Between
    calls they sleep on GPUs and stay resident on CPU. Not kept, each call starts its engines
    and kills them when it ends.
    """

    def __init__(self, config, keep: bool | None = None):
        self.config = config
        self._keep = keep
        self._use_gpu: bool | None = None
        self.workers: dict[int, Any] = {}

    def _decide(self) -> None:
        # Asked of the cluster, so only once Ray is up: at the first call.
        if self._use_gpu is None:
            self._use_gpu = cluster_has_gpus()
            if self._keep is None:
                self._keep = keeps_engines(self.config.generate.keep_engines, self._use_gpu)
            if self._keep and self._use_gpu:
                check_gpu_sharing(self.config)

    @property
    def keep(self) -> bool:
        self._decide()
        return bool(self._keep)

    def gpu_share_left(self) -> float:
        """The share of a GPU the other GPU stages may ask for beside these engines."""
        self._decide()
        return 1 - KEPT_ENGINE_GPU_SHARE if self._keep and self._use_gpu else 1.0

    def engine(self, index: int, model_path: str, seed: int) -> Any:
        """Engine `index`, started on `model_path` with engine seed `seed` if there is none."""
        self._decide()
        if index not in self.workers:
            keep, gpu = self.keep, bool(self._use_gpu)
            self.workers[index] = GenerationWorker.options(**worker_options(self.config, gpu, keep)).remote(
                model_path, engine_args(self.config, seed, gpu, keep), keep and gpu)
        return self.workers[index]

    def discard(self, index: int) -> None:
        """Forget engine `index` (it died); the next `engine(index, ...)` starts a new one."""
        worker = self.workers.pop(index, None)
        if worker is not None:
            ray.kill(worker)

    def timings(self, indices: list[int]) -> list[dict[str, float]]:
        return ray.get([self.workers[i].take_timings.remote() for i in indices if i in self.workers])

    def call_finished(self) -> None:
        """After a generate or evaluate call: kept engines sleep (GPU), others are killed."""
        if self.keep:
            ray.get([worker.sleep.remote() for worker in self.workers.values()])
        else:
            self.close()

    def close(self) -> None:
        if ray.is_initialized():  # after ray.shutdown the engines are gone already
            for worker in self.workers.values():
                ray.kill(worker)
        self.workers.clear()


def keeps_engines(setting: str, use_gpu: bool) -> bool:
    """`generate.keep_engines`: auto keeps them on CPU, where it was measured (docs/engine-reuse.md)."""
    return setting == "on" or (setting == "auto" and not use_gpu)


def check_gpu_sharing(config) -> None:
    """Refuse kept GPU engines with a layout the GPU shares cannot express."""
    if config.generate.tensor_parallel_size > 1:
        raise PipelineError("generate.keep_engines=on on GPUs needs generate.tensor_parallel_size 1 (a kept engine "
                            "takes half of one GPU); set generate.keep_engines=off")
    if config.reward.num_gpus_per_actor > 1 - KEPT_ENGINE_GPU_SHARE:
        raise PipelineError(f"reward.num_gpus_per_actor is {config.reward.num_gpus_per_actor}, but kept engines "
                            f"(generate.keep_engines) hold {KEPT_ENGINE_GPU_SHARE} of a GPU each: at most "
                            f"{1 - KEPT_ENGINE_GPU_SHARE}, or set generate.keep_engines=off")


def generate_shards(prompts: list[Prompt], model_path: str, spec: SamplingSpec, config, out_dir: Path,
                    seed: int, make_table: Callable[[list[Prompt], list[list[dict]]], pa.Table],
                    engines: EnginePool | None = None) -> dict[str, Any]:
    """Write one shard per engine (`make_table` turns its outputs into rows); shards on disk are kept.

    `engines` is the command's pool (kept engines); without one, the call starts its own and
    kills them at its end.
    """
    engines = engines if engines is not None else EnginePool(config, keep=False)
    num_shards = shard_count(out_dir, [p.prompt_id for p in prompts], min(config.generate.num_actors, len(prompts)))
    chunks = [prompts[i::num_shards] for i in range(num_shards)]
    todo = [i for i in range(num_shards) if not (out_dir / shard_name(i)).exists()]
    start = time.perf_counter()
    retries = {i: 0 for i in todo}

    def submit(i: int) -> Any:
        # The same engine seed for a replacement: a redone shard samples what the lost one would have.
        worker = engines.engine(i, model_path, seed + i)
        return worker.generate.remote([p.messages for p in chunks[i]], spec, model_path, seed + i)

    try:
        pending = {submit(i): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                outputs = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                retries[index] += 1
                engines.discard(index)
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
        timing.add_slowest(engines.timings(todo))
        engines.call_finished()
    except BaseException:
        # A failed call leaves no engine behind, kept or not: the command is ending.
        engines.close()
        raise
    seconds = time.perf_counter() - start
    return {"shards_generated": len(todo), "generate_seconds": round(seconds, 2),
            "engine_retries": sum(retries.values()), "engines_kept": engines.keep}


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
