"""A kept vLLM engine that reloaded a policy's weights answers as a fresh engine on that policy does.

Policy B is the tiny random Llama with every weight nudged, saved as a checkpoint
the way the trainer saves one. A kept engine samples on A, then reloads B and
answers greedily and by sampling; fresh engines do the same on B. Greedy answers
must be equal, and so must the samples drawn with the same engine seed (the
reseed). B's samples differing from A's under that seed shows the reload really
changed the weights, so the test can fail. Three engine start-ups on CPU, about
20 s each.
"""

import shutil

import pyarrow as pa
import pytest
import torch

from core.layout import read_parquet_dir
from core.prompts import load_prompts
from pipeline.settings import load_config
from pools.vllm_engines import EnginePool, SamplingSpec
from stages.generate import generate_shards
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def nudged_model(tiny_model, tmp_path_factory):
    """The tiny model with noise added to every weight, saved as a policy checkpoint (safetensors)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("policy_b")
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std().clamp(min=1e-3))
    model.save_pretrained(path)
    # The tokenizer and chat template, as the trainer saves them beside each policy.
    for source in tiny_model.iterdir():
        if not (path / source.name).exists():
            shutil.copy(source, path / source.name)
    return path


def make_table(chunk, outputs):
    return pa.Table.from_pylist([
        {"prompt_id": prompt.prompt_id, "sample_index": index, "response": sample["text"]}
        for prompt, samples in zip(chunk, outputs, strict=True) for index, sample in enumerate(samples)])


def test_a_reloaded_engine_answers_as_a_fresh_one(local_ray, tiny_model, nudged_model, tmp_path):
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["generate.num_actors=1"])
    prompts = load_prompts(config.prompts.train)[:6]
    greedy = SamplingSpec(1, 0.0, 1.0, config.generate.max_tokens)
    sampled = SamplingSpec(3, 1.0, 1.0, config.generate.max_tokens)

    def answers(name, model, spec, seed, engines=None):
        generate_shards(prompts, str(model), spec, config, tmp_path / name, seed, make_table, engines)
        return [(r["prompt_id"], r["sample_index"], r["response"]) for r in read_parquet_dir(tmp_path / name).to_pylist()]

    kept = EnginePool(config, keep=True)
    try:
        sampled_on_a = answers("kept-a", tiny_model, sampled, 5, kept)
        engine = kept.workers[0]
        reloaded_greedy = answers("kept-b-greedy", nudged_model, greedy, 3, kept)
        reloaded_sampled = answers("kept-b-sampled", nudged_model, sampled, 5, kept)
        assert kept.workers[0] is engine, "the pool started another engine instead of reloading"
    finally:
        kept.close()
    fresh_greedy = answers("fresh-b-greedy", nudged_model, greedy, 3)
    fresh_sampled = answers("fresh-b-sampled", nudged_model, sampled, 5)

    assert len({r[2] for r in fresh_sampled}) > 1, "samples at temperature 1 should differ"
    assert sampled_on_a != fresh_sampled, "A and B sample alike: the test could not fail"
    assert reloaded_greedy == fresh_greedy
    assert reloaded_sampled == fresh_sampled
