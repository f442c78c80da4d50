"""Trainer benchmark: our list trainer against TRL's DPOTrainer on the same pairs and batch.

Each case runs in its own process so that its peak memory (max RSS) is its own:
  ours-k2      pairwise DPO on (chosen, rejected), reference log-probs precomputed (our design)
  ours-k4      listwise contrastive on 4 items per prompt, same prompts, same sequences per forward pass
  ours-k2-unshared  ours-k2 with each item in its own row: its prompt run once per item, as TRL does
               (every other ours-* case runs a list's prompt once: train.share_prompt)
  ours-k2-gc   ours-k2 with gradient checkpointing (train.gradient_checkpointing)
  ours-k2-lean ours-k2 with bf16 AdamW moments (train.optimizer: adamw_bf16) and one prompt per
               forward pass (train.micro_batch_size: 1), gradients accumulated over the batch
  ours-k2-lean-gc  ours-k2-lean with gradient checkpointing
  trl          TRL DPOTrainer, default settings (a reference model in memory, scored every step)
  trl-thp      TRL DPOTrainer, default settings, with THP_MEM_ALLOC_ENABLE=1 (transparent huge
               pages for PyTorch's CPU buffers), to show what that setting alone does for TRL
  trl-precomp  TRL DPOTrainer with precompute_ref_log_probs=True (no reference model during steps)
  trl-micro1   trl-precomp with one prompt per forward pass (gradient_accumulation_steps = batch):
               TRL at the same micro-batch as ours-k2-lean

The ours-* cases run in the environment the train stage gives its Ray Train workers
(stages/train/stage.py worker_env: THP_MEM_ALLOC_ENABLE=0 unless the caller sets it;
`THP_MEM_ALLOC_ENABLE=1 make bench-train` measures ours with huge pages); the trl* cases
in the caller's environment without that variable, except trl-thp (always 1).

Usage: python bench/train_bench.py [--model DIR] [--prompts 16] [--batch 4] [--steps 3] [--out FILE]
       python bench/train_bench.py --summarize-only   # only rewrite the Trainer section of docs/results.md
After a run, the Trainer section of docs/results.md is rewritten from every docs/bench/train*.json
(each file one session's cases, measured side by side: ratios are only taken within a file).
Tokens/s counts the non-padding tokens (prompt + response) of every sequence a step trains on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

WORDS = ("the a garden river morning light quiet bread friend music window market road story simple "
         "bright careful small warm green slowly often always together people city water season").split()


def make_rows(num_prompts: int, items: int, words: int, seed: int = 0) -> list[dict]:
    """Prompts from the training set with `items` responses of about `words` words each."""
    rng = random.Random(seed)
    prompts = [json.loads(line) for line in (REPO_ROOT / "data/prompts/train.jsonl").read_text().splitlines()]
    rows = []
    for prompt in prompts[:num_prompts]:
        responses = [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(items)]
        rows.append({"prompt_id": prompt["prompt_id"], "prompt": prompt["messages"], "responses": responses})
    return rows


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(args, items: int, objective: str, checkpointing: bool = False, optimizer_name: str = "adamw",
             micro_seqs: int | None = None, share_prompt: bool = True) -> dict:
    import torch

    from pools.logprob_scorer import load_policy, use_all_cpu_threads
    from pools.logprobs import tokenize_example
    from stages.train.data import ListExample, use_sparse_embedding_grad
    from stages.train.loop import list_scores
    from core.objectives import OBJECTIVES
    from stages.train.optim import build_optimizer

    use_all_cpu_threads()
    torch.manual_seed(0)
    model, tokenizer = load_policy(args.model, "float32")
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_sparse_embedding_grad(model)  # as the training loop does
    rows = make_rows(args.prompts, items, args.words)
    examples = [ListExample(r["prompt_id"],
                            [tokenize_example(tokenizer, r["prompt"], resp, args.max_length) for resp in r["responses"]],
                            [0.0] * items, [float(items - i) for i in range(items)]) for r in rows]
    optimizer = build_optimizer(optimizer_name, model.parameters(), lr=1e-6, weight_decay=0.0)
    # As many sequences per forward pass as the pairwise case: longer lists
    # accumulate gradients over more micro-batches (train.micro_batch_size).
    micro = max(1, (micro_seqs or args.micro_seqs) // items)
    times, tokens = [], []
    for step in range(args.steps + 1):
        batch = examples[(step * args.batch) % len(examples):][:args.batch]
        start = time.perf_counter()
        for begin in range(0, len(batch), micro):
            scores, mask, _ = list_scores(model, batch[begin:begin + micro], tokenizer, objective, 0.1,
                                          args.chunk_size, share_prompt)
            (OBJECTIVES[objective](scores, mask).sum() / len(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            tokens.append(sum(len(ids) for e in batch for ids, _ in e.tokens))
    return summary(times, tokens, args.batch)


def run_trl(args, precompute: bool, micro: int | None = None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from pools.logprob_scorer import use_all_cpu_threads
    from pools.logprobs import tokenize_example

    use_all_cpu_threads()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = make_rows(args.prompts, 2, args.words)
    data = Dataset.from_list([{"prompt": r["prompt"],
                               "chosen": [{"role": "assistant", "content": r["responses"][0]}],
                               "rejected": [{"role": "assistant", "content": r["responses"][1]}]} for r in rows])
    sequence_tokens = [sum(len(tokenize_example(tokenizer, r["prompt"], resp, args.max_length)[0])
                           for resp in r["responses"]) for r in rows]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    micro = micro or args.batch
    config = DPOConfig(output_dir=str(Path(args.scratch) / "trl"), per_device_train_batch_size=micro,
                       gradient_accumulation_steps=args.batch // micro,
                       max_steps=args.steps + 1, learning_rate=1e-6, beta=0.1, max_length=args.max_length,
                       logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                       dataloader_num_workers=0, precompute_ref_log_probs=precompute, seed=0,
                       lr_scheduler_type="constant")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[timer])
    trainer.train()
    # TRL's sampler shuffles; the token count per step is the same on average over our fixed batches.
    tokens = step_tokens(sequence_tokens, args.batch, args.steps + 1)[1:]
    return summary(timer.times[1:], tokens, args.batch)


def step_tokens(tokens_per_prompt: list[int], batch: int, steps: int) -> list[int]:
    """Tokens of each step's batch, taking prompts in order and starting over at the end,
    as the ours-* cases do (TRL's sampler starts a new epoch there too)."""
    count = len(tokens_per_prompt)
    return [sum(tokens_per_prompt[(step * batch + i) % count] for i in range(batch)) for step in range(steps)]


def summary(times: list[float], tokens: list[int], batch: int) -> dict:
    seconds = sum(times)
    return {"steps": len(times), "seconds_per_step": seconds / len(times),
            "seconds_per_prompt": seconds / (len(times) * batch), "tokens_per_second": sum(tokens) / seconds,
            "peak_rss_gib": round(peak_rss_gib(), 3)}


def case_env(case: str) -> dict[str, str]:
    """Our cases get the train stage's worker environment; TRL's the caller's, minus it (but trl-thp)."""
    from stages.train.stage import worker_env

    env = {key: value for key, value in os.environ.items() if key not in worker_env()}
    if case.startswith("ours"):
        env.update(worker_env())
    if case == "trl-thp":
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return {**env, "PYTHONUNBUFFERED": "1"}


CASES = {
    "ours-k2": lambda args: run_ours(args, 2, "dpo"),
    "ours-k4": lambda args: run_ours(args, 4, "contrastive"),
    "ours-k2-unshared": lambda args: run_ours(args, 2, "dpo", share_prompt=False),
    "ours-k2-gc": lambda args: run_ours(args, 2, "dpo", checkpointing=True),
    "ours-k2-lean": lambda args: run_ours(args, 2, "dpo", optimizer_name="adamw_bf16", micro_seqs=2),
    "ours-k2-bf16-gc": lambda args: run_ours(args, 2, "dpo", checkpointing=True, optimizer_name="adamw_bf16"),
    "ours-k2-lean-gc": lambda args: run_ours(args, 2, "dpo", checkpointing=True, optimizer_name="adamw_bf16",
                                             micro_seqs=2),
    "trl": lambda args: run_trl(args, precompute=False),
    "trl-thp": lambda args: run_trl(args, precompute=False),
    "trl-precomp": lambda args: run_trl(args, precompute=True),
    "trl-micro1": lambda args: run_trl(args, precompute=True, micro=1),
}


LABELS = {
    "ours-k2": "ours, pairwise DPO (K=2), fp32 AdamW, 8 sequences per forward pass",
    "ours-k4": "ours, listwise contrastive (K=4), same sequences per forward pass",
    "ours-k2-unshared": "ours-k2 with every item in its own row (train.share_prompt: false)",
    "ours-k2-gc": "ours, K=2, fp32 AdamW, 8 sequences per forward pass, gradient checkpointing",
    "ours-k2-lean": "ours, K=2, bf16 AdamW moments, one prompt per forward pass",
    "ours-k2-bf16-gc": "ours, K=2, bf16 AdamW moments, 8 sequences per forward pass, gradient checkpointing",
    "ours-k2-lean-gc": "ours, K=2, bf16 AdamW moments, one prompt per forward pass, gradient checkpointing",
    "trl": "TRL DPOTrainer, defaults (reference model scored every step)",
    "trl-thp": "TRL DPOTrainer, defaults, with THP_MEM_ALLOC_ENABLE=1",
    "trl-precomp": "TRL DPOTrainer, precompute_ref_log_probs=True",
    "trl-micro1": "TRL DPOTrainer, precomputed reference, one prompt per forward pass",
}
SPEED_TARGET, MEMORY_TARGET, K4_TARGET = 1.5, 0.6, 2.2


def trainer_section(tables: dict[str, dict], machine_text: str) -> str:
    """The Trainer section of docs/results.md: each file's cases against that file's TRL default case.

    A case meets the objectives issue's joint target when, against TRL's default
    case of the same file, it has at least 1.5x the tokens/s at no more than 0.6x
    the peak memory.
    """
    intro = (f"Machine: {machine_text}. SmolLM2-135M-Instruct, the same prompts, pairs and batch for every case, "
             "each case in its own process (peak memory = its max RSS). Cases of one file ran side by side in one "
             "session; the ratios compare only within a file, because the same case moves by about 15% between "
             "sessions on this shared machine. Details and the explanation: docs/benchmarks.md.")
    lines = ["## Trainer against TRL (`make bench-train`)", "", intro, ""]
    met, k4 = [], []
    for name, results in tables.items():
        settings = results.get("settings", {})
        trl = results.get("trl")
        when = (f"measured {results['measured_at']}" if results.get("measured_at")
                else "an earlier trainer, before the changes docs/benchmarks.md lists")
        # Files from before it was recorded ran ours with it on, the workers' default then.
        huge_pages = settings.get("ours_huge_pages", "1")
        lines += [f"`{name}` ({settings.get('prompts')} prompts, {settings.get('batch')} per step, "
                  f"{settings.get('steps')} timed steps; ours with THP_MEM_ALLOC_ENABLE={huge_pages}; {when}):", "",
                  "| case | tokens/s | s per prompt | peak RSS (GiB) | speed vs TRL | memory vs TRL |",
                  "|---|---:|---:|---:|---:|---:|"]
        for case, label in LABELS.items():
            row = results.get(case)
            if not row:
                continue
            speed = row["tokens_per_second"] / trl["tokens_per_second"] if trl else None
            memory = row["peak_rss_gib"] / trl["peak_rss_gib"] if trl else None
            if case.startswith("ours") and speed and memory and speed >= SPEED_TARGET and memory <= MEMORY_TARGET:
                met.append(f"{case} in `{name}`")
            lines.append(f"| {label} | {row['tokens_per_second']:.1f} | {row['seconds_per_prompt']:.2f} | "
                         f"{row['peak_rss_gib']:.2f} | " + (f"{speed:.2f}x | {memory:.2f}x |" if trl else "- | - |"))
        if results.get("ours-k2") and results.get("ours-k4"):
            k4.append(results["ours-k4"]["seconds_per_prompt"] / results["ours-k2"]["seconds_per_prompt"])
        lines.append("")
    if met:
        lines.append(f"**Joint target (at least {SPEED_TARGET}x TRL's tokens/s at no more than {MEMORY_TARGET}x its "
                     f"peak memory) met by: {', '.join(met)}.**")
    else:
        lines.append(f"**Joint target (at least {SPEED_TARGET}x TRL's tokens/s at no more than {MEMORY_TARGET}x its "
                     "peak memory, in one setting): not met by any case.**")
    if k4:
        lines.append(f"Listwise K=4 costs {max(k4):.2f}x pairwise K=2 per prompt (target at most {K4_TARGET}x).")
    return "\n".join(lines) + "\n"


def bench_files() -> list[Path]:
    """Every session's result file under docs/bench/ (read after this run wrote its own)."""
    return sorted((REPO_ROOT / "docs/bench").glob("train*.json"))


def summarize(paths: list[Path], results_md: Path) -> str:
    from bench.common import replace_section
    from bench.generate_bench import machine, machine_line, versions

    tables = {str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path):
              json.loads(path.read_text()) for path in paths}
    if not tables:
        raise SystemExit("no trainer benchmark results (docs/bench/train*.json): run `make bench-train` first")
    recorded = [t for t in tables.values() if t.get("machine")]
    if recorded:
        machine_text = machine_line(recorded[-1]["machine"], recorded[-1].get("versions", {}))
    else:
        # The files predate recording the machine; docs/benchmarks.md names the machine they ran on.
        machine_text = ("not recorded in these files (docs/benchmarks.md: the project's machine); "
                        "this summary was written on " + machine_line(machine(), versions()))
    body = trainer_section(tables, machine_text)
    replace_section(results_md, "trainer", body)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / ".cache/models/smollm2-135m-instruct"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--micro-seqs", type=int, default=8, help="sequences per forward pass (ours)")
    parser.add_argument("--chunk-size", type=int, default=512, help="train.logprob_chunk_size (ours)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--scratch", default="/tmp/larpo-bench")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs/bench/train.json"))
    parser.add_argument("--results", default=str(REPO_ROOT / "docs/results.md"),
                        help="markdown file whose Trainer section is rewritten")
    parser.add_argument("--summarize-only", action="store_true", help="only rewrite the Trainer section")
    args = parser.parse_args()
    if args.summarize_only:
        print(summarize(bench_files(), Path(args.results)))
        return

    if args.case:
        print("RESULT " + json.dumps(CASES[args.case](args)), flush=True)
        return
    results = {}
    for case in args.cases.split(","):
        command = [sys.executable, __file__, "--case", case] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("case", "cases", "out", "results", "summarize_only")]
        output = subprocess.run(command, capture_output=True, text=True, env=case_env(case))
        line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"case {case} failed:\n{output.stderr[-3000:]}")
        results[case] = json.loads(line[len("RESULT "):])
        print(case, results[case], flush=True)
    ours, trl = results.get("ours-k2"), results.get("trl")
    if ours and trl:
        results["ratios"] = {"tokens_per_second_vs_trl": ours["tokens_per_second"] / trl["tokens_per_second"],
                             "peak_memory_vs_trl": ours["peak_rss_gib"] / trl["peak_rss_gib"]}
        if results.get("ours-k2-gc"):
            gc = results["ours-k2-gc"]
            results["ratios"]["checkpointing_tokens_per_second_vs_trl"] = gc["tokens_per_second"] / trl["tokens_per_second"]
            results["ratios"]["checkpointing_peak_memory_vs_trl"] = gc["peak_rss_gib"] / trl["peak_rss_gib"]
    for case, baseline in (("ours-k2-lean", "trl"), ("ours-k2-lean", "trl-micro1"), ("ours-k2-lean-gc", "trl"),
                           ("ours-k2-lean-gc", "trl-micro1")):
        if results.get(case) and results.get(baseline):
            ratios = results.setdefault("ratios", {})
            ratios[f"{case}_tokens_per_second_vs_{baseline}"] = (results[case]["tokens_per_second"]
                                                                 / results[baseline]["tokens_per_second"])
            ratios[f"{case}_peak_memory_vs_{baseline}"] = (results[case]["peak_rss_gib"]
                                                           / results[baseline]["peak_rss_gib"])
    if ours and results.get("ours-k4"):
        results.setdefault("ratios", {})["k4_vs_k2_per_prompt"] = (results["ours-k4"]["seconds_per_prompt"]
                                                                   / ours["seconds_per_prompt"])
    results["settings"] = {k: v for k, v in vars(args).items()
                           if k not in ("case", "scratch", "out", "results", "summarize_only")}
    results["settings"]["ours_huge_pages"] = case_env("ours-k2")["THP_MEM_ALLOC_ENABLE"]
    from bench.generate_bench import machine, versions

    results["machine"], results["versions"] = machine(), versions()
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results.get("ratios", {}), indent=2))
    if out.resolve().parent == (REPO_ROOT / "docs/bench").resolve():
        summarize(bench_files(), Path(args.results))


if __name__ == "__main__":
    main()
