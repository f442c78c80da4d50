"""The reference stage's Ray task: the log-prob scorer in a process of its own.

Its own process, so that the model's memory is released when scoring ends. A
task whose process dies is started again by the driver (core/retries.py), not
by Ray, so that the retry is logged and counted like every other worker's.
"""

from __future__ import annotations

import sys

import ray

from core import timing
from core.gpu_layout import where_this_runs
from core.retries import WorkerRetries
from pools.logprob_scorer import LogprobSpec, logprobs_with
from pools.logprobs import Response


def score_items(model_path: str, lists: list[tuple[list[dict], list[Response]]], spec: LogprobSpec
                ) -> tuple[list[list[float]], dict[str, float]]:
    """The task's body: the log-probs, and the task's own timings for the stage's.

    Its name is the task's process title (`ray::score_items`), which the fault tests look for."""
    # Into the stage's log (stderr is captured there), not onto the terminal.
    print(f"reference scorer runs on {where_this_runs()}", file=sys.stderr, flush=True)
    timings = timing.Timings()
    with timings.active():
        return logprobs_with(spec, model_path, lists), timings.seconds


def score_in_task(model_path: str, lists: list[tuple[list[dict], list[Response]]], spec: LogprobSpec,
                  num_gpus: float, retries: WorkerRetries) -> list[list[float]]:
    """score_items in one Ray task on `num_gpus`, started again each time its process dies; its
    timings are added to the stage's."""
    task = ray.remote(score_items).options(num_gpus=num_gpus, max_retries=0)
    logps, seconds = retries.run("reference task", lambda: ray.get(task.remote(model_path, lists, spec)))
    timing.add(seconds)
    return logps
