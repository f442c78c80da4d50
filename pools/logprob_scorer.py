"""The log-prob scorer the reference stage and the trainer share: the policy, loaded and run alike.

The reference log-probs are only valid if they are computed exactly as the
trainer computes the policy's, so both load the model, tokenize items and
batch them through these functions (pools/logprobs.py holds the batch
layouts and the log-prob math), with the settings of one LogprobSpec. No
Ray here: the reference stage runs this in its own Ray task
(stages/reference/task.py), and `make gpu-check` imports it on a machine
without Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from core import timing
from core.errors import PipelineError
from core.hardware import native_bf16
from core.progress import worker_bar
from pools.logprobs import Response, list_batch, sequence_logprobs, tokenize_example

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def use_all_cpu_threads() -> None:
    # Ray sets OMP_NUM_THREADS to a task's CPU count (often 1); a stage that
    # owns the machine should use every core.
    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)


def attention_for(config) -> str | None:
    """The attention implementation that computes what the model defines: sdpa ignores an
    attention soft-cap (Gemma-2's attn_logit_softcapping), eager applies it; None: the default."""
    text = getattr(config, "get_text_config", lambda: config)()
    return "eager" if getattr(text, "attn_logit_softcapping", None) is not None else None


def load_policy(path: str, dtype: str, trust_remote_code: bool = False, check: bool = True):
    """The policy and its tokenizer on this worker's device; with `check`, refused in one line if our
    log-probs are not the model's own (check_logprob_path)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    extra = {"attn_implementation": attention} if (attention := attention_for(config)) else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                 **extra)
    model = model.to(pick_device())
    if check:
        check_logprob_path(model, tokenizer, path)
    return model, tokenizer


# Per-token agreement the load-time check asks of our log-probs with the model's own, in nats:
# fp32 paths differ by rounding only; bf16 weights round each matmul to 8 bits of mantissa, more
# so the wider the model (docs/models.md). A family transform left out costs nats per token.
LOGPROB_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}
PROBE_PROMPT = [{"role": "user", "content": "Name three colours, then stop."}]
PROBE_ANSWERS = ("Red, green and blue.", "Blue, yellow, and a shade of purple that has no name.")


def model_logprobs(model, items: list[tuple[list[int], int]]) -> list[float]:
    """sum log_softmax(model(ids).logits)[label] over each item's response, one forward per item:
    the model's own numbers, as transformers' loss would compute them."""
    totals = []
    for ids, num_prompt in items:
        input_ids = torch.tensor([ids], device=model.device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0].float()
        logps = torch.log_softmax(logits[num_prompt - 1:-1], dim=-1)
        totals.append(logps.gather(-1, input_ids[0, num_prompt:, None]).sum().item())
    return totals


def logprob_gap(model, tokenizer, items: list[tuple[list[int], int]], chunk_size: int = 64) -> float:
    """The largest per-token difference between our log-probs (one row per item, and the items packed
    after their shared prompt) and the model's own."""
    pad = pad_token_id(tokenizer)
    with torch.no_grad():
        theirs = model_logprobs(model, items)
        gaps = []
        for share_prompt in (False, True):
            batch = {k: v.to(model.device) for k, v in list_batch([items], pad, share_prompt).items()}
            ours = sequence_logprobs(model, batch, chunk_size).tolist()
            gaps += [abs(a - b) / (len(ids) - n) for a, b, (ids, n) in zip(ours, theirs, items, strict=True)]
    return max(gaps)


def check_logprob_path(model, tokenizer, path: str) -> None:
    """Stop, in one line, rather than train on log-probs that are not the model's own: a family that
    does something after its last hidden state that FamilyHead does not reproduce, or an attention
    implementation that ignores part of the model (pools/logprobs.py)."""
    was_training = model.training
    model.eval()
    items = [tokenize_example(tokenizer, PROBE_PROMPT, tokenizer.encode(answer, add_special_tokens=False), 10**6)
             for answer in PROBE_ANSWERS]
    gap = logprob_gap(model, tokenizer, items)
    model.train(was_training)
    tolerance = LOGPROB_TOLERANCE.get(model.dtype, LOGPROB_TOLERANCE[torch.bfloat16])
    if not gap <= tolerance:
        family = getattr(model.config, "model_type", "?")
        raise PipelineError(f"log-probs of {path} ({family}) differ from the model's own logits by {gap:.3g} nats "
                            f"per token (tolerance {tolerance:g}): pools/logprobs.py does not reproduce what this "
                            "family computes after its last hidden state; it is not trained on")


def autocast_enabled(setting: str) -> bool:
    """Whether `train.autocast` = `setting` computes in bf16 here: on, or auto where bf16 is native."""
    return setting == "on" or (setting == "auto" and native_bf16())


def autocast(setting: str):
    """The bf16 autocast context the trainer and the reference stage both run under."""
    device = pick_device()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_enabled(setting))


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def list_batches(sizes: list[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of lists, grouped so that a batch holds about ``batch_size`` items (at least one
    list); lists of similar token counts go together, which wastes less compute on padding."""
    batches, current, items = [], [], 0
    for index in sorted((i for i in range(len(sizes)) if sizes[i]), key=lambda i: lengths[i]):
        if current and items + sizes[index] > batch_size:
            batches.append(current)
            current, items = [], 0
        current.append(index)
        items += sizes[index]
    return batches + [current] if current else batches


@dataclass(frozen=True)
class LogprobSpec:
    """Every setting a list's log-probs depend on besides the model's weights: the trainer's,
    which the reference scorer must share for log pi_theta - log pi_ref to start at zero.
    Built once from the config (`of`), for the reference stage and the train workers alike."""

    dtype: str                       # train.dtype: the weights as loaded
    max_length: int                  # train.max_length: where a response is cut
    batch_size: int                  # reference.batch_size: items scored a batch
    chunk_size: int                  # train.logprob_chunk_size: label positions projected at a time
    autocast: str = "off"            # train.autocast
    share_prompt: bool = True        # train.share_prompt: the batch layout
    trust_remote_code: bool = False  # model.trust_remote_code: how the model loads

    @classmethod
    def of(cls, config) -> LogprobSpec:
        """The reference scorer's spec under a whole config."""
        return cls.of_train(config.train, config.reference.batch_size, config.model.trust_remote_code)

    @classmethod
    def of_train(cls, train, batch_size: int, trust_remote_code: bool = False) -> LogprobSpec:
        """The same from the train config a train worker holds, and what it lacks."""
        return cls(train.dtype, train.max_length, batch_size, train.logprob_chunk_size, train.autocast,
                   train.share_prompt, trust_remote_code)


def logprobs_with(spec: LogprobSpec, model_path: str, lists: list[tuple[list[dict], list[Response]]]
                  ) -> list[list[float]]:
    """reference_logprobs under `spec`: load `model_path`, score every response of every list."""
    return reference_logprobs(model_path, lists, spec.dtype, spec.max_length, spec.batch_size, spec.chunk_size,
                              spec.trust_remote_code, spec.autocast, spec.share_prompt)


def score_with(spec: LogprobSpec, model, tokenizer, lists: list[tuple[list[dict], list[Response]]],
               part: tuple[int, int] = (0, 1), collective: bool = False) -> list[list[float] | None]:
    """score_lists under `spec`, on a model already loaded as `spec` says (a train worker's)."""
    return score_lists(model, tokenizer, lists, spec.max_length, spec.batch_size, spec.chunk_size, spec.autocast,
                       spec.share_prompt, part=part, collective=collective)


def reference_logprobs(model_path: str, lists: list[tuple[list[dict], list[Response]]], dtype: str, max_length: int,
                       batch_size: int, chunk_size: int, trust_remote_code: bool = False,
                       autocast_setting: str = "off", share_prompt: bool = True) -> list[list[float]]:
    """log pi(response | prompt) of each response of each (messages, responses) list, in order."""
    with timing.timed("startup"):
        use_all_cpu_threads()
        model, tokenizer = load_policy(model_path, dtype, trust_remote_code)
    return merge_parts([score_lists(model, tokenizer, lists, max_length, batch_size, chunk_size, autocast_setting,
                                    share_prompt)])


def score_lists(model, tokenizer, lists: list[tuple[list[dict], list[Response]]], max_length: int, batch_size: int,
                chunk_size: int, autocast_setting: str = "off", share_prompt: bool = True,
                part: tuple[int, int] = (0, 1), collective: bool = False) -> list[list[float] | None]:
    """reference_logprobs on a loaded model (left in eval mode): the train workers' reference scoring.

    `part` = (rank, world) scores every world-th batch from the rank-th on and leaves None for
    the lists of the other parts (merge_parts joins them): the batches are the ones a single
    scorer would form, so the log-probs do not depend on how many workers share them.
    `collective`: every forward is a collective (an FSDP-sharded model), so a part with fewer
    batches than another runs the first (shortest) list again, its result dropped, until all
    parts have run as many forwards.
    """
    model.eval()
    rank, world = part
    with timing.timed("work"), torch.no_grad(), autocast(autocast_setting):
        tokens = [[tokenize_example(tokenizer, messages, response, max_length) for response in responses]
                  for messages, responses in lists]
        batches = list_batches([len(items) for items in tokens],
                               [sum(len(ids) for ids, _ in items) for items in tokens], batch_size)
        # A list without items has nothing to score: part 0 answers for it.
        results: list[list[float] | None] = [None if items or rank else [] for items in tokens]
        pad = pad_token_id(tokenizer)
        mine: list[list[int] | None] = list(batches[rank::world])
        if collective:
            mine += [None] * (-(-len(batches) // world) - len(mine))
        for index in worker_bar(mine, desc="reference log-probs", unit="batch"):
            batch = list_batch([tokens[i] for i in (index or batches[0][:1])], pad, share_prompt)
            values = iter(sequence_logprobs(model, {k: v.to(model.device) for k, v in batch.items()}, chunk_size).tolist())
            for i in index or ():
                results[i] = [next(values) for _ in tokens[i]]
    return results


def merge_parts(parts: list[list[list[float] | None]]) -> list[list[float]]:
    """The log-probs of every list from the parts score_lists left (each list scored in exactly one)."""
    merged = []
    for index, found in enumerate(zip(*parts, strict=True)):
        scored = [logps for logps in found if logps is not None]
        if len(scored) != 1:
            raise ValueError(f"list {index} was scored by {len(scored)} parts, not exactly one")
        merged.append(scored[0])
    return merged
