"""Engine faults with vLLM's engine core in a child process of the actor, as on GPU.

On CPU the pipeline runs the engine core inside the actor (VLLM_ENABLE_V1_MULTIPROCESSING=0);
on GPU vLLM runs it in a child process, whose death the actor survives. The real-vLLM test
turns multiprocessing on for its engines, SIGKILLs the engine core while the engine samples,
and checks that the shard is redone on a new engine with the same rows, and that closing
the engines leaves no process behind. The other tests check, without vLLM, which errors are
retried and the order of the sleep level 2 wake-up (which exists on GPUs only).
"""

import os
import threading
import time

import psutil
import pyarrow as pa
import pytest
import ray

from core.layout import read_parquet_dir
from core.prompts import load_prompts
from pipeline.settings import load_config
from pools.vllm_engines import EngineDied, EnginePool, GenerationWorker, SamplingSpec
from stages.generate import generate_shards
from tests.conftest import REPO_ROOT, survivors


def make_table(chunk, outputs):
    return pa.Table.from_pylist([
        {"prompt_id": prompt.prompt_id, "sample_index": index, "response": sample["text"]}
        for prompt, samples in zip(chunk, outputs, strict=True) for index, sample in enumerate(samples)])


def rows(directory):
    return sorted((r["prompt_id"], r["sample_index"], r["response"]) for r in read_parquet_dir(directory).to_pylist())


def family(worker) -> tuple[psutil.Process, list[psutil.Process]]:
    """The engine actor's process and its descendants (the engine core and its worker)."""
    actor = psutil.Process(ray.get(worker.__ray_call__.remote(lambda self: os.getpid())))
    return actor, actor.children(recursive=True)


def named(processes, word):
    found = []
    for process in processes:
        try:
            if word in process.name() or word in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def busy_seconds(processes) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.e2e
def test_a_killed_engine_core_is_replaced_and_no_engine_process_is_left(local_ray, tiny_model, tmp_path, caplog):
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["generate.num_actors=1"])
    prompts = load_prompts(config.prompts.train)[:8]
    # Long answers (random weights rarely stop early), so that the kill lands while the engine samples.
    spec = SamplingSpec(4, 1.0, 1.0, 192)
    pool = EnginePool(config, keep=True, env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    seen: list[psutil.Process] = []
    try:
        # A one-token call starts the kept engine, so that its core is found before the call that kills it.
        generate_shards(prompts[:1], str(tiny_model), SamplingSpec(1, 1.0, 1.0, 1), config, tmp_path / "warm", 11,
                        make_table, pool)
        first, descendants = family(pool.workers[0])
        seen += [first, *descendants]
        core = named(descendants, "EngineCore")
        assert len(core) == 1, f"no engine-core child process: {descendants}"

        result: dict = {}
        call = threading.Thread(target=lambda: result.update(generate_shards(
            prompts, str(tiny_model), spec, config, tmp_path / "killed", 11, make_table, pool)))
        idle = busy_seconds(descendants)
        call.start()
        deadline = time.monotonic() + 60
        while busy_seconds(descendants) < idle + 1.0:  # the engine is sampling
            assert call.is_alive(), "the call ended before the engine core could be killed"
            assert time.monotonic() < deadline, "the engine never started sampling"
            time.sleep(0.05)
        assert call.is_alive(), "the call ended before the engine core could be killed"
        core[0].kill()
        call.join(timeout=240)
        assert not call.is_alive(), "generate_shards did not return after its engine core was killed"

        assert result["engine_retries"] == 1
        assert "generate: the vLLM engine of shard 0 died; starting another (retry 1 of 2)" in caplog.text
        # Every prompt's samples, once each. Not compared with an unkilled run's: with vLLM's
        # multiprocessing on, two fresh engines with the same seed sampled differently (0 of 32
        # rows equal, docs/engine-reuse.md), so the seed cannot make the redo's rows equal.
        keys = [(prompt_id, index) for prompt_id, index, _ in rows(tmp_path / "killed")]
        assert keys == sorted((p.prompt_id, i) for p in prompts for i in range(spec.num_samples))
        assert not survivors([first, *descendants], timeout=30), "the discarded engine left a process"

        # The replacement, closed through vLLM while its actor lives, stops its own processes (the
        # actor's multiprocessing resource tracker, no vLLM process, goes with the actor).
        actor, descendants = family(pool.workers[0])
        seen += [actor, *descendants]
        vllm_processes = named(descendants, "VLLM::")
        assert len(vllm_processes) >= 1 and named(vllm_processes, "EngineCore")
        ray.get(pool.workers[0].close.remote(), timeout=60)
        assert not survivors(vllm_processes, timeout=30), "closing the engine left a vLLM process"
        pool.close()
        assert not survivors([actor, *descendants], timeout=30)
    finally:
        pool.close()
        left = survivors(seen, timeout=30)
    assert not left, f"engine processes left: {left}"


@ray.remote(num_cpus=0)
class FakeEngine:
    """Raises `error` from generate, or answers one sample per conversation."""

    def __init__(self, error: Exception | None):
        self.error = error

    def generate(self, conversations, spec, model_path, seed):
        if self.error is not None:
            raise self.error
        return [[{"text": f"seed {seed}"}] for _ in conversations]

    def close(self):
        pass

    def take_timings(self):
        return {}


class FakePool:
    """Engines that fail with `errors[i]` on their i-th start, then answer."""

    keep = False

    def __init__(self, errors):
        self.errors, self.started, self.workers = list(errors), 0, {}

    def engine(self, index, model_path, seed):
        if index not in self.workers:
            error = self.errors[self.started] if self.started < len(self.errors) else None
            self.started += 1
            self.workers[index] = FakeEngine.remote(error)
        return self.workers[index]

    def discard(self, index):
        ray.kill(self.workers.pop(index))

    def timings(self, indices):
        return []

    def placements(self, indices):
        return {}

    def call_finished(self):
        self.close()

    def close(self, busy=()):
        for worker in self.workers.values():
            ray.kill(worker)
        self.workers.clear()


def sample_table(chunk, outputs):
    return pa.Table.from_pylist([{"prompt_id": p.prompt_id, "response": o[0]["text"]} for p, o in zip(chunk, outputs)])


def test_only_a_dead_engine_core_is_retried(local_ray, tmp_path):
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["generate.num_actors=1"])
    prompts = load_prompts(config.prompts.train)[:2]
    spec = SamplingSpec(1, 1.0, 1.0, 8)

    pool = FakePool([EngineDied("the vLLM engine core died")])
    stats = generate_shards(prompts, "model", spec, config, tmp_path / "died", 3, sample_table, pool)
    assert stats["engine_retries"] == 1 and pool.started == 2
    assert {r["response"] for r in read_parquet_dir(tmp_path / "died").to_pylist()} == {"seed 3"}

    pool = FakePool([ValueError("a bad request")])
    with pytest.raises(ValueError, match="a bad request"):
        generate_shards(prompts, "model", spec, config, tmp_path / "bad", 3, sample_table, pool)
    assert pool.started == 1 and not pool.workers


