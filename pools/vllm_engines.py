"""The vLLM engine pool: each engine in its own Ray actor, a shard of the prompts each.

Generate (K samples per training prompt) and evaluate (one answer per held-out
prompt) both sample through `sample_shards`, which hands each shard's samples
back as its engine finishes; the stage turns them into rows and writes them
(stages/generate.py, generate_shards). A shard is the unit of resumption: the
stage tells the pool which shards it has already, and only the others are
sampled. Engines not kept are killed when the call ends, so their memory is free
before training starts.

With several temperatures (`generate.temperatures`), the K samples of a prompt
are split into consecutive blocks of sample indices, one block per temperature
in the configured order, as evenly as possible: the first K mod T temperatures
take one sample more (K=5 over [0.6, 1.0] gives samples 0-2 at 0.6 and 3-4 at
1.0). Each block is one vLLM request with `n` samples and its own
SamplingParams, and every candidate row records its temperature.

An engine whose actor dies, or whose vLLM engine core dies inside a live actor (on GPU
the core is a child process of the actor), is replaced and its shard redone, up to
`worker_retries` times (core/retries.py); any other error from an engine fails the call. Engines are shut
down through vLLM before their actors are killed (docs/engine-reuse.md, "Engine faults").
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from core import timing
from core.chat_tokens import chat_token_ids
from core.config import GenerateConfig, ModelConfig
from core.gpu_layout import GpuLayout, cluster_gpu_count, plan_gpu_layout, where_this_runs
from core.hardware import native_bf16
from core.progress import engine_bar
from core.prompts import Prompt
from core.retries import WorkerRetries, worker_died

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


def token_prompts(tokenizer: Any, conversations: list[list[dict[str, str]]], repeats: int) -> list[dict]:
    """vLLM TokensPrompts (plain dicts, as that TypedDict is) of the conversations, each `repeats`
    times in a row: the chat template's rendering with each content as plain text
    (core/chat_tokens.py), the ids the trainer and the reference score."""
    prompts = [{"prompt_token_ids": chat_token_ids(tokenizer, conversation)} for conversation in conversations]
    return [prompt for prompt in prompts for _ in range(repeats)]


class EngineDied(RuntimeError):
    """A GenerationWorker's vLLM engine core died while its actor lives (vLLM's EngineDeadError).

    The actor is of no more use, as if it had died: the pool replaces it. Defined here, not
    taken from vLLM, so that the driver can tell it apart without importing vllm.
    """


# How long vLLM may take to stop an engine's processes when it is closed (SIGTERM, then SIGKILL),
# and how long the pool waits for its engines to close before it kills their actors regardless.
ENGINE_SHUTDOWN_TIMEOUT_S = 5.0
ENGINE_CLOSE_TIMEOUT_S = 15.0


@ray.remote
class GenerationWorker:
    """One vLLM engine. Only this actor imports vllm, so the driver stays light."""

    def __init__(self, model_path: str, engine_args: dict[str, Any], sleeps: bool = False):
        self.clock = timing.Timings()
        self.model_path: str | None = model_path
        # GPU engines kept between stages sleep while the trainer needs the memory.
        self.sleeps, self.asleep = sleeps, False
        # Set by close() (the core's exit is then expected) and by the watch on the core process.
        self.closing, self.core_died = False, threading.Event()
        self.trust_remote_code = bool(engine_args.get("trust_remote_code", False))
        self.tokenizer, self.tokenizer_path = None, None  # chat_tokenizer's, for the policy last sampled
        with self.clock("startup"):
            from vllm import LLM

            if engine_args["dtype"] == "auto":
                engine_args = {**engine_args, "dtype": "bfloat16" if native_bf16() else "float32"}
            self.llm = LLM(model=model_path, worker_extension_cls=EXTENSION, **engine_args)
        self.core_pids = watch_engine_core(self)
        self.placement = where_this_runs()

    @contextlib.contextmanager
    def engine_faults(self):
        """Raise EngineDied for an error that comes from the engine core's death; others as they are."""
        try:
            yield
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError) or self.core_died.is_set():
                raise EngineDied(f"the vLLM engine core died ({type(exc).__name__}: {exc})") from exc
            raise

    def load(self, model_path: str, seed: int) -> None:
        """Sample `model_path` from here on, as a fresh engine on it with engine seed `seed` would."""
        with self.clock("startup"):
            if self.asleep:
                # Level 2 dropped the weights: wake their memory up and fill it from the checkpoint
                # (the same policy's too) before the KV cache takes its memory back.
                self.llm.wake_up(tags=["weights"])
                self.reload(model_path)
                if not self.llm.wake_up(tags=["kv_cache"]):
                    raise RuntimeError("vLLM is still asleep after waking its weights and KV cache")
                self.asleep = False
            elif model_path != self.model_path:
                self.reload(model_path)
            # Block hashes ignore the weights: a cached prefix from another policy, or from the
            # previous call, would be reused silently (and a fresh engine starts with none).
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM kept KV blocks in use after its last request: the prefix cache "
                                   "was not reset")
            self.llm.collective_rpc("reseed", args=(seed,))

    def reload(self, model_path: str) -> None:
        """Read `model_path`'s safetensors into the live model, layer by layer."""
        self.model_path = None  # half loaded until both calls return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_path})
        self.llm.collective_rpc("retie_lm_head")
        self.model_path = model_path

    def generate(self, conversations: list[list[dict[str, str]]], spec: SamplingSpec, model_path: str,
                 seed: int) -> list[list[dict]]:
        from vllm import SamplingParams

        with self.engine_faults():
            self.load(model_path, seed)
            # Per-request seeds fail on CPU (vLLM's CPU generator has no offset);
            # the engine-level seed makes sampling reproducible instead.
            blocks = spec.blocks()
            params = [SamplingParams(n=count, temperature=temperature, top_p=spec.top_p,
                                     max_tokens=spec.max_tokens) for temperature, count in blocks]
            # One request per (prompt, temperature block); generate() takes one SamplingParams per request.
            with self.clock("work"):
                requests = token_prompts(self.chat_tokenizer(model_path), conversations, len(blocks))
                outputs = self.llm.generate(requests, params * len(conversations), use_tqdm=engine_bar)
        return group_samples(outputs, blocks)

    def chat_tokenizer(self, model_path: str) -> Any:
        """The tokenizer the trainer and the reference load from `model_path` (not vLLM's own,
        which may be another class): the prompt ids are theirs exactly."""
        if self.tokenizer_path != model_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=self.trust_remote_code)
            self.tokenizer_path = model_path
        return self.tokenizer

    def sleep(self) -> None:
        """Give the GPU memory back until the next call (vLLM sleep level 2: weights and KV cache
        dropped, as the next call reloads the weights anyway); nothing on CPU, where vLLM has no
        sleep mode."""
        if self.sleeps and not self.asleep:
            with self.engine_faults():
                self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down: stop its core process (on GPU), which frees its GPU memory. An
        in-process engine (the CPU default) holds nothing its actor's death does not free: it is
        left to that (what its own shutdown would cost: docs/engine-reuse.md)."""
        self.closing = True
        if self.core_pids:
            self.llm.llm_engine.engine_core.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)

    def where(self) -> str:
        return self.placement

    def take_timings(self) -> dict[str, float]:
        """The time spent since the last call of this, by part."""
        seconds, self.clock = self.clock.seconds, timing.Timings()
        return seconds


def watch_engine_core(worker) -> list[int]:
    """With vLLM's multiprocessing on (the default on GPU), the engine core runs in a child process
    of the actor. If it dies without a word (SIGKILL, the kernel's OOM killer), vLLM 0.32's `LLM`
    waits for its outputs forever: its own monitor marks the client dead and shuts it down, but
    nothing wakes a `generate` or utility call already waiting. A thread of ours does, with vLLM's
    EngineDeadError, which `engine_faults` turns into EngineDied. The core processes' ids; none
    for an in-process engine (the CPU default), whose faults are the actor's own."""
    client = worker.llm.llm_engine.engine_core
    resources = getattr(client, "resources", None)
    processes = list(getattr(getattr(resources, "engine_manager", None), "processes", None) or [])
    if not processes or not hasattr(client, "outputs_queue"):
        return []

    def watch() -> None:
        from multiprocessing.connection import wait

        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            wait([process.sentinel for process in processes])
        except (OSError, ValueError):
            return
        if worker.closing:
            return
        worker.core_died.set()
        resources.engine_dead = True
        client.outputs_queue.put_nowait(EngineDeadError())
        with contextlib.suppress(Exception):
            for future in list(client.utility_results.values()):
                with contextlib.suppress(Exception):
                    future.set_exception(EngineDeadError())

    threading.Thread(target=watch, name="EngineCoreWatch", daemon=True).start()
    if os.getpgid(0) != os.getpid():
        # Ray (2.60 by default) kills a dead worker's process group, which holds the engine core;
        # without that, a core can outlive an actor killed by a signal (docs/engine-reuse.md).
        log.warning("this engine's actor leads no process group of its own: its vLLM engine core may "
                    "outlive it if it is killed")
    return [process.pid for process in processes]


def stop_engines(workers: list[Any], timeout: float = ENGINE_CLOSE_TIMEOUT_S) -> None:
    """Close the engines through vLLM, in parallel, then kill their actors: a dead engine, or one
    still busy after `timeout` seconds, is killed without its own shutdown."""
    refs = [worker.close.remote() for worker in workers]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for worker in workers:
        ray.kill(worker)


def with_env(options: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    """Actor `options` with `env_vars` added to their runtime environment."""
    if not env_vars:
        return options
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env_vars}
    return {**options, "runtime_env": runtime_env}


# The engines' extra collective_rpc methods (reseed, retie_lm_head), by qualified name: vLLM imports it in its workers.
EXTENSION = "pools.engine_extension.EngineExtension"


def engine_args(gen: GenerateConfig, model: ModelConfig, seed: int, use_gpu: bool, keep: bool = False
                ) -> dict[str, Any]:
    args: dict[str, Any] = dict(dtype=gen.dtype, seed=seed, max_model_len=model.max_model_len,
                                enforce_eager=gen.enforce_eager, trust_remote_code=model.trust_remote_code,
                                tensor_parallel_size=gen.tensor_parallel_size)
    if use_gpu:
        args["gpu_memory_utilization"] = gen.gpu_memory_utilization
        # Sleep mode exists on GPUs only (vLLM refuses it elsewhere).
        args["enable_sleep_mode"] = keep
    return args


def worker_options(gen: GenerateConfig, layout: GpuLayout, keep: bool = False) -> dict[str, Any]:
    """What an engine actor asks of Ray: on a GPU cluster its GpuLayout.engine share (core/gpu_layout.py)."""
    if layout.cluster_gpus:
        return {"num_gpus": layout.engine, "num_cpus": 1}
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

    Its engines read the config's generate and model sections; the whole config is held only to
    plan the cluster's GPU layout (core/gpu_layout.py), which weighs the reward actors beside them.
    """

    def __init__(self, config, keep: bool | None = None, env_vars: dict[str, str] | None = None):
        self.config = config
        self.generate: GenerateConfig = config.generate
        self.model: ModelConfig = config.model
        self._keep = keep
        # Added to each engine actor's environment (tests/test_engine_core_kill.py turns vLLM's
        # multiprocessing on with it, as on GPU).
        self._env_vars = dict(env_vars or {})
        self.layout: GpuLayout | None = None
        self.workers: dict[int, Any] = {}

    def _decide(self) -> None:
        # Asked of the cluster, so only once Ray is up: at the first call. A layout kept engines
        # cannot have on this cluster is refused here (core/gpu_layout.py).
        if self.layout is None:
            gpus = cluster_gpu_count()
            if self._keep is None:
                self._keep = keeps_engines(self.generate.keep_engines, gpus > 0)
            self.layout = plan_gpu_layout(self.config, gpus, self._keep)

    @property
    def keep(self) -> bool:
        self._decide()
        return bool(self._keep)

    def gpu_layout(self) -> GpuLayout:
        """The command's GPU layout, planned once, with these engines kept or not."""
        self._decide()
        assert self.layout is not None
        return self.layout

    def engine(self, index: int, model_path: str, seed: int) -> Any:
        """Engine `index`, started on `model_path` with engine seed `seed` if there is none."""
        self._decide()
        if index not in self.workers:
            keep, gpu = self.keep, bool(self.layout.cluster_gpus)
            options = with_env(worker_options(self.generate, self.layout, keep), self._env_vars)
            self.workers[index] = GenerationWorker.options(**options).remote(
                model_path, engine_args(self.generate, self.model, seed, gpu, keep), keep and gpu)
        return self.workers[index]

    def discard(self, index: int) -> None:
        """Stop and forget engine `index` (it died); the next `engine(index, ...)` starts a new one."""
        worker = self.workers.pop(index, None)
        if worker is not None:
            stop_engines([worker])

    def placements(self, indices: list[int]) -> dict[int, str]:
        """Where each of these engines runs (core/gpu_layout.py, where_this_runs)."""
        live = [i for i in indices if i in self.workers]
        return dict(zip(live, ray.get([self.workers[i].where.remote() for i in live])))

    def timings(self, indices: list[int]) -> list[dict[str, float]]:
        return ray.get([self.workers[i].take_timings.remote() for i in indices if i in self.workers])

    def call_finished(self) -> None:
        """After a generate or evaluate call: kept engines sleep (GPU), others are closed. A kept
        engine found dead is dropped; the next call starts another."""
        if self.keep:
            sleeps = {index: worker.sleep.remote() for index, worker in self.workers.items()}
            for index, ref in sleeps.items():
                try:
                    ray.get(ref)
                except Exception as exc:
                    if not worker_died(exc):
                        raise
                    log.warning("the kept vLLM engine %d died after its call; the next call starts another",
                                index)
                    self.discard(index)
        else:
            self.close()

    def close(self, busy: Collection[int] = ()) -> None:
        """Close every engine (stop_engines). Those in `busy` are still running a call, which their
        close would wait behind: they are killed at once."""
        if ray.is_initialized():  # after ray.shutdown the engines are gone already
            for index in busy:
                worker = self.workers.pop(index, None)
                if worker is not None:
                    ray.kill(worker)
            stop_engines(list(self.workers.values()))
        self.workers.clear()


def keeps_engines(setting: str, use_gpu: bool) -> bool:
    """`generate.keep_engines`: auto keeps them on CPU, where it was measured (docs/engine-reuse.md)."""
    return setting == "on" or (setting == "auto" and not use_gpu)


# What sample_shards hands back for each shard: its index, its prompts, and each prompt's samples.
Shard = tuple[int, list[Prompt], list[list[dict]]]


def sample_shards(engines: EnginePool, prompts: list[Prompt], num_shards: int, done: Collection[int],
                  model_path: str, spec: SamplingSpec, seed: int, retries: WorkerRetries) -> Iterator[Shard]:
    """Sample every shard not in `done` on its engine (shard i: every num_shards-th prompt from i, on
    engine i with engine seed `seed + i`), and yield each as its engine finishes.

    An engine that dies is replaced and its shard redone, through `retries` (core/retries.py).
    `engines` is the command's pool; the call leaves its engines as the pool keeps them
    (EnginePool.call_finished), or none at all when it fails or is closed before its end.
    """
    chunks = [prompts[i::num_shards] for i in range(num_shards)]
    todo = [i for i in range(num_shards) if i not in done]
    pending: dict[Any, int] = {}

    def submit(i: int) -> Any:
        # The same engine seed for a replacement: a redone shard samples what the lost one would have
        # (with the engine core in-process, as on CPU; not with vLLM's multiprocessing: docs/engine-reuse.md).
        worker = engines.engine(i, model_path, seed + i)
        return worker.generate.remote([p.messages for p in chunks[i]], spec, model_path, seed + i)

    try:
        pending.update((submit(i), i) for i in todo)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                outputs = ray.get(ready[0])
            except Exception as exc:
                if not worker_died(exc):
                    raise  # a bad request or a bug: another engine would fail alike
                engines.discard(index)
                retries.died(f"vLLM engine of shard {index}", exc)
                pending[submit(index)] = index
                continue
            yield index, chunks[index], outputs
        call_finished(engines, todo)
    except BaseException:
        # A failed call leaves no engine behind, kept or not: the command is ending. The engines
        # still sampling (Ctrl-C, another shard's error, a shard the stage could not write) are
        # killed without waiting for them.
        engines.close(busy=set(pending.values()))
        raise


def call_finished(engines: EnginePool, indices: list[int]) -> None:
    """After the last shard: the engines' timings and placements into the stage's log, then the
    engines kept asleep or closed."""
    timing.add_slowest(engines.timings(indices))
    for index, where in engines.placements(indices).items():
        # Into the stage's log (stderr is captured there), not onto the terminal.
        print(f"vLLM engine {index} ran on {where}", file=sys.stderr, flush=True)
    engines.call_finished()
