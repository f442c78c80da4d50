"""Tokenisation and sequence log-probabilities of responses, shared by training and reference.

log p(y|x) = sum_{t in response} log softmax(W h_{t-1})[y_t]

computed without a [N, T, V] tensor: only positions whose next token is a response token are
projected, ``chunk_size`` at a time, and under autograd each chunk but the last is recomputed in
backward (activation checkpointing), so the logits held at any moment are about chunk_size x V.

Two batch layouts feed it, both described by where each label's predicting hidden state sits:
``collate`` puts every item in its own row; ``pack_lists`` puts one prompt's list in one row, the
prompt once and then each response, with an attention mask that lets every response see the
prompt and its own earlier tokens only. The second computes the prompt once instead of K times
and gives the same log-probs (up to fp32 rounding), because a response token then attends to
exactly the keys, at exactly the positions, that it would in its own row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from core.chat_tokens import chat_token_ids, text_ids

Item = tuple[list[int], int]  # prompt + response token ids, number of prompt tokens
# What is scored of a response: the ids the engine sampled, or (lists made before those were
# stored) its text.
Response = list[int] | str


def response_to_score(item: dict[str, Any]) -> Response:
    """A list item's or candidate's sampled ids, or its text where the row predates them."""
    ids = item.get("response_token_ids")
    return list(ids) if ids is not None else item["response"]


def tokenize_example(tokenizer: Any, messages: list[dict], response: Response, max_length: int) -> Item:
    """Token ids of chat prompt + response, and the number of prompt tokens.

    The prompt is the chat template with the generation prompt, tokenized by chat_token_ids
    (core/chat_tokens.py): exactly the ids the vLLM engines sampled after, each message's
    content as plain text. A response given as ids is what the engine sampled, scored as it is: a
    finished answer ends with the stop token the engine emitted, a truncated one (max_tokens) with
    nothing added, so no end-of-answer is taught where the answer did not end. A response given as
    text (rows made before the ids were stored) is tokenized as plain text (a special-token string
    in it stays text) and ends with eos, as it always did. Over ``max_length`` the response loses
    its tail; the prompt is never cut, because a cut prompt would score the response against a
    different question.
    """
    prompt_ids = chat_token_ids(tokenizer, messages)
    if isinstance(response, str):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id")
        response_ids = text_ids(tokenizer, response) + [eos]
    else:
        response_ids = [int(token) for token in response]
    if len(prompt_ids) > max_length - 1:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, leaving no room for a response in max_length={max_length}")
    return prompt_ids + response_ids[: max_length - len(prompt_ids)], len(prompt_ids)


def _label_layout(predictors: list[list[int]], labels: list[list[int]], width: int) -> dict[str, Tensor]:
    """Flat indices (row * width + position) of each item's predicting states, its labels,
    which item each label belongs to, and each item's label count."""
    index = [p for item in predictors for p in item]
    return {
        "label_index": torch.tensor(index, dtype=torch.long),
        "labels": torch.tensor([t for item in labels for t in item], dtype=torch.long),
        "label_item": torch.tensor([i for i, item in enumerate(labels) for _ in item], dtype=torch.long),
        "label_count": torch.tensor([len(item) for item in labels], dtype=torch.long),
    }


def _item_labels(ids: list[int], num_prompt: int, offset: int) -> tuple[list[int], list[int]]:
    """Indices of the states predicting an item's response tokens, and those tokens, for an item
    laid out whole from index ``offset``. State t predicts token t+1, so a response token at
    position 0 has no predictor."""
    first = max(num_prompt, 1)
    return [offset + t - 1 for t in range(first, len(ids))], ids[first:]


