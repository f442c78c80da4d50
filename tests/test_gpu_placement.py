"""Where a round's processes land on a GPU cluster, checked with Ray's logical GPUs (no CUDA).

A Ray cluster started with `num_gpus=8` schedules and assigns GPU ids exactly as a real
one does; only CUDA is missing. Each test asks Ray for what a round asks (the options the
pipeline's own functions build), in a round's order: engines (generate), reward actors
(rerank), the reference scorer, the Ray Train workers (train), engines and reward actors
again (evaluate), and records the GPU ids Ray gave each. The processes are probes that
report their ids instead of loading models.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import ray

from core.errors import PipelineError
from core.gpu_layout import KEPT_ENGINE_SHARE, REST_BESIDE_ENGINE, plan_gpu_layout
from pipeline.resources import check_resources
from pipeline.settings import load_config
from pools.reward_scorers import RewardWorker, reward_actor_options
from pools.vllm_engines import keeps_engines, worker_options
from stages.train.stage import scaling_config
from tests.conftest import REPO_ROOT

CLUSTER_GPUS = 8
PAPER_FILES = sorted((REPO_ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.fixture(scope="module")
def gpu_cluster():
    if ray.is_initialized():
        ray.shutdown()
    # Eight train workers starting torch at once on a 2-core machine outlast Ray Train's 60 s.
    saved = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "600"
    ray.init(address="local", num_cpus=32, num_gpus=CLUSTER_GPUS, include_dashboard=False, log_to_driver=False,
             # tests/ too: Ray Train's workers import this module's report_gpu_ids by name.
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}})
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", None)
    else:
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = saved


@ray.remote(num_cpus=0)
class Probe:
    def gpu_ids(self) -> list[int]:
        return [int(i) for i in ray.get_gpu_ids()]


@ray.remote(num_cpus=0)
def probe_task() -> list[int]:
    return [int(i) for i in ray.get_gpu_ids()]


def report_gpu_ids(config: dict) -> None:
    import json

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"{rank}.json").write_text(json.dumps([int(i) for i in ray.get_gpu_ids()]))


def train_worker_gpus(num_workers: int, gpus_per_worker: float, out: Path) -> list[list[int]]:
    """The GPU ids of a real Ray Train worker group asked for with the train stage's ScalingConfig."""
    import json

    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out.mkdir(parents=True, exist_ok=True)
    # gloo: the logical GPUs have no CUDA behind them for NCCL.
    TorchTrainer(report_gpu_ids, train_loop_config={"out": str(out)}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=scaling_config(num_workers, gpus_per_worker),
                 run_config=RunConfig(storage_path=str(out / "ray_train"), name="probe")).fit()
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(num_workers)]


def round_placement(config, keep: bool, tmp_path: Path) -> dict[str, list[list[int]]]:
    """The GPU ids each process of one round is given, in the round's order."""
    layout = plan_gpu_layout(config, CLUSTER_GPUS, keep)
    engine_options = worker_options(config.generate, layout, keep)
    gen, reward = config.generate, config.reward
    placed: dict[str, list[list[int]]] = {}

    def start_engines():
        engines = [Probe.options(**engine_options).remote() for _ in range(gen.num_actors)]
        return engines, ray.get([e.gpu_ids.remote() for e in engines])

    def reward_actors():
        actors = [Probe.options(**reward_actor_options(layout.reward_actor)).remote()
                  for _ in range(reward.num_actors)]
        ids = ray.get([a.gpu_ids.remote() for a in actors])
        for actor in actors:
            ray.kill(actor)
        return ids

    engines, placed["engines"] = start_engines()
    if not keep:
        for engine in engines:
            ray.kill(engine)
    placed["reward"] = reward_actors()
    placed["reference"] = [ray.get(probe_task.options(num_gpus=layout.reference).remote())]
    placed["train"] = train_worker_gpus(config.train.num_workers, layout.train_worker, tmp_path / "train")
    if not keep:
        # Evaluate samples, then its engines are gone before the reward actors score (EnginePool.call_finished).
        engines, placed["eval engines"] = start_engines()
        for engine in engines:
            ray.kill(engine)
    placed["eval reward"] = reward_actors()
    for engine in engines:
        ray.kill(engine)
    return placed


def assert_one_per_gpu(ids: list[list[int]], each: int = 1):
    flat = [i for group in ids for i in group]
    assert all(len(group) == each for group in ids), ids
    assert len(flat) == len(set(flat)), f"two processes of a kind on one GPU: {ids}"


def default(*overrides):
    return load_config(REPO_ROOT / "configs" / "default.yaml", list(overrides))


def test_the_default_config_spreads_every_kind_over_separate_gpus(gpu_cluster, tmp_path):
    config = default("generate.num_actors=4", "train.num_workers=4", "reward.num_actors=4")
    placed = round_placement(config, keep=False, tmp_path=tmp_path)
    for kind in ("engines", "train", "reward", "eval engines", "eval reward"):
        assert_one_per_gpu(placed[kind])
    assert len(placed["reference"][0]) == 1


def paper_layouts() -> dict[tuple, list[Path]]:
    """The paper recipes grouped by what they ask of Ray: one placement run checks each group."""
    groups: dict[tuple, list[Path]] = {}
    for path in PAPER_FILES:
        c = load_config(path)
        key = (c.generate.num_actors, c.generate.tensor_parallel_size, c.generate.keep_engines, c.train.num_workers,
               c.reward.num_actors, c.reward.num_gpus_per_actor)
        groups.setdefault(key, []).append(path)
    return groups


