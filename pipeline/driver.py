"""The round driver: check everything a round needs, then run its stages in order.

`plan_round` reads and validates (config, previous round, prompts, model,
round 0's held-out answers) without writing anything, so a bad input leaves no
trace in the run directory. `run_round` then runs each stage whose `_done`
marker is missing, and appends a line per stage, with its wall time, to
`runs/<run>/pipeline.log`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.config import (RUN_IDENTITY_KEYS, Config, config_from_dict, get_key, portable_dict, read_yaml_file,
                             same_setting)
from core.errors import PipelineError
from core import failures, timing
from pipeline import console, ray_session
from core.gpu_layout import GpuLayout, cluster_gpu_count, plan_gpu_layout
from core.layout import (EARLIER_ROUNDS, STAGE_BY_NAME, STAGES, RoundLayout, RunLayout,
                             atomic_write_json, atomic_write_text)
from core.memory import MemoryMonitor
from core.models import resolve_model
from core.project_files import CHECKOUT
from core.prompts import Prompt, fit_to_context, load_prompts, round_slice
from core.provenance import code_version
from core.timing import Timings, round_time_text
from pipeline.model_card import model_card
from pipeline.resources import wait_for_resources
from pipeline.tracking import Tracking
from pools.vllm_engines import EnginePool
from rewards.base import metadata_problem
from stages.evaluate import EVAL_KEYS, check_baseline
from stages.reference.placement import scored_in_train_workers
from stages.registry import STAGE_RUNNERS

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class RoundPlan:
    config: Config
    run: RunLayout
    round: RoundLayout
    base_model: str
    policy_in: str       # the checkpoint that generates this round (policy N-1)
    reference: str       # the checkpoint whose log-probs the loss is relative to
    prompts: list[Prompt]
    heldout: list[Prompt]
    dropped_too_long: list[str]
    # The command's vLLM engines (pools/vllm_engines.py), kept across stages and rounds when
    # generate.keep_engines says so; None: each sampling stage starts its own.
    engines: EnginePool | None = None
    # Where each process runs on the cluster's GPUs, decided when the round starts (core/gpu_layout.py).
    gpus: GpuLayout | None = None
    # Whether the train stage's workers score the reference before training instead of a stage of its
    # own (reference.in_train_workers, where the reference is the starting policy): decided here, once.
    reference_in_train_workers: bool = False


def plan_round(config: Config, run_name: str, number: int, engines: EnginePool | None = None,
               dry_run: bool = False) -> RoundPlan:
    """Validate round `number` of the run and gather what it needs; with `dry_run`, write nothing."""
    if number < 1:
        raise PipelineError(f"round number must be 1 or more; got {number}")
    run = RunLayout.at(config.output, run_name)
    if not dry_run:
        run.ensure_writable()
    this_round = run.round(number)
    if number > 1 and not run.round(number - 1).is_finished():
        previous = run.round(number - 1)
        missing = next(s for s in STAGES if not previous.is_done(s))
        raise PipelineError(f"round {number - 1} of run '{run_name}' is not finished "
                            f"({previous.done_marker(missing)} is missing): run round {number - 1} first")
    if number > 1 and not this_round.is_done("generate"):
        # Before anything of this round is written: a refused round leaves no trace.
        run.round(number - 1).check_output("train", then=f"run `{command_for_round(number - 1)}`, then this command")
    check_compatible(run, config)
    for earlier in EARLIER_ROUNDS[config.train.replay](number):
        check_replayed_lists(run, config, earlier)

    base_model = resolve_model(config.model.name)
    policy_in = base_model if number == 1 else str(run.round(number - 1).policy)
    reference = policy_in if config.reference.policy == "previous" else base_model

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_in, trust_remote_code=config.model.trust_remote_code)
    # Room for the answer in the engine's context, and for at least one answer
    # token in the trainer's (which cuts long answers, never prompts).
    budget = min(config.model.max_model_len - config.generate.max_tokens, config.train.max_length - 1)
    pool = load_prompts(config.prompts.train, **prompt_options(config))
    chosen = round_slice(pool, number, config.prompts.per_round, config.seed)
    prompts, dropped = fit_to_context(chosen, tokenizer, budget, config.prompts.too_long)
    if not prompts:
        raise PipelineError(f"none of the {len(chosen)} prompts of round {number} fits in {budget} tokens "
                            "(model.max_model_len minus generate.max_tokens, and train.max_length)")
    heldout: list[Prompt] = []
    if config.prompts.eval_size:
        held = load_prompts(config.prompts.heldout, **prompt_options(config))[:config.prompts.eval_size]
        eval_budget = config.model.max_model_len - config.evaluate.max_tokens
        heldout, _ = fit_to_context(held, tokenizer, eval_budget, config.prompts.too_long)
        check_baseline(run, heldout, config)
    check_metadata(config, [(config.prompts.train, prompts), (config.prompts.heldout, heldout)])
    plan = RoundPlan(config, run, this_round, base_model, policy_in, reference, prompts, heldout, dropped, engines)
    return dataclasses.replace(plan, reference_in_train_workers=scored_in_train_workers(plan))


def check_metadata(config: Config, prompt_sets: list[tuple[str, list[Prompt]]]) -> None:
    """Refuse, before anything runs, a prompt whose metadata the reward cannot score."""
    for source, prompts in prompt_sets:
        for prompt in prompts:
            if problem := metadata_problem(config.reward, prompt.metadata):
                raise PipelineError(f"prompt file {source}: prompt_id {prompt.prompt_id!r} cannot be scored by "
                                    f"reward '{config.reward.name}': {problem}")


def prompt_options(config: Config) -> dict[str, Any]:
    """How `load_prompts` reads a prompt set of this config (train and held-out alike)."""
    return {"messages_field": config.prompts.messages_field, "metadata_fields": config.prompts.metadata_fields,
            "duplicates": config.prompts.duplicates}


def check_compatible(run: RunLayout, config: Config) -> None:
    """A run's rounds must agree on the keys that define the run."""
    if not run.config.is_file():
        return
    stored = config_from_dict(read_yaml_file(run.config), source=str(run.config))
    for key in RUN_IDENTITY_KEYS:
        if not same_setting(key, get_key(stored, key), get_key(config, key)):
            raise PipelineError(f"config key '{key}' is {get_key(config, key)!r} but run {run.dir} was started "
                                f"with {get_key(stored, key)!r}; use a new run name to change it")


