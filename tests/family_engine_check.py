"""One model family through vLLM and our log-prob path: `python -m tests.family_engine_check <model dir> <work dir>`.

Run in its own process per family (tests/test_model_families.py), because a process holds one
vLLM engine at a time. It prints one JSON line with what it measured:

1. vLLM (fp32, as the engines of a round run on CPUs without bf16) samples the probe prompt;
   our tokenization of the prompt must give vLLM's prompt ids, and each sample's ids, scored as
   they are, must give vLLM's own log-probs of them (`logprobs_mode` raw: the model's logits).
2. One optimizer step of our trainer's log-prob loss, saved by the trainer's save_policy.
3. The same engine reloads that checkpoint as a kept engine does between rounds (reload_weights,
   retie_lm_head); its greedy answers' log-probs must be the trained model's by our path, and
   far from the base model's (the reload really replaced the weights).
4. A fresh engine on the checkpoint answers greedily as the reloaded one did.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = [[{"role": "user", "content": "Name three colours, then stop."}],
           [{"role": "user", "content": "Write one sentence about the sea."}]]
MAX_TOKENS = 24


def engine(path: str):
    from vllm import LLM

    from pools.vllm_engines import EXTENSION

    return LLM(model=path, dtype="float32", enforce_eager=True, seed=0, max_model_len=512,
               worker_extension_cls=EXTENSION)


def sample(llm, temperature: float, n: int):
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0)
    return llm.chat(PROMPTS, params, use_tqdm=False)


def compare(outputs, model, tokenizer) -> dict:
    """Our tokenization and log-probs of vLLM's samples against vLLM's; the stop tokens it emitted."""
    from pools.logprobs import list_batch, sequence_logprobs, tokenize_example

    prompt_mismatches, gaps, samples = 0, [], []
    lists = []
    for messages, out in zip(PROMPTS, outputs, strict=True):
        items = [tokenize_example(tokenizer, messages, list(c.token_ids), 10**6) for c in out.outputs]
        prompt_mismatches += sum(ids[:n] != list(out.prompt_token_ids) for ids, n in items)
        lists.append((items, out.outputs))
    import torch

    with torch.no_grad():
        for share_prompt in (False, True):
            for items, completions in lists:
                ours = sequence_logprobs(model, list_batch([items], tokenizer.pad_token_id or 0, share_prompt))
                for value, c in zip(ours.tolist(), completions, strict=True):
                    theirs = sum(step[token].logprob for step, token in zip(c.logprobs, c.token_ids))
                    gaps.append(abs(value - theirs) / len(c.token_ids))
    for _, completions in lists:
        samples += [{"finish_reason": c.finish_reason, "last": c.token_ids[-1], "length": len(c.token_ids),
                     "text_ids": list(tokenizer.encode(c.text, add_special_tokens=False)),
                     "ids": list(c.token_ids)} for c in completions]
    return {"prompt_mismatches": prompt_mismatches, "max_gap_per_token": max(gaps), "samples": samples}


def train_one_step(model, tokenizer, outputs, out_dir: Path) -> None:
    """One AdamW step raising the log-prob of each prompt's first sample, saved as the trainer saves."""
    import torch

    from pipeline.config import TrainConfig
    from pools.logprobs import list_batch, sequence_logprobs, tokenize_example
    from stages.train.loop import save_policy

    items = [tokenize_example(tokenizer, messages, list(out.outputs[0].token_ids), 10**6)
             for messages, out in zip(PROMPTS, outputs, strict=True)]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = -sequence_logprobs(model, list_batch([[item] for item in items], tokenizer.pad_token_id or 0, True)).sum()
    loss.backward()
    optimizer.step()
    model.eval()
    save_policy(model, tokenizer, TrainConfig(), out_dir, rank=0, sharded=False)


def main(model_dir: str, work_dir: str) -> dict:
    import torch

    from pools.logprob_scorer import load_policy

    torch.manual_seed(0)
    trained = Path(work_dir) / "trained"
    llm = engine(model_dir)
    model, tokenizer = load_policy(model_dir, "float32")
    base = compare(sample(llm, 1.0, 4), model, tokenizer)
    train_one_step(model, tokenizer, sample(llm, 0.0, 1), trained)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(trained)})
    llm.collective_rpc("retie_lm_head")
    llm.reset_prefix_cache()
    reloaded_outputs = sample(llm, 0.0, 1)
    trained_model, _ = load_policy(str(trained), "float32")
    reloaded = compare(reloaded_outputs, trained_model, tokenizer)
    # Were the weights really replaced? The base model's log-probs must be far from the engine's now.
    stale = compare(reloaded_outputs, model, tokenizer)["max_gap_per_token"]
    del llm
    import gc

    gc.collect()
    fresh = [list(out.outputs[0].token_ids) for out in sample(engine(str(trained)), 0.0, 1)]
    return {"eos_token_id": tokenizer.eos_token_id, "base": base, "reloaded": reloaded,
            "reloaded_greedy": [list(out.outputs[0].token_ids) for out in reloaded_outputs],
            "fresh_greedy": fresh, "base_model_gap_after_reload": stale}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
