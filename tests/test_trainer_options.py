"""Trainer options that change how the policy is updated: LoRA and bf16 autocast."""

import torch
from safetensors.torch import load_file

from core.objectives import OBJECTIVES
from pools.logprob_scorer import autocast, load_policy
from stages.train.data import add_lora, build_examples, use_sparse_embedding_grad
from stages.train.loop import list_scores
from tests.test_reference_numerics import lists_rows, with_reference


def train_steps(model, examples, tokenizer, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        scores, mask, _ = list_scores(model, examples, tokenizer, "contrastive", beta=0.1, chunk_size=64)
        loss = OBJECTIVES["contrastive"](scores, mask).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_trains_adapters_only_and_merges_into_a_plain_checkpoint(tiny_model, tmp_path):
    rows = with_reference(lists_rows(), tiny_model)
    model, tokenizer = load_policy(str(tiny_model), "float32")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = add_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules="q_proj,v_proj")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    examples = build_examples(rows, tokenizer, max_length=128, max_list_size=8)
    losses = train_steps(model, examples, tokenizer)
    assert losses[-1] < losses[0]

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(tmp_path / "model.safetensors")
    # Tied embeddings are stored once; every stored tensor is a plain (non-LoRA) weight.
    assert set(state) <= set(base) and not any("lora" in k for k in state)
    changed = {k for k in state if not torch.equal(base[k], state[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_full_fine_tuning_lowers_the_loss(tiny_model):
    rows = with_reference(lists_rows(), tiny_model)
    model, tokenizer = load_policy(str(tiny_model), "float32")
    examples = build_examples(rows, tokenizer, max_length=128, max_list_size=8)
    losses = train_steps(model, examples, tokenizer, lr=1e-3)
    assert losses[-1] < losses[0]


def test_autocast_setting():
    on = autocast("on")
    with on:
        x = torch.ones(4, 4) @ torch.ones(4, 4)
    assert x.dtype == torch.bfloat16
    with autocast("off"):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == torch.float32


def test_fp32_checkpoint_keeps_an_update_that_bf16_would_erase(tiny_model, tmp_path):
    """A round's update at a typical learning rate is below bf16's resolution: saving in
    fp32 (the default train.save_dtype) is what carries it into the next round."""
    rows = with_reference(lists_rows(), tiny_model)
    model, tokenizer = load_policy(str(tiny_model), "float32")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    examples = build_examples(rows, tokenizer, max_length=128, max_list_size=8)
    train_steps(model, examples, tokenizer, steps=1, lr=1e-6)
    model.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(tmp_path / "model.safetensors")
    changed = sum((saved[k] != base[k]).sum().item() for k in saved)
    total = sum(t.numel() for t in saved.values())
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert changed > 0.5 * total
    survives_bf16 = sum((saved[k].bfloat16() != base[k].bfloat16()).sum().item() for k in saved)
    assert survives_bf16 < 0.05 * changed


def test_sparse_embedding_gradient_equals_the_dense_one(tiny_model):
    rows = with_reference(lists_rows(), tiny_model)
    grads = {}
    for sparse in (False, True):
        model, tokenizer = load_policy(str(tiny_model), "float32")
        assert use_sparse_embedding_grad(model) if sparse else True
        examples = build_examples(rows, tokenizer, max_length=128, max_list_size=8)
        for micro in (examples[:1], examples[1:]):  # accumulated over two micro-batches
            scores, mask, _ = list_scores(model, micro, tokenizer, "contrastive", beta=0.1, chunk_size=64)
            OBJECTIVES["contrastive"](scores, mask).sum().backward()
        grads[sparse] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads[True].items():
        assert grad.layout == torch.strided, name  # what AdamW, clipping and all_reduce need
        torch.testing.assert_close(grad, grads[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_sparse_embedding_gradient_only_for_tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    assert not use_sparse_embedding_grad(untied)  # its gradient would stay sparse: AdamW refuses those
    assert not untied.get_input_embeddings().sparse
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    assert use_sparse_embedding_grad(tied) and tied.get_input_embeddings().sparse
