"""Model families through vLLM and our log-prob path:
`python -m tests.family_engine_check <work dir> <model dir>...`.

One family at a time (a process holds one vLLM engine at a time; each is deleted before the
next starts); the transformers side runs in a child process of its own (see MODELS). It prints
one `RESULT` JSON line per family with what it measured:

1. vLLM (fp32, as the engines of a round run on CPUs without bf16) samples the probe prompt;
   our tokenization of the prompt must give vLLM's prompt ids, and each sample's ids, scored as
   they are, must give vLLM's own log-probs of them (`logprobs_mode` raw: the model's logits).
2. One optimizer step of our trainer's log-prob loss, saved by the trainer's save_policy (fp32).
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


def sample(llm, temperature: float, n: int) -> list[dict]:
    """vLLM's answers to PROMPTS as plain data (they cross to the scoring process)."""
    from vllm import SamplingParams

    params = SamplingParams(n=n, temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0)
    return [{"prompt_token_ids": list(out.prompt_token_ids),
             "completions": [{"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                              "logprob": sum(step[t].logprob for step, t in zip(c.logprobs, c.token_ids))}
                             for c in out.outputs]}
            for out in llm.chat(PROMPTS, params, use_tqdm=False)]


# --- the scoring process: transformers only -------------------------------------------------
# vLLM serves some families (OLMo-2) through its Transformers backend, which patches
# transformers' model classes inside its own process; the pipeline never scores there either
# (engines live in their own Ray actors), so the models below live in a process of their own.
MODELS: dict[str, object] = {}


def load_models(model_dir: str) -> int:
    import torch

    from pools.logprob_scorer import load_policy

    torch.manual_seed(0)
    MODELS["policy"], MODELS["tokenizer"] = load_policy(model_dir, "float32")
    MODELS["base"], _ = load_policy(model_dir, "float32")
    return MODELS["tokenizer"].eos_token_id


def compare(outputs: list[dict], which: str) -> dict:
    """Our tokenization and log-probs of vLLM's samples against vLLM's; the stop tokens it emitted."""
    import torch

    from pools.logprobs import list_batch, sequence_logprobs, tokenize_example

    model, tokenizer = MODELS[which], MODELS["tokenizer"]
    pad = tokenizer.pad_token_id or 0
    prompt_mismatches, gaps, samples = 0, [], []
    for messages, out in zip(PROMPTS, outputs, strict=True):
        completions = out["completions"]
        items = [tokenize_example(tokenizer, messages, c["token_ids"], 10**6) for c in completions]
        prompt_mismatches += sum(ids[:n] != out["prompt_token_ids"] for ids, n in items)
        with torch.no_grad():
            for share_prompt in (False, True):
                ours = sequence_logprobs(model, list_batch([items], pad, share_prompt)).tolist()
                gaps += [abs(value - c["logprob"]) / len(c["token_ids"]) for value, c in zip(ours, completions)]
        samples += [{"finish_reason": c["finish_reason"], "last": c["token_ids"][-1], "length": len(c["token_ids"]),
                     "text_ids": list(tokenizer.encode(c["text"], add_special_tokens=False)),
                     "ids": c["token_ids"]} for c in completions]
    return {"prompt_mismatches": prompt_mismatches, "max_gap_per_token": max(gaps), "samples": samples}


def train_one_step(outputs: list[dict], out_dir: str) -> None:
    """One AdamW step raising the log-prob of each prompt's first sample, saved as the trainer saves."""
    import torch

    from core.config import TrainConfig
    from pools.logprobs import list_batch, sequence_logprobs, tokenize_example
    from stages.train.loop import save_policy

    model, tokenizer = MODELS["policy"], MODELS["tokenizer"]
    items = [[tokenize_example(tokenizer, messages, out["completions"][0]["token_ids"], 10**6)]
             for messages, out in zip(PROMPTS, outputs, strict=True)]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-sequence_logprobs(model, list_batch(items, tokenizer.pad_token_id or 0, True)).sum()).backward()
    optimizer.step()
    model.eval()
    save_policy(model, tokenizer, TrainConfig(), Path(out_dir), rank=0, sharded=False)


def check_family(scorer, model_dir: str, work_dir: str) -> dict:
    import gc

    trained = str(Path(work_dir) / "trained")
    call = lambda function, *args: scorer.submit(function, *args).result()  # noqa: E731
    eos = call(load_models, model_dir)
    llm = engine(model_dir)
    base = call(compare, sample(llm, 1.0, 4), "policy")
    call(train_one_step, sample(llm, 0.0, 1), trained)
    llm.collective_rpc("reload_weights", kwargs={"weights_path": trained})
    llm.collective_rpc("retie_lm_head")
    llm.reset_prefix_cache()
    reloaded_outputs = sample(llm, 0.0, 1)
    reloaded = call(compare, reloaded_outputs, "policy")
    # Were the weights really replaced? The base model's log-probs must be far from the engine's now.
    stale = call(compare, reloaded_outputs, "base")["max_gap_per_token"]
    del llm
    gc.collect()
    fresh_engine = engine(trained)
    fresh = [out["completions"][0]["token_ids"] for out in sample(fresh_engine, 0.0, 1)]
    del fresh_engine
    gc.collect()
    return {"eos_token_id": eos, "base": base, "reloaded": reloaded,
            "reloaded_greedy": [out["completions"][0]["token_ids"] for out in reloaded_outputs],
            "fresh_greedy": fresh, "base_model_gap_after_reload": stale}


def main(work_dir: str, model_dirs: list[str]) -> None:
    """Every family in turn, one engine at a time; a RESULT line per family."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as scorer:
        for model_dir in model_dirs:
            result = check_family(scorer, model_dir, str(Path(work_dir) / Path(model_dir).name))
            print("RESULT " + json.dumps({"model": model_dir, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
