"""Reward benchmark: hf_classifier scoring with length-sorted batches against unsorted ones.

A 135M-parameter classifier is built from the default model's config
(.cache/models/smollm2-135m-instruct/config.json: random weights, num_labels 1,
fp32, CPU) and saved to a scratch folder, so that it loads through the same
`HFClassifierReward` the rerank stage uses. Both cases score the same samples
(prompts from the training set, responses of 5-250 words) with the same batch
size; only the order differs:
  sorted    `HFClassifierReward.score`: longest first, batches of neighbours in length
  unsorted  the samples in their given order, cut into batches of the same size
Each case runs `--repeats` times, alternating, after one warm-up batch. Besides
wall time, the process's CPU time is recorded: on a machine shared with other
jobs, samples per CPU-second move much less than samples per second.

Usage: python bench/reward_bench.py [--samples 256] [--batch 16] [--repeats 2] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

WORDS = ("the a garden river morning light quiet bread friend music window market road story simple "
         "bright careful small warm green slowly often always together people city water season").split()


def make_samples(count: int, min_words: int, max_words: int, seed: int = 0):
    from rewards import Sample

    rng = random.Random(seed)
    rows = [json.loads(line) for line in (REPO_ROOT / "data/prompts/train.jsonl").read_text().splitlines()]
    samples = []
    for i in range(count):
        row = rows[i % len(rows)]
        words = rng.randint(min_words, max_words)
        response = " ".join(rng.choice(WORDS) for _ in range(words)) + "."
        samples.append(Sample(row["prompt_id"], row["messages"], response, {}))
    return samples


def save_classifier(base: Path, out: Path) -> None:
    """A randomly initialised single-score classifier with `base`'s architecture and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    config = AutoConfig.from_pretrained(base, local_files_only=True, num_labels=1,
                                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def score_unsorted(reward, samples, batch: int) -> list[float]:
    # The same encoding and forward pass as `score`, without the length sort.
    scores = []
    for begin in range(0, len(samples), batch):
        scores += reward.forward([reward.encode(s) for s in samples[begin:begin + batch]])
    return scores


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.machine()}, {os.cpu_count()} cores, {'/'.join(simd) or 'no AVX2'}"


def padding_share(lengths: list[int], batch: int) -> float:
    """Share of the token positions in padded batches that are padding."""
    padded = sum(len(lengths[i:i + batch]) * max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(REPO_ROOT / ".cache/models/smollm2-135m-instruct"))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-words", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    # On a machine shared with other jobs, one thread per core that is really free:
    # two threads with one core busy elsewhere wait on each other at every op.
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs/bench/reward.json"))
    args = parser.parse_args()

    import torch

    from rewards.hf_classifier import HFClassifierReward

    torch.set_num_threads(args.threads)
    samples = make_samples(args.samples, args.min_words, args.max_words)
    with tempfile.TemporaryDirectory(prefix="reward-bench-") as scratch:
        save_classifier(Path(args.base), Path(scratch))
        reward = HFClassifierReward(scratch, batch_size=args.batch, dtype="float32", device="cpu")
        lengths = [len(reward.encode(s)) for s in samples]
        reward.forward([reward.encode(s) for s in samples[:args.batch]])  # warm-up: allocator, kernels

        cases = {"sorted": lambda: reward.score(samples),
                 "unsorted": lambda: score_unsorted(reward, samples, args.batch)}
        runs: dict[str, list[float]] = {name: [] for name in cases}
        cpu_runs: dict[str, list[float]] = {name: [] for name in cases}
        outputs = {}
        for repeat in range(args.repeats):
            for name, run in cases.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                outputs[name] = run()
                runs[name].append(time.perf_counter() - start)
                cpu_runs[name].append(time.process_time() - cpu_start)
                print(f"{name} run {repeat + 1}: {runs[name][-1]:.1f} s, {args.samples / runs[name][-1]:.2f} "
                      f"samples/s, {cpu_runs[name][-1]:.1f} CPU-s", flush=True)
        params = sum(p.numel() for p in reward.model.parameters())

    # Same scores either way (up to float summation order), else the comparison means nothing.
    max_diff = max(abs(a - b) for a, b in zip(outputs["sorted"], outputs["unsorted"], strict=True))
    results = {
        name: {"seconds": [round(t, 2) for t in times],
               "samples_per_second": [round(args.samples / t, 3) for t in times],
               "best_samples_per_second": round(args.samples / min(times), 3),
               "tokens_per_second_best": round(sum(lengths) / min(times), 1),
               "cpu_seconds": [round(t, 2) for t in cpu_runs[name]],
               "samples_per_cpu_second_best": round(args.samples / min(cpu_runs[name]), 3)}
        for name, times in runs.items()
    }
    results["sorted"]["padding_share"] = round(padding_share(sorted(lengths, reverse=True), args.batch), 4)
    results["unsorted"]["padding_share"] = round(padding_share(lengths, args.batch), 4)
    results["speedup_best"] = round(min(runs["unsorted"]) / min(runs["sorted"]), 3)
    results["speedup_cpu_time_best"] = round(min(cpu_runs["unsorted"]) / min(cpu_runs["sorted"]), 3)
    results["max_score_difference"] = max_diff
    results["settings"] = {
        "model": f"random {params / 1e6:.1f}M LlamaForSequenceClassification from {Path(args.base).name}/config.json",
        "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(), "samples": args.samples,
        "batch": args.batch, "response_words": [args.min_words, args.max_words], "repeats": args.repeats,
        "tokens_total": sum(lengths), "tokens_min_max": [min(lengths), max(lengths)],
        "cpu": cpu_description(), "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
