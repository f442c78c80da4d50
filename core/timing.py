"""Where a stage's wall time goes: start-up, Parquet I/O, checkpoint save and the work itself.

Each part is measured with `time.perf_counter` around the real calls, in the
process that makes them: an engine's start-up inside its Ray actor, a Parquet
write in the driver. Whatever a stage's wall time holds beyond its measured
parts is Ray and orchestration (actor processes, runtime envs, scheduling,
moving results between processes, the driver's glue); `bench/round_breakdown.py`
reports it as that remainder rather than guessing at it.

The driver makes one `Timings` per stage and activates it while the stage
runs, so code anywhere in the stage adds to it with `timed(part)` without being
handed it, and the stages keep their signatures. A Ray actor or task times
itself with a `Timings` of its own and sends `.seconds` back to be `add`ed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

# Every stage reports these; train adds "save" (the policy checkpoint and in-training checkpoints).
PARTS = ("startup", "io", "work")

_ACTIVE: ContextVar[Timings | None] = ContextVar("active_timings", default=None)


class Timings:
    """Named durations in seconds, summed: `with timings("io"): ...` adds the block's wall time to "io"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def add(self, seconds: Mapping[str, float]) -> None:
        for part, value in seconds.items():
            self.seconds[part] = self.seconds.get(part, 0.0) + value

    def stats(self) -> dict[str, float]:
        """`<part>_seconds` keys for a stage's stats: every part of PARTS (0 if unused), then any other measured."""
        parts = list(PARTS) + sorted(set(self.seconds) - set(PARTS))
        return {f"{part}_seconds": round(self.seconds.get(part, 0.0), 2) for part in parts}

    @contextmanager
    def active(self) -> Iterator[Timings]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def timed(part: str):
    """Time a block into the active Timings; outside a stage (tests, benchmarks) only run it."""
    timings = _ACTIVE.get()
    return timings(part) if timings is not None else _untimed()


@contextmanager
def _untimed() -> Iterator[None]:
    yield


def add(seconds: Mapping[str, float]) -> None:
    """Add durations measured elsewhere (a Ray actor's) to the active Timings."""
    timings = _ACTIVE.get()
    if timings is not None:
        timings.add(seconds)


def add_slowest(per_worker: list[Mapping[str, float]]) -> None:
    """Add the durations of the worker that spent the longest, of workers that ran side by side.

    Their parts overlap in time, so summing them would count the same wall
    seconds once per worker; the slowest one is the stage's critical path.
    """
    if per_worker:
        add(max(per_worker, key=lambda seconds: sum(seconds.values())))


def round_wall_seconds(metrics: Mapping) -> float | None:
    """A round's own wall time: what the log, metrics.json (`wall_seconds`) and `report` all give.

    Round 0's evaluation, when the command that ran round 1 ran it first, is not part of it
    (`baseline_seconds`), and a reference scored inside the train workers counts once, in train.
    Rounds finished before `wall_seconds` was stored are read from what they kept."""
    if metrics.get("wall_seconds") is not None:
        return float(metrics["wall_seconds"])
    if metrics.get("round_seconds") is not None:
        return float(metrics["round_seconds"]) - float(metrics.get("baseline_seconds") or 0.0)
    seconds = [s for s in (metrics.get("stage_seconds") or {}).values() if s is not None]
    if not seconds:
        return None
    return sum(seconds) - float((metrics.get("stages") or {}).get("train", {}).get("reference_seconds_inside", 0.0))


def round_time_text(metrics: Mapping) -> str:
    """How long a finished round took, as the driver logs it (from its metrics.json).

    Each stage counts once: a reference scored inside the train stage's workers is already
    part of train's wall time. round_seconds also holds round 0's evaluation when the
    command that ran round 1 ran it first; that is named apart, not counted as round 1's."""
    # As bench/round_breakdown.py counts it: the train stage reports the reference seconds inside it.
    inside = metrics.get("stages", {}).get("train", {}).get("reference_seconds_inside", 0.0)
    stages = sum(metrics["stage_seconds"].values()) - inside
    baseline = metrics.get("baseline_seconds") or 0.0
    own = round_wall_seconds(metrics)
    text = f"{own:.1f} s ({stages:.1f} s of stages, {metrics.get('ray_init_seconds', 0.0):.1f} s ray.init"
    return text + (f"; round 0's evaluation took {baseline:.1f} s before it)" if baseline else ")")
