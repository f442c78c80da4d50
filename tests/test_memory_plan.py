"""bench/memory_plan.py: its arithmetic on the published models, and every paper recipe within 80 GB a GPU."""

import pytest

from bench.memory_plan import (ARCHS, GB, GEMMA_2_2B, GPU_BYTES, LLAMA3_8B_RM, MISTRAL_7B, PLAN_MD, Arch,
                               kv_bytes_per_token, param_count, plans, render, train_state_bytes)


def test_parameter_counts_of_the_published_models():
    assert param_count(MISTRAL_7B) == pytest.approx(7.24e9, rel=0.01)
    assert param_count(GEMMA_2_2B) == pytest.approx(2.61e9, rel=0.01)
    # Llama-3-8B is 8.03e9 with its 128256 x 4096 LM head; the reward model has a 4096 x 1 score head instead.
    assert param_count(LLAMA3_8B_RM) - 4096 + 128256 * 4096 == pytest.approx(8.03e9, rel=0.01)


def transformers_model(arch: Arch):
    """The transformers model of the same numbers, on the meta device (no memory, no weights)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config, LlamaConfig,
                              MistralConfig)

    shape = dict(hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                 num_key_value_heads=arch.kv_heads, head_dim=arch.head_dim, intermediate_size=arch.intermediate,
                 vocab_size=arch.vocab, tie_word_embeddings=arch.tie_word_embeddings)
    with torch.device("meta"):
        if arch is GEMMA_2_2B:
            return AutoModelForCausalLM.from_config(Gemma2Config(**shape))
        if arch is MISTRAL_7B:
            return AutoModelForCausalLM.from_config(MistralConfig(**shape))
        return AutoModelForSequenceClassification.from_config(LlamaConfig(**shape, num_labels=1))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_parameter_count_is_the_transformers_models(name):
    arch = ARCHS[name]
    model = transformers_model(arch)
    # Tied weights are one tensor: parameters() yields it once.
    assert sum(p.numel() for p in model.parameters()) == param_count(arch)


def test_kv_cache_and_sharded_states_of_mistral_7b():
    # 2 (K and V) x 32 layers x 8 KV heads x 128 x 2 bytes.
    assert kv_bytes_per_token(MISTRAL_7B) == 131072
    assert kv_bytes_per_token(GEMMA_2_2B) == 2 * 26 * 4 * 256 * 2

    class Train:
        dtype, optimizer, num_workers, sharding = "float32", "adamw", 8, "fsdp"

    class Config:
        train = Train

    states = train_state_bytes(Config, MISTRAL_7B)
    # fp32 weights, gradients and two AdamW moments: 16 bytes a parameter, over 8 workers.
    assert sum(states.values()) == pytest.approx(16 * 7.24e9 / 8, rel=0.01)
    Train.sharding = "none"
    assert sum(train_state_bytes(Config, MISTRAL_7B).values()) == pytest.approx(16 * 7.24e9, rel=0.01)


def test_every_paper_recipe_fits_80_gb_a_gpu():
    for plan in plans():
        too_big = {stage: round(peak / GB, 1) for stage, peak in plan["peaks"].items() if peak > GPU_BYTES}
        assert not too_big and plan["fits"], f"{plan['path'].name}: {too_big or 'not one KV sequence fits'}"
        assert plan["stages"]["generate"][1]["full_sequences"] >= 1


def test_the_markdown_is_the_generated_plan():
    assert PLAN_MD.read_text() == render(plans()), "run: .venv/bin/python bench/memory_plan.py"