def collate(examples: list[Item], pad_id: int) -> dict[str, Tensor]:
    """Right-pad ``(ids, num_prompt_tokens)`` items into one row each.

    Returns ``input_ids`` [N, T] long, ``attention_mask`` [N, T] long, ``completion_mask``
    [N, T] bool (True at response tokens, the positions whose token is a label) and the label
    layout ``sequence_logprobs`` reads.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    predictors, labels = [], []
    for row, (ids, num_prompt) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, num_prompt : len(ids)] = True
        item_predictors, item_labels = _item_labels(ids, num_prompt, row * width)
        predictors.append(item_predictors)
        labels.append(item_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            **_label_layout(predictors, labels, width)}


def shared_prompt(items: list[Item]) -> int:
    """Length of the prompt every item of a list starts with, or 0 if they differ (or have none)."""
    num_prompt = items[0][1]
    prompt = items[0][0][:num_prompt]
    if num_prompt == 0 or any(n != num_prompt or ids[:n] != prompt for ids, n in items):
        return 0
    return num_prompt


def pack_lists(lists: list[list[Item]], pad_id: int) -> dict[str, Tensor]:
    """One row per list: its shared prompt once, then every item's response.

    Returns ``input_ids`` and ``position_ids`` [B, L], a boolean ``attention_mask`` [B, 1, L, L]
    (True where a query may attend a key) and the label layout. A response's positions continue
    from the prompt's end, as in its own row. A list whose items do not share a prompt is packed
    as whole items, each seeing only itself. Padding attends to itself alone, so no attention row
    is empty (an empty row is NaN in softmax, and NaN times a zero gradient is still NaN).
    """
    segments: list[list[tuple[list[int], int, int]]] = []  # per row: (token ids, first position, parent)
    predictors, labels, row_of_item = [], [], []  # predictors counted within their row for now
    for row_index, items in enumerate(lists):
        num_prompt = shared_prompt(items)
        row, start = [], 0
        if num_prompt:
            row.append((items[0][0][:num_prompt], 0, -1))
            start = num_prompt
        for ids, n in items:
            if num_prompt:
                row.append((ids[num_prompt:], num_prompt, 0))
                # The first response token is predicted by the prompt's last state.
                predictors.append([num_prompt - 1] + [start + t for t in range(len(ids) - num_prompt - 1)])
                labels.append(ids[num_prompt:])
            else:
                row.append((ids, 0, -1))
                item_predictors, item_labels = _item_labels(ids, n, start)
                predictors.append(item_predictors)
                labels.append(item_labels)
            start += len(row[-1][0])
            row_of_item.append(row_index)
        segments.append(row)

    width = max(sum(len(tokens) for tokens, _, _ in row) for row in segments)
    input_ids = torch.full((len(lists), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(lists), width), dtype=torch.long)
    segment_ids = torch.full((len(lists), width), -1, dtype=torch.long)
    parent_ids = torch.full((len(lists), width), -1, dtype=torch.long)  # the segment a query may also see
    for row, parts in enumerate(segments):
        end = 0
        for segment, (tokens, first_position, parent) in enumerate(parts):
            span = slice(end, end + len(tokens))
            input_ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            position_ids[row, span] = torch.arange(first_position, first_position + len(tokens))
            segment_ids[row, span] = segment
            parent_ids[row, span] = parent
            end += len(tokens)
    real = segment_ids >= 0
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    sees_parent = parent_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same_segment | sees_parent) & real[:, :, None] & real[:, None, :]
    allowed |= ~real[:, :, None] & torch.eye(width, dtype=torch.bool)
    attention_mask = allowed.unsqueeze(1)

    predictors = [[row * width + p for p in item] for row, item in zip(row_of_item, predictors)]
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
            **_label_layout(predictors, labels, width)}


def list_batch(lists: list[list[Item]], pad_id: int, share_prompt: bool) -> dict[str, Tensor]:
    """The lists' items in the layout ``train.share_prompt`` picks (trainer and reference stage alike)."""
    if share_prompt:
        return pack_lists(lists, pad_id)
    return collate([item for items in lists for item in items], pad_id)


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP-style wrappers (they keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# What a family's *ForCausalLM.forward does to lm_head's output, keyed by the config field that asks
# for it (read from transformers' modeling files): without it the log-probs are not the model's.
LOGIT_TRANSFORMS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "final_logit_softcapping": lambda logits, cap: torch.tanh(logits / cap) * cap,  # Gemma-2, Gemma-3
    "logit_scale": lambda logits, scale: logits * scale,                             # Cohere
    "logits_scaling": lambda logits, scaling: logits / scaling,                      # Granite, MiniCPM3
}