def run_round(plan: RoundPlan, tracking: Tracking | None = None) -> dict[str, Any]:
    """Run the stages that are not done yet; return the round's metrics.

    Round 0 (the base model's held-out answers) is made first, through the same
    stage path, if this round evaluates and the run has none. `tracking`
    (pipeline/tracking.py) receives the training steps when the train stage is
    done and the round's metrics when the round is.
    """
    number = plan.round.number
    with run_log(plan.run.dir / "pipeline.log") as file_only:
        if plan.round.is_finished() and plan.round.metrics.is_file():
            log.info("round %d is already finished: %s", number, plan.round.dir)
            if tracking:
                with console.capture(log_path(plan.round, "tracking")):
                    tracking.round_finished(number)
            return read_metrics(plan.round)
        if plan.dropped_too_long:
            log.warning("round %d: %d of %d prompts dropped: longer than fits with room for the answer "
                        "(prompts.too_long=drop): %s", number, len(plan.dropped_too_long),
                        len(plan.dropped_too_long) + len(plan.prompts), ids_text(plan.dropped_too_long))
        start = time.perf_counter()
        with console.capture(log_path(plan.round, "ray")):
            ray_init_seconds = ensure_ray()
        import ray

        wait_for_resources(plan.config, ray.cluster_resources)
        gpus = plan.engines.gpu_layout() if plan.engines else plan_gpu_layout(plan.config, cluster_gpu_count(), False)
        plan = dataclasses.replace(plan, gpus=gpus)
        for line in plan.gpus.describe():
            file_only("round %d placement: %s", number, line, level=logging.INFO)
        config_text = yaml.safe_dump(portable_dict(plan.config), sort_keys=False)
        if not plan.run.config.is_file():
            atomic_write_text(plan.run.config, config_text)
        atomic_write_text(plan.round.config, config_text)
        baseline = baseline_plan(plan) if plan.heldout else None
        steps = [(baseline, "evaluate")] if baseline and not baseline.round.is_done("evaluate") else []
        steps += [(plan, stage) for stage in STAGES]
        # One bar for the round's stages; the stages draw their own bars beneath it.
        with console.progress(total=len(steps), desc=f"round {number}", unit="stage") as progress:
            for step_plan, stage in steps:
                progress.set_postfix(stage=stage if step_plan is plan else "round 0")
                run_if_needed(step_plan, stage, file_only)
                if step_plan is baseline:
                    write_baseline_metrics(baseline)
                if stage == "train" and tracking:
                    with console.capture(log_path(plan.round, "tracking")):
                        tracking.train_finished(number)
                progress.update()
        if baseline and not baseline.round.metrics.is_file():
            write_baseline_metrics(baseline)  # made by an earlier command that stopped before writing them
        metrics = round_metrics(plan)
        # This invocation's: a resumed round's earlier stages ran under another process's ray.init.
        metrics["ray_init_seconds"] = round(ray_init_seconds, 2)
        if steps[0][0] is baseline:
            metrics["baseline_seconds"] = baseline.round.stage_stats("evaluate")["wall_seconds"]
        # The command's time for this round, round 0's evaluation included when it ran first;
        # wall_seconds is the round's own, the one number the log and `report` show.
        metrics["round_seconds"] = round(time.perf_counter() - start, 2)
        metrics["wall_seconds"] = round(timing.round_wall_seconds(metrics), 2)
        atomic_write_json(plan.round.metrics, metrics)
        atomic_write_text(plan.round.policy / "README.md", model_card(plan, metrics))
        log.info("round %d finished in %s: %s", number, round_time_text(metrics), plan.round.metrics)
        if tracking:
            # The trackers' own chatter (W&B, MLflow) goes to the round's logs too.
            with console.capture(log_path(plan.round, "tracking")):
                tracking.round_finished(number)
        return metrics


