"""Same config and seed, same candidates: the generate stage's vLLM path run twice on the tiny model.

Three engine start-ups on CPU (about 20 s each): seed s, seed s again, seed s+1.
The third makes sure the test can fail, i.e. that sampling really depends on the seed.
"""

import pyarrow as pa
import pytest

from core.layout import read_parquet_dir
from core.prompts import load_prompts
from pipeline.settings import load_config
from pools.vllm_engines import SamplingSpec
from stages.generate import generate_shards
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_same_seed_gives_identical_candidates(local_ray, tiny_model, tmp_path):
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["generate.num_actors=1"])
    prompts = load_prompts(config.prompts.train)[:6]
    # Temperature 1 and K=4: with a seed that did not reach the sampler, runs would differ.
    spec = SamplingSpec(4, 1.0, 1.0, config.generate.max_tokens)

    def make_table(chunk, outputs):
        return pa.Table.from_pylist([
            {"prompt_id": prompt.prompt_id, "sample_index": index, "response": sample["text"],
             "num_tokens": sample["num_tokens"]}
            for prompt, samples in zip(chunk, outputs, strict=True) for index, sample in enumerate(samples)])

    def generate(name: str, seed: int) -> list[tuple]:
        generate_shards(prompts, str(tiny_model), spec, config, tmp_path / name, seed, make_table)
        rows = read_parquet_dir(tmp_path / name).to_pylist()
        return [(r["prompt_id"], r["sample_index"], r["response"], r["num_tokens"]) for r in rows]

    first, again, other = generate("first", 7), generate("again", 7), generate("other", 8)
    assert len(first) == len(prompts) * spec.num_samples
    assert len({response for _, _, response, _ in first}) > 1, "samples of a random model should differ"
    assert first == again
    assert [r[2] for r in first] != [r[2] for r in other]