@pytest.mark.parametrize("paths", list(paper_layouts().values()),
                         ids=lambda paths: "+".join(p.stem for p in paths))
def test_each_paper_recipe_gets_one_gpu_per_engine_worker_and_reward_model(gpu_cluster, tmp_path, paths):
    config = load_config(paths[0])
    check_resources(config, ray.cluster_resources())
    placed = round_placement(config, keep=keeps_engines(config.generate.keep_engines, True), tmp_path=tmp_path)
    assert_one_per_gpu(placed["engines"], each=config.generate.tensor_parallel_size)
    assert len(placed["engines"]) == config.generate.num_actors
    assert_one_per_gpu(placed["train"])
    assert len(placed["train"]) == config.train.num_workers
    assert_one_per_gpu(placed["reward"])


def test_kept_engines_take_every_gpu_and_each_other_process_goes_beside_one(gpu_cluster, tmp_path):
    config = default("generate.keep_engines=on", f"generate.num_actors={CLUSTER_GPUS}",
                     f"train.num_workers={CLUSTER_GPUS}", f"reward.num_actors={CLUSTER_GPUS}")
    placed = round_placement(config, keep=True, tmp_path=tmp_path)
    assert_one_per_gpu(placed["engines"])
    assert sorted(i for ids in placed["engines"] for i in ids) == list(range(CLUSTER_GPUS))
    # Never two train workers (NCCL: "Duplicate GPU detected") nor two reward models on one GPU.
    assert_one_per_gpu(placed["train"])
    assert_one_per_gpu(placed["reward"])
    assert_one_per_gpu(placed["eval reward"])


def test_fewer_train_workers_than_kept_engines_still_get_a_gpu_each(gpu_cluster, tmp_path):
    config = default("generate.keep_engines=on", f"generate.num_actors={CLUSTER_GPUS}", "train.num_workers=3")
    placed = round_placement(config, keep=True, tmp_path=tmp_path)
    assert_one_per_gpu(placed["train"])


def test_a_reward_actor_given_no_gpu_sees_none(gpu_cluster):
    config = default("reward.num_gpus_per_actor=0")
    layout = plan_gpu_layout(config, CLUSTER_GPUS, keep_engines=False)
    assert layout.reward_actor == 0
    on_cpu = RewardWorker.options(**reward_actor_options(layout.reward_actor)).remote(config.reward)
    on_gpu = RewardWorker.options(**reward_actor_options(1.0)).remote(config.reward)
    try:
        visible = lambda actor: ray.get(actor.__ray_call__.remote(  # noqa: E731
            lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")))
        # Ray leaves the variable unset for an actor that asked for no GPU: every GPU would be visible.
        assert visible(on_cpu) == ""
        assert ray.get(on_cpu.where.remote()).endswith(", CPU")
        gpu = ray.get(on_gpu.where.remote())
        assert ", GPU " in gpu and visible(on_gpu) == gpu.rsplit(" ", 1)[1]
    finally:
        ray.kill(on_cpu)
        ray.kill(on_gpu)


def test_reward_auto_is_a_gpu_on_gpu_clusters_what_engines_leave_beside_them_and_none_on_cpus():
    config = default()
    assert config.reward.num_gpus_per_actor == "auto"
    assert plan_gpu_layout(config, 4, keep_engines=False).reward_actor == 1
    assert plan_gpu_layout(default("generate.num_actors=4"), 4, keep_engines=True).reward_actor == REST_BESIDE_ENGINE
    assert plan_gpu_layout(config, 0, keep_engines=True).reward_actor == 0
    assert KEPT_ENGINE_SHARE > 0.5 and KEPT_ENGINE_SHARE + REST_BESIDE_ENGINE == 1
    assert 2 * REST_BESIDE_ENGINE > 1 - KEPT_ENGINE_SHARE  # two of the rest never fit beside an engine


@pytest.mark.parametrize("overrides, words", [
    (["generate.num_actors=4"], "generate.num_actors is 4 but the cluster has 8 GPUs; set it to 8"),
    (["generate.num_actors=8", "generate.tensor_parallel_size=2"], "generate.tensor_parallel_size 1"),
    (["generate.num_actors=8", "reward.num_gpus_per_actor=1"], "reward.num_gpus_per_actor is 1"),
])
def test_kept_engine_layouts_that_cannot_be_met_are_refused_in_one_line(overrides, words):
    with pytest.raises(PipelineError, match=words) as caught:
        plan_gpu_layout(default("generate.keep_engines=on", *overrides), CLUSTER_GPUS, keep_engines=True)
    assert "\n" not in str(caught.value)


def test_reward_num_gpus_per_actor_takes_auto_or_a_number():
    assert default("reward.num_gpus_per_actor=0.25").reward.num_gpus_per_actor == 0.25
    with pytest.raises(PipelineError, match="reward.num_gpus_per_actor.*'auto'"):
        default("reward.num_gpus_per_actor=some")
    with pytest.raises(PipelineError, match="reward.num_gpus_per_actor"):
        default("reward.num_gpus_per_actor=-1")


def test_a_round_names_the_layout_it_will_use():
    kept = plan_gpu_layout(default("generate.keep_engines=on", "generate.num_actors=8"), 8, keep_engines=True)
    lines = kept.describe()
    assert lines[0].startswith(f"vLLM engine: {KEPT_ENGINE_SHARE} GPU each, one engine on every GPU")
    assert Counter("beside a kept engine" in line for line in lines)[True] == 3
    assert plan_gpu_layout(default(), 0, keep_engines=True).describe() == [
        "no GPUs in the cluster: every stage runs on CPUs"]