def run_if_needed(plan: RoundPlan, stage: str, file_only) -> None:
    """Run a stage unless it is done; a reference left to the train workers runs with train."""
    number = plan.round.number
    if plan.round.is_done(stage):
        log.info("round %d: %s already done, skipped", number, stage)
        return
    # Where the reference runs was decided at planning; once done, it is only the train stage's input.
    reference_in_train = plan.reference_in_train_workers and not plan.round.is_done("reference")
    if stage == "reference" and reference_in_train:
        check_input(plan, stage)
        file_only("round %d: reference deferred to the train workers (reference.in_train_workers)", number,
                  level=logging.INFO)
        # Where someone looking for the stage's output will look first.
        stage_log = log_path(plan.round, stage)
        stage_log.parent.mkdir(parents=True, exist_ok=True)
        with stage_log.open("a") as f:
            f.write("reference.in_train_workers: the train stage's workers score the reference before training; "
                    "their output is in train.log\n")
        return
    # The train stage's input is the reference's output, which it makes itself here.
    with_reference = stage == "train" and reference_in_train
    check_input(plan, "reference" if with_reference else stage)
    run_one_stage(plan, stage, file_only)
    if with_reference:
        log.info("round %d: reference finished in %.1f s (in the train workers)", number,
                 plan.round.stage_stats("reference")["wall_seconds"])


def baseline_plan(plan: RoundPlan) -> RoundPlan:
    """Round 0 of the run: the base model answering the same held-out prompts."""
    return dataclasses.replace(plan, round=plan.run.round(0), policy_in=plan.base_model, prompts=[])


def write_baseline_metrics(baseline: RoundPlan) -> None:
    stats = baseline.round.stage_stats("evaluate")
    stats = {k: v for k, v in stats.items() if k not in MARKER_KEYS}
    atomic_write_json(baseline.round.metrics, {
        "round": 0, "policy": baseline.base_model, "eval": {k: stats.get(k) for k in EVAL_KEYS},
        "stage_seconds": {"evaluate": stats["wall_seconds"]}, "stages": {"evaluate": stats},
        "code": code_version(),
    })


def log_path(round_layout: RoundLayout, stage: str) -> Path:
    """Where the libraries' and workers' output of one stage goes (pipeline/console.py)."""
    return round_layout.dir.parent / "logs" / round_layout.dir.name / f"{stage}.log"


