"""The reward-model matrix: a candidate's reward is its own, whatever its batch.

Tiny random-weight sequence classifiers of the families reward models come in, each with a
tokenizer and chat template of its own that differ from the policy's:
  llama-eot-pad  Llama, padded with its end-of-turn token, which also ends every chat (as
                 Llama-3 reward models do): the case that read the score one token early
  qwen2          Qwen2 (qkv bias), its own ChatML-style template
  gemma2         Gemma-2, a Gemma-style template
  deberta-v2     a DeBERTa-v2 encoder without a chat template: a (prompt, response) text pair
Each candidate's reward must equal its reward by definition (the score head at the chat's last
token, one sequence alone, no padding; the [CLS] logit for the encoder) within 1e-4, scored in
a batch of every length, one at a time, and in batches of two in reverse order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import RewardConfig
from rewards import Sample, build_reward_from_config

TOLERANCE = 1e-4
PROMPT = [{"role": "user", "content": "Tell me about tea."}]
WORDS = "tea leaves water steep green black cup warm morning slowly".split()
LENGTHS = [3, 40, 1, 25, 7, 60, 12, 2]
END_OF_TURN = 2  # <|im_end|> in the SmolLM2 tokenizer

TEMPLATES = {
    # Ends every chat with <|im_end|> and nothing after it, like Llama-3's <|eot_id|>.
    "llama-eot-pad": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}",
    "qwen2": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    "gemma2": "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}",
    "deberta-v2": None,
}
FAMILIES = {"llama-eot-pad": ("llama", {"head_dim": 64}), "qwen2": ("qwen2", {}),
            "gemma2": ("gemma2", {"head_dim": 64, "query_pre_attn_scalar": 64}),
            "deberta-v2": ("deberta-v2", {"max_position_embeddings": 512, "type_vocab_size": 2})}


def build_classifier(name: str, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    model_type, extra = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer.chat_template = TEMPLATES[name]
    if name == "llama-eot-pad":
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(END_OF_TURN)
    elif name != "deberta-v2":
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=2, num_labels=1,
                                  pad_token_id=tokenizer.pad_token_id, **extra)
    if model_type != "deberta-v2":
        config.num_key_value_heads = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    head = model.classifier if model_type == "deberta-v2" else model.score
    torch.nn.init.normal_(head.weight, std=1.0)  # scores far enough apart to tell one token's shift
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if TEMPLATES[name] is None:
        (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def classifiers(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward-families")
    return {name: build_classifier(name, tiny_model, root / name) for name in FAMILIES}


def make_samples() -> list[Sample]:
    return [Sample(f"p{i}", PROMPT, " ".join(WORDS[j % len(WORDS)] for j in range(n)), {})
            for i, n in enumerate(LENGTHS)]


def by_definition(reward, samples: list[Sample]) -> list[float]:
    """The score head at each chat's last token (decoders) or at [CLS] (encoders), one sequence alone."""
    model = reward.model
    values = []
    with torch.inference_mode():
        for sample in samples:
            ids = torch.tensor([reward.encode(sample)])
            if model.config.model_type == "deberta-v2":
                values.append(model(input_ids=ids).logits[0, 0].item())
            else:
                hidden = model.base_model(input_ids=ids).last_hidden_state
                values.append(model.score(hidden[0, -1]).item())
    return values


def reward_for(path: Path, batch_size: int):
    return build_reward_from_config(RewardConfig(name="hf_classifier", model=str(path), micro_batch_size=batch_size))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_reward_is_its_own_whatever_its_batch(classifiers, name):
    samples = make_samples()
    together = reward_for(classifiers[name], len(samples))
    expected = by_definition(together, samples)
    assert len(set(round(v, 3) for v in expected)) == len(expected), "scores too close to tell a shift"
    alone = reward_for(classifiers[name], 1)
    pairs = reward_for(classifiers[name], 2)
    for scores in (together.score(samples), alone.score(samples), pairs.score(samples[::-1])[::-1]):
        assert max(abs(a - b) for a, b in zip(scores, expected)) < TOLERANCE


def test_the_end_of_turn_pad_would_read_the_score_one_token_early(classifiers):
    # Why batch_pad_id exists: with the tokenizer's pad id, transformers reads the token before
    # the chat's last <|im_end|>, which gives another score.
    reward = reward_for(classifiers["llama-eot-pad"], 1)
    sample = make_samples()[0]
    ids = reward.encode(sample)
    assert ids[-1] == END_OF_TURN == reward.pad_id
    with torch.inference_mode():
        reward.model.config.pad_token_id = END_OF_TURN
        early = reward.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert abs(early - by_definition(reward, [sample])[0]) > 1e-2
    assert abs(reward.score([sample])[0] - by_definition(reward, [sample])[0]) < TOLERANCE


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_the_reward_models_own_template_renders_the_chat(classifiers, name):
    reward = reward_for(classifiers[name], 4)
    text = reward.tokenizer.decode(reward.encode(make_samples()[0]))
    marker = "<start_of_turn>model" if name == "gemma2" else "<|im_start|>assistant"
    assert marker in text
    # Not the policy's (SmolLM2's), which opens with its own system prompt.
    assert "You are a helpful AI assistant named SmolLM" not in text


def test_an_encoder_without_a_chat_template_reads_a_text_pair(classifiers):
    reward = reward_for(classifiers["deberta-v2"], 4)
    assert reward.text_pairs
    sample = make_samples()[1]
    assert reward.encode(sample) == reward.tokenizer(PROMPT[0]["content"], sample.response)["input_ids"]