class FamilyHead(nn.Module):
    """The model's own logits from its last hidden states: lm_head, then its family's transforms.

    A family this does not cover is caught when the model loads (pools/logprob_scorer.py,
    check_logprob_path), not trained on silently.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        inner = _unwrap(model)
        self.head = inner.get_output_embeddings()
        config = getattr(inner.config, "get_text_config", lambda: inner.config)()
        self.transforms = [(LOGIT_TRANSFORMS[name], float(value)) for name in LOGIT_TRANSFORMS
                           if (value := getattr(config, name, None)) is not None]

    def forward(self, hidden: Tensor) -> Tensor:
        # In fp32, as the log-softmax after it: a soft-cap's tanh loses most in bf16.
        logits = self.head(hidden).float()
        for transform, value in self.transforms:
            logits = transform(logits, value)
        return logits


def _label_logprobs(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """log softmax(head(hidden))[label] per row of ``hidden`` [P, H] -> [P], in fp32."""
    logits = head(hidden)
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _model_mask(model: nn.Module, mask: Tensor) -> Tensor:
    """A packed boolean mask as the model's attention wants it: sdpa takes booleans,
    eager attention adds the mask to its scores."""
    if mask.dim() != 4:
        return mask
    implementation = getattr(_unwrap(model).config, "_attn_implementation", "sdpa")
    if implementation == "sdpa":
        return mask
    if implementation == "eager":
        dtype = _unwrap(model).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"train.share_prompt needs sdpa or eager attention; the model uses {implementation!r} "
                     "(set train.share_prompt: false)")


def _decoder(model: nn.Module) -> nn.Module | None:
    """The module whose output's ``last_hidden_state`` the causal LM projects into logits (its base
    model: LlamaModel in LlamaForCausalLM), through DDP-style and PEFT wrappers; None if not found."""
    inner = _unwrap(model)
    if callable(getattr(inner, "get_base_model", None)):  # PEFT: the causal LM with adapters injected
        inner = inner.get_base_model()
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) and decoder is not inner else None


def final_hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """The last hidden states [N, T, H] (after the final norm) of ``model(**inputs)``.

    The root model's forward runs, so a wrapper's hooks (DDP's gradient synchronisation, FSDP's
    gathering of the root's weights) still do; its decoder's output is caught by a forward hook
    rather than asked for with ``output_hidden_states=True``, which would keep every layer's states
    (their size at 7B: docs/gpu.md). Bit-identical: transformers' ``hidden_states[-1]`` is
    that same ``last_hidden_state``. The head is asked for the last position's logits only.
    """
    decoder = _decoder(model)
    if decoder is None:
        return model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]
    caught: list[Tensor] = []

    def catch(module: nn.Module, args: Any, output: Any) -> None:
        caught.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(catch)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(f"{type(decoder).__name__} did not run in {type(_unwrap(model)).__name__}'s forward")
    return caught[-1]


def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024, average: bool = False) -> Tensor:
    """Sum (or, with ``average``, mean) over response tokens of log p(token | prefix), one per item, fp32.

    ``batch`` comes from ``collate`` or ``pack_lists``. ``model`` is a causal LM whose logits are
    ``get_output_embeddings()(last hidden state)`` followed by its family's LOGIT_TRANSFORMS
    (soft-capping, scaling). It may be wrapped (DDP, PEFT) or sharded (FSDP2): we call its own
    forward, so its hooks still run, and take the final hidden states only (final_hidden_states);
    the logits come from those. Differentiable; matches a full log_softmax gather to fp32 rounding.
    """
    hidden = final_hidden_states(
        model,
        input_ids=batch["input_ids"],
        attention_mask=_model_mask(model, batch["attention_mask"]),
        position_ids=batch.get("position_ids"),
    )
    head = FamilyHead(model)
    states = hidden.reshape(-1, hidden.shape[-1])[batch["label_index"]]
    labels = batch["labels"]

    pieces = []
    for start in range(0, labels.shape[0], chunk_size):
        args = (head, states[start : start + chunk_size], labels[start : start + chunk_size])
        last = start + chunk_size >= labels.shape[0]
        if torch.is_grad_enabled() and not last:
            # Keep only the chunk's hidden states for backward, not its chunk x V logits.
            pieces.append(checkpoint(_label_logprobs, *args, use_reentrant=False))
        else:
            # The last chunk's logits are the first thing backward needs: keeping them from
            # here costs no more peak memory than recomputing them there, and saves a matmul.
            pieces.append(_label_logprobs(*args))
    token_logprobs = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)

    counts = batch["label_count"]
    totals = token_logprobs.new_zeros(counts.shape[0]).index_add(0, batch["label_item"], token_logprobs)
    if average:
        return totals / counts.clamp(min=1).to(totals.dtype)
    return totals
