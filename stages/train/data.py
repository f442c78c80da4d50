"""The trainer's data and model options: list items as token ids, LoRA, sparse embedding grads.

The policy is loaded and scored through pools/logprob_scorer.py, which the
reference stage shares, so both compute log-probs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pools.logprobs import response_to_score, tokenize_example

def use_sparse_embedding_grad(model) -> bool:
    """Let the input embedding's backward write only the rows of the batch's tokens.

    Its dense backward fills a vocab x hidden zero tensor every micro-batch and adds it
    into the gradient: for a 135M model with a 49k vocabulary, 113 MB each time (its time:
    docs/benchmarks.md). Only for tied embeddings: there the LM head's dense gradient reaches
    the shared weight first (the head runs last in forward, so first in backward) and the
    sparse rows are added into it in place, so the optimizer, clipping and the cross-worker
    sum still see a dense gradient. Returns whether it was turned on.
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(inputs, torch.nn.Embedding) or outputs is None or inputs.weight is not outputs.weight:
        return False
    inputs.sparse = True
    return True


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: str):
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@dataclass
class ListExample:
    """One prompt's list, best-first, tokenized and ready to score."""

    prompt_id: str
    tokens: list[tuple[list[int], int]]  # (prompt + response ids, prompt length) per item
    ref_logps: list[float]
    rewards: list[float]


def list_items(row: dict[str, Any], max_list_size: int | None = None) -> list[dict[str, Any]]:
    """Positives then negatives: the list in reward order, cut to the best `max_list_size`."""
    items = list(row["positives"]) + list(row["negatives"])
    return items[:max_list_size] if max_list_size else items


def build_examples(rows: list[dict[str, Any]], tokenizer, max_length: int, max_list_size: int) -> list[ListExample]:
    examples = []
    for row in rows:
        items = list_items(row, max_list_size)
        tokens = [tokenize_example(tokenizer, row["prompt"], response_to_score(item), max_length) for item in items]
        examples.append(ListExample(row["prompt_id"], tokens, [item["ref_logp"] for item in items],
                                    [item["reward"] for item in items]))
    return examples
