"""stages/generate.py: several temperatures per round (pure parts; vLLM itself runs in the e2e tests)."""

from types import SimpleNamespace

import pyarrow as pa
import pytest

from core import schema
from core.errors import ConfigError
from core.prompts import Prompt
from pipeline.settings import load_config
from pools.vllm_engines import SamplingSpec, group_samples, split_samples
from stages.generate import candidate_rows


@pytest.mark.parametrize("k, temperatures, blocks", [
    (4, [0.8], [(0.8, 4)]),
    (4, [0.6, 1.0], [(0.6, 2), (1.0, 2)]),
    (5, [0.6, 1.0], [(0.6, 3), (1.0, 2)]),
    (7, [0.2, 0.7, 1.2], [(0.2, 3), (0.7, 2), (1.2, 2)]),
    (2, [0.2, 0.7, 1.2], [(0.2, 1), (0.7, 1)]),
])
def test_split_samples(k, temperatures, blocks):
    assert split_samples(k, temperatures) == blocks
    assert sum(count for _, count in blocks) == k


def test_spec_without_temperatures_uses_the_single_temperature():
    assert SamplingSpec(4, 0.8, 1.0, 16).blocks() == [(0.8, 4)]
    assert SamplingSpec(4, 0.8, 1.0, 16, (0.5, 1.5)).blocks() == [(0.5, 2), (1.5, 2)]


def fake_output(texts: list[str]) -> SimpleNamespace:
    """The shape of a vLLM RequestOutput that group_samples reads."""
    return SimpleNamespace(outputs=[SimpleNamespace(text=t, token_ids=list(range(len(t))), finish_reason="stop")
                                    for t in texts])


def test_group_samples_puts_each_prompts_blocks_together_with_their_temperature():
    blocks = [(0.6, 2), (1.0, 1)]
    # two prompts, prompt-major: (p0, 0.6), (p0, 1.0), (p1, 0.6), (p1, 1.0)
    outputs = [fake_output(["a", "bb"]), fake_output(["ccc"]), fake_output(["d", "ee"]), fake_output(["fff"])]
    grouped = group_samples(outputs, blocks)
    assert [[s["text"] for s in samples] for samples in grouped] == [["a", "bb", "ccc"], ["d", "ee", "fff"]]
    assert [[s["temperature"] for s in samples] for samples in grouped] == [[0.6, 0.6, 1.0]] * 2
    assert grouped[0][1] == {"text": "bb", "num_tokens": 2, "finish_reason": "stop", "token_ids": [0, 1],
                             "temperature": 0.6}


def test_candidate_rows_carry_each_samples_temperature_and_index():
    prompts = [Prompt("p0", [{"role": "user", "content": "hi"}], {"constraints": []})]
    outputs = group_samples([fake_output(["a", "b"]), fake_output(["c", "d"])], [(0.6, 2), (1.0, 2)])
    rows = candidate_rows(prompts, outputs, round_number=2, policy="base")
    assert [(r["sample_index"], r["temperature"], r["response"]) for r in rows] == [
        (0, 0.6, "a"), (1, 0.6, "b"), (2, 1.0, "c"), (3, 1.0, "d")]
    table = pa.Table.from_pylist(rows, schema=schema.CANDIDATES)
    assert table.column("temperature").to_pylist() == [0.6, 0.6, 1.0, 1.0]


def test_temperatures_config_key():
    assert load_config(None).generate.temperatures == []
    config = load_config(None, ["generate.temperatures=0.6,1.0"])
    assert config.generate.temperatures == [0.6, 1.0]


@pytest.mark.parametrize("overrides, words", [
    (["generate.temperatures=-0.5,1.0"], "generate.temperatures"),
    (["generate.temperatures=0.6,0.6"], "without repeats"),
    (["generate.num_samples=2", "generate.temperatures=0.2,0.6,1.0"], "generate.num_samples is 2"),
])
def test_bad_temperatures_are_one_line_errors(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert words in str(info.value) and "\n" not in str(info.value)