def check_replayed_lists(run: RunLayout, config: Config, earlier: int) -> None:
    """Round `earlier`'s lists, which train.replay trains on again, must be there and whole.

    Checked at planning, before hours of generation, and again before the reference stage reads them.
    """
    lists_of = run.round(earlier)
    if not lists_of.is_done("rerank"):
        raise PipelineError(f"train.replay={config.train.replay} needs round {earlier}'s lists, but "
                            f"{lists_of.done_marker('rerank')} is missing: run round {earlier} "
                            "first, or use train.replay=none")
    lists_of.check_output("rerank", main_only=True, then=f"run round {earlier} again, then this command")


def check_input(plan: RoundPlan, stage: str) -> None:
    """Refuse to start a stage on an input that was lost or cut short since its stage finished."""
    number = plan.round.number
    reads = STAGE_BY_NAME[stage].reads
    if reads and number > 0:
        plan.round.check_output(reads)
    if stage == "reference":
        for earlier in EARLIER_ROUNDS[plan.config.train.replay](number):
            check_replayed_lists(plan.run, plan.config, earlier)
    elif stage == "generate" and number > 1:
        plan.run.round(number - 1).check_output("train", then=f"run `{command_for_round(number - 1)}`, "
                                                              "then this command")


def command_for_round(number: int) -> str:
    """The command line that ran this round, for round `number` instead: what an error tells the user to run.

    Outside the command line (a notebook, a test) there is none to rewrite: "larpo round N"."""
    import shlex
    import sys

    argv = sys.argv[1:]
    for i, word in enumerate(argv[:-1]):
        if word in ("round", "rounds") and argv[i + 1].isdigit():
            return shlex.join(["larpo", *argv[:i], "round", str(number), *argv[i + 2:]])
    return f"larpo round {number}"


# What the command is doing, for the line an interrupt prints ("generate of round 2").
activity = "planning"


def run_one_stage(plan: RoundPlan, stage: str, file_only) -> None:
    global activity
    number = plan.round.number
    activity = f"{stage} of round {number}"
    file_only("round %d: %s started", number, stage, level=logging.INFO)
    out_dir = plan.round.begin_stage(stage)
    timings = Timings()
    stage_log = log_path(plan.round, stage)
    with MemoryMonitor() as memory, timings.active():
        start = time.perf_counter()
        try:
            with console.capture(stage_log), console.stage_bars():
                stats = STAGE_RUNNERS[stage](plan, out_dir)
        except BaseException as exc:
            # The terminal gets the CLI's one-line error; the log keeps the stage and the time lost.
            file_only("round %d: %s failed after %.1f s: %s: %s", number, stage,
                      time.perf_counter() - start, type(exc).__name__, exc)
            try:
                with stage_log.open("a") as f:
                    traceback.print_exception(exc, file=f)
            except OSError:
                pass  # a full disk: the one line on the terminal still names the cause
            if isinstance(exc, Exception):
                raise StageFailed(stage, number, exc, stage_log) from exc
            raise
        stats["wall_seconds"] = round(time.perf_counter() - start, 2)
    stats.update(timings.stats())
    stats["peak_memory_gib"] = memory.peak_gib
    if stage == "generate" and plan.dropped_too_long:
        # Dropped at planning, before this stage: `inspect` reads them from here.
        stats["too_long_dropped"] = len(plan.dropped_too_long)
        stats["too_long_dropped_ids"] = plan.dropped_too_long[:DROPPED_IDS_SHOWN]
    plan.round.finish_stage(stage, stats)
    activity = f"round {number}, between stages"
    log.info("round %d: %s finished in %.1f s (peak memory %.2f GiB)", number, stage,
             stats["wall_seconds"], memory.peak_gib)


# How many ids of dropped prompts the log and `inspect` name.
DROPPED_IDS_SHOWN = 5


def ids_text(ids: list[str]) -> str:
    shown = ", ".join(ids[:DROPPED_IDS_SHOWN])
    return shown + (f" and {len(ids) - DROPPED_IDS_SHOWN} more" if len(ids) > DROPPED_IDS_SHOWN else "")


