"""What the trainer and the reference stage share: the policy, and list items as token ids.

The reference log-probs are only valid if they are computed exactly as the
trainer computes the policy's, so both stages load the model and tokenize
items through these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from stages.train.logprobs import tokenize_example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def use_all_cpu_threads() -> None:
    # Ray sets OMP_NUM_THREADS to a task's CPU count (often 1); a stage that
    # owns the machine should use every core.
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)


def load_policy(path: str, dtype: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.to(pick_device()), tokenizer


def use_sparse_embedding_grad(model) -> bool:
    """Let the input embedding's backward write only the rows of the batch's tokens.

    Its dense backward fills a vocab x hidden zero tensor every micro-batch and adds it
    into the gradient: for a 135M model with a 49k vocabulary, 113 MB and about a tenth of a
    second each time. Only for tied embeddings: there the LM head's dense gradient reaches
    the shared weight first (the head runs last in forward, so first in backward) and the
    sparse rows are added into it in place, so the optimizer, clipping and the cross-worker
    sum still see a dense gradient. Returns whether it was turned on.
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(inputs, torch.nn.Embedding) or outputs is None or inputs.weight is not outputs.weight:
        return False
    inputs.sparse = True
    return True


def autocast(setting: str):
    """The bf16 autocast context the trainer and the reference stage both run under."""
    from pipeline.hardware import native_bf16

    device = pick_device()
    enabled = setting == "on" or (setting == "auto" and native_bf16())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def add_lora(model, rank: int, alpha: float, dropout: float, target_modules: str):
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


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
        tokens = [tokenize_example(tokenizer, row["prompt"], item["response"], max_length) for item in items]
        examples.append(ListExample(row["prompt_id"], tokens, [item["ref_logp"] for item in items],
                                    [item["reward"] for item in items]))
    return examples
