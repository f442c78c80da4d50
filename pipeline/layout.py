"""The run directory contract (DESIGN.md, "Run layout") and atomic writes.

Nothing in a run directory is ever half-written: files are written to a
temporary name and renamed, a stage writes into `<output>.partial/` and
renames it when complete, and `_done/<stage>` is written last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError

# A run name is one path component: it can never point outside the output root.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")

# The stages of a round, in order, and the output each one owns.
STAGE_OUTPUTS = {
    "generate": "candidates",
    "rerank": "lists",
    "reference": "train",
    "train": "policy",
    "evaluate": "eval",
}
STAGES = tuple(STAGE_OUTPUTS)

# Which earlier rounds `lists.memory` (their candidates) and `train.replay` (their lists)
# bring into round `number`.
EARLIER_ROUNDS: dict[str, Callable[[int], list[int]]] = {
    "none": lambda number: [],
    "previous": lambda number: [number - 1] if number > 1 else [],
    "all": lambda number: list(range(1, number)),
}
PARTIAL_SUFFIX = ".partial"


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, text, "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, data, "wb")


def _atomic_write(path: Path, data: str | bytes, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write one shard under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def output_files(directory: Path) -> dict[str, dict[str, int]]:
    """Every file under a stage's output: its size, and its row count if it is a Parquet shard."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        entry = {"bytes": path.stat().st_size}
        if path.suffix == ".parquet":
            try:
                entry["rows"] = pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException):
                pass  # not a shard a reader could open anyway: its size is all there is to check
        files[path.relative_to(directory).as_posix()] = entry
    return files


def read_parquet_dir(directory: Path) -> pa.Table:
    """All `part-*.parquet` shards of a stage output, in shard order."""
    shards = sorted(directory.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no part-*.parquet shards in {directory}")
    return pa.concat_tables([pq.read_table(s) for s in shards])


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


@dataclass(frozen=True)
class RoundLayout:
    dir: Path
    number: int

    @property
    def candidates(self) -> Path:
        return self.dir / "candidates"

    @property
    def lists(self) -> Path:
        return self.dir / "lists"

    @property
    def train(self) -> Path:
        return self.dir / "train"

    @property
    def policy(self) -> Path:
        return self.dir / "policy"

    @property
    def eval(self) -> Path:
        return self.dir / "eval"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    def output(self, stage: str) -> Path:
        return self.dir / STAGE_OUTPUTS[stage]

    def partial(self, stage: str) -> Path:
        return self.dir / (STAGE_OUTPUTS[stage] + PARTIAL_SUFFIX)

    def done_marker(self, stage: str) -> Path:
        return self.dir / "_done" / stage

    def is_done(self, stage: str) -> bool:
        return self.done_marker(stage).is_file()

    def is_finished(self) -> bool:
        return all(self.is_done(stage) for stage in STAGES)

    def stage_stats(self, stage: str) -> dict[str, Any]:
        return json.loads(self.done_marker(stage).read_text())

    def begin_stage(self, stage: str) -> Path:
        """Return the `.partial` directory a stage writes into, keeping finished shards.

        An output directory without its done marker (a crash between the rename
        and the marker) goes back to `.partial`, so its shards are reused, not
        appended to.
        """
        partial, final = self.partial(stage), self.output(stage)
        if final.exists():
            if partial.exists():
                shutil.rmtree(final)
            else:
                os.replace(final, partial)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def finish_stage(self, stage: str, stats: dict[str, Any]) -> None:
        os.replace(self.partial(stage), self.output(stage))
        # The marker lists what the stage left, so a later stage can tell a file lost or cut short.
        atomic_write_json(self.done_marker(stage), {**stats, "files": output_files(self.output(stage))})

    def check_output(self, stage: str) -> None:
        """One line naming the file and the stage to redo when a finished stage's output is damaged.

        Compared with the file list its done marker recorded (markers written before
        that list existed are not checked); Parquet shards must also have a readable footer.
        """
        recorded = self.stage_stats(stage).get("files")
        if not recorded:
            return
        directory = self.output(stage)
        redo = (f"redo the {stage} stage of round {self.number}: delete {self.done_marker(stage)} "
                "and run the same command")
        for relative, expected in sorted(recorded.items()):
            path = directory / relative
            if not path.is_file():
                raise PipelineError(f"{path} is missing; {redo}")
            size = path.stat().st_size
            if size != expected["bytes"]:
                raise PipelineError(f"{path} has {size} bytes, not the {expected['bytes']} its stage wrote "
                                    f"(truncated or replaced); {redo}")
            if "rows" in expected:
                try:
                    rows = pq.read_metadata(path).num_rows
                except (OSError, pa.ArrowException) as exc:
                    raise PipelineError(f"{path} is not a readable Parquet file ({exc}); {redo}") from None
                if rows != expected["rows"]:
                    raise PipelineError(f"{path} has {rows} rows, not the {expected['rows']} its stage wrote; {redo}")


@dataclass(frozen=True)
class RunLayout:
    dir: Path

    @classmethod
    def at(cls, output: str | Path, run: str) -> "RunLayout":
        """The run `run` under the output root, refusing a name that is not one safe path component."""
        if not RUN_NAME.fullmatch(run) or run in (".", ".."):
            raise PipelineError(f"run name {run!r} must be letters, digits, '.', '_' or '-' (one directory "
                                "name, not '.' or '..')")
        return cls(Path(output).expanduser().resolve() / run)

    def ensure_writable(self) -> None:
        """Create the output root if needed; one line when it cannot be created or written."""
        root = self.dir.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"output root {root} cannot be created ({exc.strerror or exc})") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise PipelineError(f"output root {root} is not writable")

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    def round(self, number: int) -> RoundLayout:
        return RoundLayout(self.dir / f"round_{number:03d}", number)
