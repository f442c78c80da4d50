"""`make experiment`: iterative DPO against the LarPO objectives, over seeds, round after round.

Runs `python -m pipeline rounds N` for every method and seed on the same config
(the embedded default unless --config says otherwise), each as its own run
`<output>/<prefix>-<method>-seed<s>`:

  dpo          the paper's iterative DPO baseline: 2 samples per prompt, best against worst
  dpo-k        pairwise DPO on the best and worst of the same K samples as LarPO: the loss
               alone differs from LarPO's, at an equal generation budget
  contrastive  LarPO contrastive: K samples, the best against the bottom 3 (the default config)
  lambdarank   LarPO LambdaRank: K samples, top-2 against bottom-2
  listmle      LarPO ListMLE: K samples, top-2 against bottom-2
  replay-previous, replay-all
               the default (contrastive) with train.replay: earlier rounds' lists trained on
               again beside the current ones (`make experiment-replay`: with contrastive, the ablation)
  replay-none  the default again, as the ablation's baseline on a machine kind where the seed's
               contrastive run did not run

K is the config's `generate.num_samples`. When a (method, seed) run has finished
all its rounds, its metrics.json and eval shards are copied into the repository,
`docs/experiments/<method>/seed-<s>/round_NNN/` (docs/contracts.md's layout), so the
tables rebuild on a fresh clone and an experiment split over several machines
runs only what the store lacks. Then `bench/experiment_summary.py` writes the
tables with 95% intervals, the verdict on the paper's ordering and the plots
into docs/results.md.

Usage:
  python bench/experiment.py [--config FILE] [--rounds 3] [--seeds 0,1,2] [--methods dpo,contrastive,...]
                             [--output ROOT] [--prefix experiment] [key=value ...]
  python bench/experiment.py --summarize-only      # only the tables, the plots and the verdict
Finished rounds are skipped, so an interrupted experiment resumes where it stopped.
A method whose first rounds compute what another's do (replay-all's rounds 1-2 are
replay-previous's; a replay's round 1, with nothing to replay, is the default's) starts
from that run's finished rounds of the same seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# The experiment's methods and store (bench/experiment_store.py) and the helpers every bench script
# shares (bench/common.py), also read from here by name (bench.experiment.METHODS, ...).
from bench.common import RESULTS_MD, output_root, replace_section, repo_relative  # noqa: E402,F401
from bench.experiment_store import (DEFAULT_METHOD, DEFAULT_SEEDS, MAIN_METHODS, METHODS, STORE,  # noqa: E402,F401
                                    machine_kind, seed_dir, stored_machine, stored_rounds)
from core.errors import PipelineError  # noqa: E402


# --- running ---------------------------------------------------------------------

def run_name(prefix: str, method: str, seed: int) -> str:
    return f"{prefix}-{method}-seed{seed}"


def store_run(run_dir: Path, target: Path, rounds: int) -> None:
    """Copy rounds 0..rounds of a finished run (metrics.json and eval shards only) into the store.

    Each file is written under a temporary name and renamed, metrics.json last, so
    an interrupted copy never looks like a stored round. `machine.json` beside the
    rounds says which CPU (or GPU) ran them, so wall times are read with it.
    """
    from bench.generate_bench import machine
    from core.layout import atomic_write_json, atomic_write_text

    atomic_write_json(target / "machine.json", machine())
    atomic_write_text(target / "config.yaml", (run_dir / "config.yaml").read_text())
    for number in range(rounds + 1):
        source, dest = run_dir / f"round_{number:03d}", target / f"round_{number:03d}"
        shards = sorted((source / "eval").glob("part-*.parquet"))
        if not (source / "metrics.json").is_file() or not shards:
            raise PipelineError(f"{source} has no metrics.json or eval shards to store")
        for path in [*shards, source / "metrics.json"]:
            relative = path.relative_to(source)
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            tmp = dest / relative.with_name(f".{relative.name}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest / relative)


# Keys that say where and how fast a run went, not what it computed: stored runs may differ in them.
NOT_COMPARED = frozenset({
    "output", "worker_retries", "resources_wait_seconds", "tracking", "generate.num_actors",
    "generate.tensor_parallel_size", "generate.cpu_kv_cache_gib", "generate.gpu_memory_utilization",
    "generate.keep_engines", "reward.batch_size", "reward.num_actors", "reward.num_gpus_per_actor",
    "reference.batch_size", "reference.in_train_workers", "train.num_workers", "train.sharding",
    "train.checkpoint_every"})


def check_stored_settings(method: str, seed: int, args: argparse.Namespace, overrides: list[str]) -> None:
    """Refuse to reuse or extend a stored (method, seed) that ran with other settings than this call's."""
    import yaml

    from core.config import config_from_dict, get_key, same_setting
    from pipeline.settings import load_config
    from core.config_parse import leaf_fields

    stored_path = seed_dir(args.store, method, seed) / "config.yaml"
    if not stored_path.is_file():  # stored before the settings were kept beside the runs
        return
    stored = config_from_dict(yaml.safe_load(stored_path.read_text()), source=str(stored_path))
    wanted = load_config(args.config, overrides)
    for key, _ in leaf_fields(type(wanted)):
        if key not in NOT_COMPARED and not same_setting(key, get_key(stored, key), get_key(wanted, key)):
            raise PipelineError(f"{repo_relative(stored_path)} has {key}={get_key(stored, key)!r} but this "
                                f"experiment asks for {get_key(wanted, key)!r}: use another --store, or move "
                                "the stored run away to run it again")


