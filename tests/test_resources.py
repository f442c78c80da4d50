"""Requests the Ray cluster cannot meet are refused before any stage runs (pipeline/resources.py)."""

import pytest

from core.errors import PipelineError
from pipeline.resources import check_resources, resource_problems
from pipeline.settings import load_config

CPU_HOST = {"CPU": 2.0, "memory": 1e10}
GPU_HOST = {"CPU": 16.0, "GPU": 2.0}


def config(*overrides):
    return load_config("configs/smoke.yaml", list(overrides))


def test_the_smoke_config_fits_a_two_core_machine():
    assert resource_problems(config(), CPU_HOST) == []


@pytest.mark.parametrize("overrides, resources, fragment", [
    (["train.num_workers=4"], CPU_HOST, "'train.num_workers' is 4, one CPU each at least, but the cluster has 2 CPUs"),
    (["train.num_workers=3"], GPU_HOST,
     "'train.num_workers' is 3, one GPU each, but the cluster has 16 CPUs and 2 GPUs"),
    (["generate.num_actors=2", "generate.tensor_parallel_size=2"], GPU_HOST, "2 x 2 GPUs"),
    (["generate.num_actors=3"], CPU_HOST, "'generate.num_actors' is 3, one CPU each"),
    (["generate.tensor_parallel_size=2"], CPU_HOST, "which needs GPUs"),
    (["reward.num_actors=2", "reward.num_gpus_per_actor=1"], {"CPU": 8.0, "GPU": 1.0}, "2 x 1 GPUs"),
    (["reward.num_gpus_per_actor=0.5"], CPU_HOST, "'reward.num_actors' x 'reward.num_gpus_per_actor'"),
])
def test_an_infeasible_request_names_its_key(overrides, resources, fragment):
    with pytest.raises(PipelineError, match="lower it or add nodes") as error:
        check_resources(config(*overrides), resources)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_requests_that_fit_pass():
    check_resources(config("train.num_workers=2", "generate.num_actors=2", "generate.tensor_parallel_size=1",
                           "reward.num_actors=2", "reward.num_gpus_per_actor=0.5"), GPU_HOST)


def test_several_problems_are_counted():
    with pytest.raises(PipelineError, match=r"\(and 1 more\)"):
        check_resources(config("train.num_workers=4", "generate.num_actors=3"), CPU_HOST)


def test_an_autoscaling_cluster_gets_its_wait_to_grow():
    from pipeline.resources import wait_for_resources

    now, calls = [0.0], []

    def resources():
        calls.append(now[0])
        return {"CPU": 2.0} if now[0] < 12 else {"CPU": 8.0}  # grows after 12 s

    def sleep(seconds):
        now[0] += seconds

    wait_for_resources(config("train.num_workers=4", "resources_wait_seconds=30"), resources,
                       clock=lambda: now[0], sleep=sleep)
    assert 12 <= now[0] < 30
    now[0] = 0.0
    with pytest.raises(PipelineError, match="'train.num_workers' is 16"):
        wait_for_resources(config("train.num_workers=16", "resources_wait_seconds=30"), resources,
                           clock=lambda: now[0], sleep=sleep)
    assert now[0] == 30  # waited the whole time, then said why


def test_no_wait_by_default():
    from pipeline.resources import wait_for_resources

    slept = []
    with pytest.raises(PipelineError):
        wait_for_resources(config("train.num_workers=4"), lambda: CPU_HOST, sleep=slept.append)
    assert slept == []