class FakeLLM:
    """Records the calls GenerationWorker makes of vLLM's LLM."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        return tags == ["kv_cache"]  # fully awake once the KV cache is back

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append((method, *args, *(kwargs or {}).values()))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


def kept_gpu_engine(model_path):
    """A GenerationWorker (the class, not the actor) on a fake LLM, as a kept GPU engine."""
    from core import timing

    worker = GenerationWorker.__ray_actor_class__.__new__(GenerationWorker.__ray_actor_class__)
    worker.clock, worker.model_path, worker.sleeps, worker.asleep = timing.Timings(), model_path, True, False
    worker.closing, worker.core_died, worker.llm = False, threading.Event(), FakeLLM()
    return worker


@pytest.mark.parametrize("next_policy", ["policy-1", "policy-2"])
def test_a_sleeping_gpu_engine_wakes_its_weights_reloads_then_wakes_its_kv_cache(next_policy):
    """Level 2 drops the weights, so they are reloaded even for the policy the engine held."""
    worker = kept_gpu_engine("policy-1")
    worker.sleep()
    worker.sleep()  # asleep already: nothing more
    worker.load(next_policy, 7)
    assert worker.llm.calls == [
        ("sleep", 2),
        ("wake_up", ("weights",)),
        ("reload_weights", next_policy),
        ("retie_lm_head",),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("reseed", 7)]
    assert worker.model_path == next_policy and not worker.asleep

    # Awake, the same policy is not reloaded; another one is, without any wake-up.
    worker.llm.calls.clear()
    worker.load(next_policy, 8)
    worker.load("policy-3", 9)
    assert worker.llm.calls == [("reset_prefix_cache",), ("reseed", 8), ("reload_weights", "policy-3"),
                                ("retie_lm_head",), ("reset_prefix_cache",), ("reseed", 9)]
