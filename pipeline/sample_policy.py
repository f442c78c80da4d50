"""`larpo sample <round dir> "prompt"`: what a round's policy answers, sampled as the pipeline samples.

The policy is served by vLLM, in this process, with the run's engine settings (dtype, context
length, CPU KV cache): the same engine and chat template the generate and evaluate stages
use, so the answer is one a round could have drawn. Greedy by default, as evaluate answers.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.chat_tokens import ChatRenderError, chat_token_ids
from core.config import config_from_dict, read_yaml_file
from core.errors import PipelineError
from core.hardware import native_bf16
from pipeline.inspect_round import ROUND_NAME


def policy_of(round_dir: Path) -> Path:
    """The finished policy of a round; round 0's is the run's base model."""
    if not round_dir.is_dir() or not ROUND_NAME.fullmatch(round_dir.name):
        raise PipelineError(f"{round_dir} is not a round directory (expected a directory such as runs/default/round_001)")
    policy = round_dir / "policy"
    if not (round_dir / "_done" / "train").is_file() or not (policy / "config.json").is_file():
        raise PipelineError(f"round {round_dir.name} has no finished policy ({policy}): run the round first")
    return policy


def main(args) -> int:
    round_dir = Path(args.round_dir)
    policy = policy_of(round_dir)
    for name, value, low in (("--samples", args.samples, 1), ("--max-tokens", args.max_tokens, 1)):
        if value < low:
            raise PipelineError(f"{name} must be {low} or more; got {value}")
    if args.temperature < 0:
        raise PipelineError(f"--temperature must be 0 or more; got {args.temperature}")
    if args.temperature == 0 and args.samples > 1:
        raise PipelineError("greedy answers (--temperature 0) are all the same: draw several with --temperature > 0")
    config_path = round_dir.parent / "config.yaml"
    config = config_from_dict(read_yaml_file(config_path), source=str(config_path))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.generate.cpu_kv_cache_gib))
    # The engine core in this process: nothing to spawn or to leave behind.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The answer is what this command prints; vLLM's start-up chatter is not.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # After the environment above, which vLLM reads when it is imported.
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    # The prompt's ids as the generate stage makes them (pools/vllm_engines.py): its text stays text.
    tokenizer = AutoTokenizer.from_pretrained(str(policy), trust_remote_code=config.model.trust_remote_code)
    try:
        prompt = {"prompt_token_ids": chat_token_ids(tokenizer, [{"role": "user", "content": args.prompt}])}
    except ChatRenderError as exc:
        raise PipelineError(f"the prompt: {exc}") from None

    dtype = config.generate.dtype
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16() else "float32"
    llm = LLM(model=str(policy), dtype=dtype, seed=config.seed, max_model_len=config.model.max_model_len,
              enforce_eager=config.generate.enforce_eager, trust_remote_code=config.model.trust_remote_code)
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens)
    [output] = llm.generate([prompt], params, use_tqdm=False)
    for index, completion in enumerate(output.outputs):
        cut = "  [cut at --max-tokens]" if completion.finish_reason == "length" else ""
        print(f"--- {policy} answer {index + 1} of {args.samples}{cut}\n{completion.text}")
    return 0
