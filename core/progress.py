"""Progress bars for code in Ray workers, drawn on the driver's terminal.

Code in a Ray worker (an engine, a reward actor, a train worker) reports with
`worker_bar` to a small named actor, the progress board; the command line's
driver (pipeline/console.py, `stage_bars`) draws what the board holds. Outside
a Ray worker (tests, scripts) `worker_bar` is a plain tqdm.
"""

from __future__ import annotations

import os
import time
from typing import Any

import tqdm as real_tqdm


def in_ray_worker() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:
        return False


BOARD = "larpo-progress-board"
# Seconds between a worker bar's reports, and between the driver's looks at the board.
REPORT_INTERVAL = 0.5


def progress_board():
    """The board that worker bars report to: the driver starts it (named, detached from nothing)."""
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self):
            self.bars: dict[str, tuple] = {}

        def report(self, key: str, desc: str, n: float, total: float | None, unit: str, closed: bool) -> None:
            self.bars[key] = (desc, n, total, unit, closed)

        def take(self) -> dict[str, tuple]:
            """The bars reported since the last call; closed ones are then forgotten."""
            bars = dict(self.bars)
            self.bars = {key: bar for key, bar in self.bars.items() if not bar[-1]}
            return bars

    try:
        return ray.get_actor(BOARD)
    except ValueError:
        return ProgressBoard.options(name=BOARD, get_if_exists=True).remote()


class WorkerBar:
    """A tqdm-like bar for code in Ray workers, drawn on the driver's terminal (`stage_bars`).

    It takes what vLLM's `use_tqdm` callable and our stages pass (ignoring display
    options that only a local tqdm has) and keeps `n` and `format_dict["elapsed"]`, which
    vLLM reads. Without a progress board (a worker of another program) it reports nothing.
    """

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it",
                 initial: int = 0, disable: bool = False, **_display_options: Any):
        import ray

        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "", total, unit
        self.n = initial
        self.postfix = None
        self.start = self.last_report = time.monotonic()
        self.key = f"{os.getpid()}-{id(self)}-{self.start}"
        self.board = None
        if not disable:
            try:
                self.board = ray.get_actor(BOARD)
            except ValueError:
                pass
        self._report(closed=False)

    def _report(self, closed: bool) -> None:
        if self.board is not None:
            self.board.report.remote(self.key, self.desc, self.n, self.total, self.unit, closed)
            self.last_report = time.monotonic()

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.monotonic() - self.start, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_report >= REPORT_INTERVAL:
            self._report(closed=False)

    def set_postfix(self, **_values: Any) -> None:
        pass

    def refresh(self) -> None:
        self._report(closed=False)

    def close(self) -> None:
        self._report(closed=True)
        self.board = None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


def engine_bar(*args: Any, desc: str | None = None, **kwargs: Any):
    """vLLM's `use_tqdm`: its answers bar only (rendering the chat template takes no time worth a bar)."""
    kwargs["disable"] = kwargs.get("disable", False) or desc != "Processed prompts"
    return worker_bar(*args, desc=desc, **kwargs)


def worker_bar(iterable=None, **kwargs: Any):
    """A bar for worker code: a WorkerBar inside a Ray worker, a plain tqdm elsewhere (tests, scripts)."""
    if in_ray_worker():
        return WorkerBar(iterable, **kwargs)
    return real_tqdm.tqdm(iterable, **kwargs)
