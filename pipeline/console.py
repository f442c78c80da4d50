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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tqdm as real_tqdm

from core.progress import REPORT_INTERVAL, progress_board

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
