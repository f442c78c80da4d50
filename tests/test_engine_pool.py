"""pools/vllm_engines.py: when engines are kept, and what a kept engine asks of Ray (vLLM itself: test_engine_reuse.py)."""

import pytest

from core.errors import PipelineError
from core.gpu_layout import KEPT_ENGINE_SHARE, plan_gpu_layout
from pipeline.settings import load_config
from pools.vllm_engines import engine_args, keeps_engines, worker_options
from tests.conftest import REPO_ROOT


def smoke(*overrides):
    return load_config(REPO_ROOT / "configs" / "smoke.yaml", list(overrides))


@pytest.mark.parametrize("setting, use_gpu, kept", [
    ("auto", False, True), ("auto", True, False), ("on", True, True), ("on", False, True),
    ("off", False, False), ("off", True, False)])
def test_keep_engines_setting(setting, use_gpu, kept):
    assert keeps_engines(setting, use_gpu) is kept


def test_keep_engines_reads_on_and_off_as_words():
    # YAML 1.1 reads a bare on/off as a boolean.
    assert smoke("generate.keep_engines=on").generate.keep_engines == "on"
    assert smoke("generate.keep_engines=off").generate.keep_engines == "off"
    with pytest.raises(PipelineError, match="generate.keep_engines"):
        smoke("generate.keep_engines=sometimes")


def test_a_kept_cpu_engine_holds_no_ray_cpu_the_other_stages_would_wait_for():
    config = smoke()
    on_cpus = plan_gpu_layout(config, 0, keep_engines=True)
    assert worker_options(config.generate, on_cpus, keep=False)["num_cpus"] == 1
    assert worker_options(config.generate, on_cpus, keep=True)["num_cpus"] == 0
    assert "enable_sleep_mode" not in engine_args(config.generate, config.model, 3, use_gpu=False, keep=True)


def test_a_kept_gpu_engine_takes_more_than_half_its_gpu_and_may_sleep():
    config = smoke("generate.num_actors=2")
    assert worker_options(config.generate, plan_gpu_layout(config, 2, False), keep=False)["num_gpus"] == 1
    assert worker_options(config.generate, plan_gpu_layout(config, 2, True), keep=True)["num_gpus"] == KEPT_ENGINE_SHARE
    assert engine_args(config.generate, config.model, 3, use_gpu=True, keep=True)["enable_sleep_mode"] is True
    assert engine_args(config.generate, config.model, 3, use_gpu=True, keep=False)["enable_sleep_mode"] is False