class StageFailed(PipelineError):
    """A stage's error as one line: what failed, at its root under Ray's wrappers, and the log with the details."""

    def __init__(self, stage: str, number: int, exc: Exception, stage_log: Path):
        cause = failures.root_cause(exc)
        if isinstance(cause, PipelineError):
            what = failures.first_line(str(cause))
        else:
            what = f"{stage} of round {number} failed: {failures.describe(exc)}"
            if failures.is_disk_full(cause):
                what += "; free space there and run the same command to resume"
        super().__init__(f"{what} (details: {stage_log})")


@contextmanager
def run_log(path: Path):
    """Append the `pipeline` loggers' lines to `path` (the run's pipeline.log) while a round runs.

    Yields a function that writes a line to the file alone.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    # Outside the CLI (tests, notebooks) nobody may have turned INFO on; the file wants it anyway.
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)

    def file_only(message: str, *args: Any, level: int = logging.ERROR) -> None:
        handler.handle(log.makeRecord(log.name, level, __file__, 0, message, args, None))

    try:
        yield file_only
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


# What a done marker holds beside the stage's own numbers (core/layout.py, finish_stage).
MARKER_KEYS = ("files", "extra_outputs")


def round_metrics(plan: RoundPlan) -> dict[str, Any]:
    # The done markers' file lists stay in the markers: metrics.json is for reading.
    stages = {stage: {k: v for k, v in plan.round.stage_stats(stage).items() if k not in MARKER_KEYS}
              for stage in STAGES}
    return {
        "round": plan.round.number,
        "policy_in": plan.policy_in,
        "policy": str(plan.round.policy),
        "prompts": len(plan.prompts),
        "prompts_dropped_too_long": len(plan.dropped_too_long),
        # win_rate is against round 0's answers (round_000/eval, see stages/evaluate.py).
        "eval": {k: stages["evaluate"].get(k) for k in EVAL_KEYS},
        "train": {k: v for k, v in stages["train"].items() if k.startswith(("loss", "ranking", "margin", "steps"))},
        "stage_seconds": {stage: stats["wall_seconds"] for stage, stats in stages.items()},
        "stage_peak_memory_gib": {stage: stats["peak_memory_gib"] for stage, stats in stages.items()},
        "stages": stages,
        "code": code_version(),
    }


def read_metrics(round_layout: RoundLayout) -> dict[str, Any]:
    return json.loads(round_layout.metrics.read_text()) if round_layout.metrics.is_file() else {}


def ray_worker_env() -> dict[str, str]:
    """The environment of this command's own Ray workers. From a checkout they import it (the
    checkout on PYTHONPATH, as `python -m pipeline` from its root sees it); an installed wheel's
    workers run the same Python and import the installed packages, so nothing is added."""
    env = {# Ray Train's controller checks on its workers every 2 s by default, and a
           # train stage waits for that poll to see its workers start and finish.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    path = os.pathsep.join(filter(None, [str(CHECKOUT) if CHECKOUT is not None else None,
                                         os.environ.get("PYTHONPATH")]))
    if path:
        env["PYTHONPATH"] = path
    return env


def ensure_ray() -> float:
    """Start this command's own Ray, or join the cluster RAY_ADDRESS names, unless this process
    already has; the seconds it took (0 if nothing was started). See pipeline/ray_session.py."""
    import ray

    if ray.is_initialized():
        return 0.0
    # ray.init puts its own SIGTERM handler in (it logs a stack and aborts): keep the command's,
    # which ends the round with one line and shuts Ray down (pipeline/cli.py).
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    start = time.perf_counter()
    try:
        if os.environ.get("RAY_ADDRESS"):
            # A cluster or `ray job submit`: the job's runtime env already ships the code.
            ray.init()
        else:
            ray_session.start_own_ray(ray_worker_env())
    except Exception as exc:
        where = os.environ.get("RAY_ADDRESS")
        what = f"could not join the Ray cluster at RAY_ADDRESS={where}" if where else "Ray could not start"
        raise PipelineError(f"{what}: {failures.describe(exc)}") from exc
    finally:
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    ray_session.start_watching()
    return time.perf_counter() - start