def link_shared_rounds(method: str, seed: int, args: argparse.Namespace, root: Path) -> None:
    """Start a method's run from the rounds it shares with another method's run (`Method.same_as`).

    Rounds 0..shared of the first `same_as` run that has finished all of them are linked
    (hard links; copies across file systems) into this run, one whole round at a
    time in round order, so an interrupted linking leaves a prefix of finished
    rounds that the run resumes from. A run that has any shared round of its own
    already is left as it is.
    """
    from core.layout import RunLayout

    target = RunLayout.at(root, run_name(args.prefix, method, seed))
    for other, shared in METHODS[method].same_as:
        shared = min(shared, args.rounds)
        source = RunLayout.at(root, run_name(args.prefix, other, seed))
        pairs = [(source.round(number), target.round(number)) for number in range(shared + 1)]
        if any(own.dir.exists() for _, own in pairs[1:]):
            return
        if all(done.is_finished() and done.metrics.is_file() for done, _ in pairs):
            break
    else:
        return
    for done, own in pairs:
        if own.dir.exists():  # round 0, the base model's answers: the same in every run
            continue
        partial = own.dir.with_name(f".{own.dir.name}.linking")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(done.dir, partial, copy_function=link_or_copy)
        os.replace(partial, own.dir)
    print(f"== {method} seed {seed}: rounds 0..{shared} linked from {source.dir} (the same computation)", flush=True)


def link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def run_method(method: str, seed: int, args: argparse.Namespace, root: Path) -> int:
    """Run one (method, seed) unless the store has all its rounds; store it when it finishes."""
    # The method's overrides first, so that the user's may change them; the seed last.
    overrides = [*METHODS[method].overrides, *args.overrides, f"seed={seed}"]
    check_stored_settings(method, seed, args, overrides)
    if method == "replay-none" and default_run_is_comparable(seed, args):
        print(f"== replay-none seed {seed}: the stored {DEFAULT_METHOD} run ran on this kind of machine, "
              "so it is the ablation's none", flush=True)
        return 0
    if stored_rounds(args.store, method, seed) >= set(range(args.rounds + 1)):
        print(f"== {method} seed {seed}: rounds 0..{args.rounds} already in {repo_relative(args.store)}", flush=True)
        return 0
    link_shared_rounds(method, seed, args, root)
    name = run_name(args.prefix, method, seed)
    command = [sys.executable, "-m", "pipeline", "rounds", str(args.rounds), "--config", args.config,
               "--run", name, "--output", str(root)]
    command += overrides
    print(f"== {method} seed {seed}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = subprocess.run(command, cwd=REPO_ROOT, env=env).returncode
    if code == 0:
        store_run(root / name, seed_dir(args.store, method, seed), args.rounds)
    return code


def default_run_is_comparable(seed: int, args: argparse.Namespace) -> bool:
    """Whether the store holds the seed's whole default run from this kind of machine."""
    from bench.generate_bench import machine

    return stored_rounds(args.store, DEFAULT_METHOD, seed) >= set(range(args.rounds + 1)) \
        and machine_kind(stored_machine(args.store, DEFAULT_METHOD, seed)) == machine_kind(machine())


def parse_list(text: str, what: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        parser.error(f"--{what} names none")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(MAIN_METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds")
    parser.add_argument("--output", help="output root of the runs (default: the config's `output`)")
    parser.add_argument("--prefix", default="experiment", help="runs are named <prefix>-<method>-seed<s>")
    parser.add_argument("--store", type=Path, default=STORE,
                        help="where finished runs' metrics and eval shards are kept (committed)")
    parser.add_argument("--results", default=str(RESULTS_MD), help="markdown file to write (the PNGs go beside it)")
    parser.add_argument("--summarize-only", action="store_true", help="only summarise the stored runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")
    # Overrides may come before or after options (ARGS="--rounds 1 train.beta=0.2").
    args = parser.parse_intermixed_args(argv)
    methods = parse_list(args.methods, "methods", parser)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in parse_list(args.seeds, "seeds", parser)]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, not {args.seeds!r}")
    # The runs and the config's relative paths are the repository's, wherever this is started from.
    args.config = str(Path(args.config).resolve())
    args.store = args.store.resolve()
    from bench.experiment_summary import summarize

    try:
        failed = []
        if not args.summarize_only:
            root = output_root(args)
            # Seed by seed, so that a stop after any seed leaves every method equally far along.
            failed = [f"{m} seed {s}" for s in seeds for m in methods if run_method(m, s, args, root) != 0]
        # The section is the whole experiment's, whichever methods this call ran (the replay ablation's too).
        summarize(args.store, list(MAIN_METHODS), seeds, Path(args.results))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: these runs failed (the stored ones are summarised): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
