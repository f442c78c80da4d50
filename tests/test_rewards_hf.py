"""The hf_classifier reward on a tiny random LlamaForSequenceClassification saved locally."""

import json
import shutil

import pytest
import torch
import transformers

from core.config import RewardConfig
from core.errors import ConfigError, PipelineError
from pipeline.settings import load_config
from rewards import REWARDS, Sample, build_reward_from_config
from rewards.hf_classifier import HFClassifierReward
from tests.tiny_reward_model import save_tiny_classifier

PROMPT = [{"role": "user", "content": "Tell me about tea."}]
WORDS = "tea leaves water steep green black cup warm morning slowly".split()


@pytest.fixture(scope="module")
def classifier_dir(tiny_model, tmp_path_factory):
    return save_tiny_classifier(tiny_model, tmp_path_factory.mktemp("reward") / "classifier")


@pytest.fixture(scope="module")
def reward(classifier_dir):
    return build_reward_from_config(RewardConfig(name="hf_classifier", model=str(classifier_dir),
                                                 micro_batch_size=4))


def make_samples(lengths):
    return [Sample(f"p{i}", PROMPT, " ".join(WORDS[j % len(WORDS)] for j in range(n)), {})
            for i, n in enumerate(lengths)]


# Shuffled lengths, so that length order differs from sample order.
LENGTHS = [3, 40, 1, 25, 7, 60, 12, 2, 33, 9]


@pytest.fixture(scope="module")
def expected(classifier_dir, reward):
    """Each sample of LENGTHS alone through a freshly loaded transformers model, no padding anywhere."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_dir, local_files_only=True)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([reward.encode(s)])).logits[0, 0].item() for s in make_samples(LENGTHS)]


def record_batches(monkeypatch, reward, fail_above=None, error=torch.OutOfMemoryError):
    """Spy on the reward's forward passes; batches larger than `fail_above` raise `error`."""
    calls = []
    real_forward = reward.forward

    def forward(batch):
        calls.append([len(ids) for ids in batch])
        if fail_above is not None and len(batch) > fail_above:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(batch)

    monkeypatch.setattr(reward, "forward", forward)
    return calls


def test_registered():
    assert REWARDS["hf_classifier"] is HFClassifierReward


def test_sorted_batches_match_one_at_a_time_in_original_order(reward, expected, monkeypatch):
    samples = make_samples(LENGTHS)
    assert len({round(x, 3) for x in expected}) == len(samples)  # distinct, so order mistakes show

    calls = record_batches(monkeypatch, reward)
    scores = reward.score(samples)

    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert [len(batch) for batch in calls] == [4, 4, 2]
    flat = [n for batch in calls for n in batch]
    assert flat == sorted(flat, reverse=True)  # batches hold neighbours in length
    assert sorted(flat) == sorted(len(reward.encode(s)) for s in samples)


def test_score_of_no_samples_is_empty(reward):
    assert reward.score([]) == []


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_batch_and_gives_the_same_scores(reward, expected, monkeypatch, error):
    monkeypatch.setattr(reward, "batch_size", 8)
    samples = make_samples(LENGTHS)
    calls = record_batches(monkeypatch, reward, fail_above=2, error=error)

    scores = reward.score(samples)

    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # 8 fails, 4 fails, then batches of 2 for the rest of the samples.
    assert [len(batch) for batch in calls] == [8, 4, 2, 2, 2, 2, 2]
    assert reward.batch_size == 2


def test_out_of_memory_on_one_sequence_is_a_one_line_error(reward, monkeypatch):
    monkeypatch.setattr(reward, "batch_size", 4)  # restored afterwards: the halving sticks
    calls = record_batches(monkeypatch, reward, fail_above=0)
    with pytest.raises(PipelineError, match="ran out of memory on a single sequence.*reward.max_length") as info:
        reward.score(make_samples([5, 6, 7]))
    assert "\n" not in str(info.value)
    assert [len(batch) for batch in calls] == [3, 2, 1]


def test_other_runtime_errors_are_not_retried(reward, monkeypatch):
    def broken(batch):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(reward, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        reward.score(make_samples([5, 6]))
    assert reward.batch_size == 4


def test_max_length_keeps_the_end_of_the_chat(reward, monkeypatch):
    sample = make_samples([50])[0]
    full = reward.encode(sample)
    monkeypatch.setattr(reward, "max_length", 16)
    assert len(full) > 16 and reward.encode(sample) == full[-16:]


@pytest.mark.parametrize("setting", [None, False, True])
def test_trust_remote_code_is_off_by_default_and_passed_through(classifier_dir, monkeypatch, setting):
    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append((kwargs["trust_remote_code"], kwargs["local_files_only"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    options = {} if setting is None else {"trust_remote_code": setting}
    build_reward_from_config(RewardConfig(name="hf_classifier", model=str(classifier_dir), **options))
    assert seen == [(bool(setting), True)] * 2


def test_dtype_auto_is_float32_on_cpu_and_configurable(classifier_dir, reward):
    assert reward.model.dtype == torch.float32  # built with the default dtype, auto
    bf16 = build_reward_from_config({"name": "hf_classifier", "model": str(classifier_dir), "dtype": "bfloat16"})
    assert bf16.model.dtype == torch.bfloat16
    assert isinstance(bf16.score(make_samples([4]))[0], float)


def test_missing_model_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PipelineError, match=f"'reward.model': model directory {missing} does not exist") as info:
        build_reward_from_config(RewardConfig(name="hf_classifier", model=str(missing)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("config", [RewardConfig(name="hf_classifier"), {"name": "hf_classifier"}])
def test_empty_model_names_the_key(config):
    with pytest.raises(ConfigError, match="'reward.model'"):
        build_reward_from_config(config)


def test_model_dir_without_weights_is_a_one_line_error(classifier_dir, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(classifier_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=f"reward model {broken} \\(reward.model\\) does not load") as info:
        HFClassifierReward(str(broken))
    assert "\n" not in str(info.value)


def test_tokenizer_without_chat_template_names_the_path_and_key(classifier_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(classifier_dir, bare)
    (bare / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(PipelineError, match=f"reward model {bare} \\(reward.model\\) has no chat template") as info:
        HFClassifierReward(str(bare))
    assert "\n" not in str(info.value)


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny_model):
    # Pointing reward.model at a policy gives a classifier with a fresh 2-label head.
    with pytest.raises(PipelineError, match="labels; hf_classifier needs a single-score model"):
        HFClassifierReward(str(tiny_model))


def test_config_keys_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("reward:\n  name: hf_classifier\n  model: /models/rm\n  dtype: bfloat16\n"
                    "  max_length: 1024\n  micro_batch_size: 8\n")
    config = load_config(path, ["reward.trust_remote_code=true", "reward.micro_batch_size=4"])
    reward = config.reward
    assert (reward.model, reward.dtype, reward.max_length, reward.micro_batch_size, reward.trust_remote_code) == \
        ("/models/rm", "bfloat16", 1024, 4, True)
    assert load_config(None).reward.trust_remote_code is False


@pytest.mark.parametrize("overrides, key", [
    (["reward.name=hf_classifier"], "'reward.model'"),
    (["reward.name=composite", "reward.composite.components=ifeval:1.0,hf_classifier:0.5"], "'reward.model'"),
    (["reward.max_length=0"], "'reward.max_length'"),
    (["reward.micro_batch_size=0"], "'reward.micro_batch_size'"),
    (["reward.dtype=fp8"], "'reward.dtype'"),
])
def test_bad_reward_config_is_a_one_line_error_at_load(overrides, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
