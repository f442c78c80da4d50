"""The terminal and the logs: progress bars and the pipeline's own lines on the terminal, the rest in files.

While a round runs, everything else written to the command's stdout and
stderr (vLLM, Ray and transformers, and the workers' output that Ray forwards
to the driver) goes to `runs/<run>/logs/round_NNN/<stage>.log`, the stage
that was running when it was written; `--verbose` shows it live as well. The
redirection is at the file-descriptor level, so C extensions and loggers that
hold the old `sys.stderr` are caught too. The terminal keeps:
  - the round's progress bar and, beneath it, the running stage's own bars: code in
    Ray workers reports progress with `worker_bar` to a small named actor, the
    progress board, and the driver draws what the board holds (`stage_bars`);
  - the `pipeline` loggers' lines (one summary line per stage, warnings, errors).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tqdm as real_tqdm

# The terminal as the command found it, kept on its own descriptor so redirection leaves it alone.
TERMINAL = os.fdopen(os.dup(sys.__stderr__.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
_settings = {"verbose": False}


def configure(verbose: bool) -> None:
    """The command line's logging: `pipeline` lines to the terminal, everything else to the stage logs."""
    _settings["verbose"] = verbose
    handler = BarSafeHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    pipeline = logging.getLogger("pipeline")
    pipeline.handlers[:] = [handler]
    pipeline.setLevel(logging.INFO)
    pipeline.propagate = False
    # Other libraries' loggers go wherever stderr points: the stage log while a round runs.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class BarSafeHandler(logging.Handler):
    """Log lines on the terminal above the progress bars, which tqdm then draws again."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            real_tqdm.tqdm.write(self.format(record), file=TERMINAL)
        except Exception:
            self.handleError(record)


def progress(**kwargs: Any) -> real_tqdm.tqdm:
    """A progress bar of the driver's own, on the terminal; none in a log file or a pipe, where
    every redraw would be a line of its own (the pipeline's lines say what each stage did)."""
    return real_tqdm.tqdm(file=TERMINAL, disable=not TERMINAL.isatty(), **kwargs)


@contextmanager
def capture(path: Path) -> Iterator[Path]:
    """Send the process's stdout and stderr to `path` (appended) until the block ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    log = open(path, "ab", buffering=0)
    tee = _Tee(log, TERMINAL) if _settings["verbose"] else None
    target = tee.write_fd if tee else log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    try:
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        if tee:
            tee.close()
        log.close()


class _Tee:
    """`--verbose`: a pipe whose reader thread copies everything into the log and onto the terminal."""

    def __init__(self, log, terminal):
        self.read_fd, self.write_fd = os.pipe()
        self.thread = threading.Thread(target=self._copy, args=(log, terminal), daemon=True)
        self.thread.start()

    def _copy(self, log, terminal) -> None:
        while chunk := os.read(self.read_fd, 65536):
            log.write(chunk)
            terminal.write(chunk.decode("utf-8", "replace"))
            terminal.flush()

    def close(self) -> None:
        os.close(self.write_fd)
        self.thread.join(timeout=5)
        os.close(self.read_fd)


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


@contextmanager
def stage_bars() -> Iterator[None]:
    """While the block runs, draw the bars that workers report to the progress board.

    On a terminal only: in a log file or a pipe (CI, `ray job submit`, nohup), a bar beneath
    another is a new line at every redraw, and the stage's summary line says what matters.
    """
    if not TERMINAL.isatty():
        yield
        return
    board = progress_board()
    stop = threading.Event()
    bars: dict[str, real_tqdm.tqdm] = {}

    def draw() -> None:
        import ray

        while not stop.wait(REPORT_INTERVAL):
            try:
                reported = ray.get(board.take.remote(), timeout=10)
            except Exception:
                continue
            for key, (desc, n, total, unit, closed) in reported.items():
                bar = bars.get(key)
                if bar is None:
                    bar = bars[key] = progress(desc=desc, total=total, unit=unit, leave=False,
                                               position=1 + len(bars))
                bar.n = n
                bar.refresh()
                if closed:
                    bar.close()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        for bar in bars.values():
            bar.close()


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
