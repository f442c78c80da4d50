"""Tokenisation and sequence log-probabilities of responses, shared by training and reference.

log p(y|x) = sum_{t in response} log softmax(W h_{t-1})[y_t]

computed without a [N, T, V] tensor: only positions whose next token is a response token are
projected, ``chunk_size`` at a time, and under autograd each chunk is recomputed in backward
(activation checkpointing), so the logits held at any moment are about chunk_size x V.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def tokenize_example(tokenizer: Any, messages: list[dict], response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of chat prompt + response + eos, and the number of prompt tokens.

    The prompt is the chat template with the generation prompt (what the sampler saw); the
    response is tokenised on its own, as the sampler produced it, and ends with eos so the policy
    learns to stop. Over ``max_length`` the response loses its tail (eos first); the prompt is
    never cut, because a cut prompt would score the response against a different question.
    """
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(prompt).__name__}, expected str")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    # The template already wrote the special tokens (e.g. <|im_start|>); adding BOS etc. again
    # would shift the prompt away from what the sampler saw.
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    response_ids = list(tokenizer.encode(response, add_special_tokens=False)) + [eos]
    if len(prompt_ids) > max_length - 1:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, leaving no room for a response in max_length={max_length}")
    return prompt_ids + response_ids[: max_length - len(prompt_ids)], len(prompt_ids)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``(ids, num_prompt_tokens)`` examples into a batch.

    Returns ``input_ids`` [N, T] long, ``attention_mask`` [N, T] long and ``completion_mask``
    [N, T] bool, True at response tokens (the positions whose token is a label).
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (ids, num_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, num_prompt : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP-style wrappers (they keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _label_logprobs(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """log softmax(head(hidden))[label] per row of ``hidden`` [P, H] -> [P], in fp32."""
    logits = head(hidden).float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024, average: bool = False) -> Tensor:
    """Sum (or, with ``average``, mean) over response tokens of log p(token | prefix), [N] fp32.

    ``model`` is a causal LM whose logits are ``get_output_embeddings()(last hidden state)``
    (Llama, Qwen, Mistral, SmolLM; not models with logit soft-capping or scaling). It may be
    wrapped (DDP): we call the wrapper's forward, so its gradient synchronisation still runs, and
    ask it for logits of the last position only; the rest comes from the final hidden states.
    Differentiable; matches a full log_softmax gather to fp32 rounding.
    """
    input_ids, completion = batch["input_ids"], batch["completion_mask"].bool()
    out = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = out.hidden_states[-1]
    head = _unwrap(model).get_output_embeddings()

    # Hidden state t predicts token t+1; a response token at position 0 has no predictor.
    targets = completion[:, 1:]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1).expand_as(targets)[targets]
    states = hidden[:, :-1][targets]
    labels = input_ids[:, 1:][targets]

    pieces = []
    for start in range(0, labels.shape[0], chunk_size):
        args = (head, states[start : start + chunk_size], labels[start : start + chunk_size])
        if torch.is_grad_enabled():
            # Keep only the chunk's hidden states for backward, not its chunk x V logits.
            pieces.append(checkpoint(_label_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_label_logprobs(*args))
    token_logprobs = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)

    totals = token_logprobs.new_zeros(input_ids.shape[0]).index_add(0, rows, token_logprobs)
    if average:
        return totals / targets.sum(-1).clamp(min=1).to(totals.dtype)
    return totals
