"""The run directory contract (docs/contracts.md, "Run layout") and atomic writes.

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

from core.errors import PipelineError

# A run name is one path component: it can never point outside the output root.
RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")

@dataclass(frozen=True)
class Stage:
    """One stage of a round, as the driver, the layout, `inspect` and resume all see it."""

    name: str                  # stages/registry.py maps it to the function that runs it
    outputs: tuple[str, ...]   # the round directories it writes; the first is its `out_dir`
    reads: str | None          # the stage whose output it reads; None: the previous round's policy


# The stages of a round, in order. Every directory a stage writes is declared here: each is
# written under `<name>.partial/` and renamed into place, and `_done/<stage>` vouches for all.
STAGE_REGISTRY: tuple[Stage, ...] = (
    Stage("generate", ("candidates",), reads=None),
    # scored/: every candidate with its reward, which a later round's lists.memory reads back.
    Stage("rerank", ("lists", "scored"), reads="generate"),
    Stage("reference", ("train",), reads="rerank"),
    Stage("train", ("policy",), reads="reference"),
    Stage("evaluate", ("eval",), reads="train"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGE_REGISTRY}
STAGES = tuple(STAGE_BY_NAME)
# Each stage's main output, the directory its run_stage writes into.
STAGE_OUTPUTS = {stage.name: stage.outputs[0] for stage in STAGE_REGISTRY}
# Round 0 is the base model, evaluated once per run: it has this one stage.
BASELINE_STAGES = ("evaluate",)

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


def process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: Path) -> None:
    """Give a file the mode a plain open() would have: mkstemp makes it 0600, which hides
    metrics and weights from teammates on a shared mount."""
    os.chmod(path, 0o666 & ~process_umask())


def share_tree(directory: Path) -> None:
    """share_as_umask_allows for every file under `directory`."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            share_as_umask_allows(path)


def _atomic_write(path: Path, data: str | bytes, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        share_as_umask_allows(Path(tmp))
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

    @property
    def scored(self) -> Path:
        return self.dir / "scored"

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this round has: round 0 only evaluates the base model."""
        return BASELINE_STAGES if self.number == 0 else STAGES

    def output(self, stage: str) -> Path:
        return self.dir / STAGE_OUTPUTS[stage]

    def partial(self, stage: str, output: str | None = None) -> Path:
        """Where a stage writes `output` (its main output by default) until it finishes."""
        return self.dir / ((output or STAGE_OUTPUTS[stage]) + PARTIAL_SUFFIX)

    def done_marker(self, stage: str) -> Path:
        return self.dir / "_done" / stage

    def is_done(self, stage: str) -> bool:
        return self.done_marker(stage).is_file()

    def is_finished(self) -> bool:
        return all(self.is_done(stage) for stage in self.stages)

    def stage_stats(self, stage: str) -> dict[str, Any]:
        return json.loads(self.done_marker(stage).read_text())

    def begin_stage(self, stage: str) -> Path:
        """Prepare the `.partial` directory of every output of the stage, keeping finished shards;
        return the main one.

        An output directory without its done marker (a crash between the rename
        and the marker) goes back to `.partial`, so its shards are reused, not
        appended to.
        """
        for output in STAGE_BY_NAME[stage].outputs:
            partial, final = self.partial(stage, output), self.dir / output
            if final.exists():
                if partial.exists():
                    shutil.rmtree(final)
                else:
                    os.replace(final, partial)
            partial.mkdir(parents=True, exist_ok=True)
        return self.partial(stage)

    def finish_stage(self, stage: str, stats: dict[str, Any]) -> None:
        main, *extra = STAGE_BY_NAME[stage].outputs
        # The main output last: a crash between renames leaves it `.partial`, so the stage reruns.
        for output in (*extra, main):
            # Libraries write some files 0600 (safetensors' weights): readable to teammates first.
            share_tree(self.partial(stage, output))
            os.replace(self.partial(stage, output), self.dir / output)
        # The marker lists what the stage left, so a later stage can tell a file lost or cut short.
        files = {"files": output_files(self.dir / main)}
        if extra:
            files["extra_outputs"] = {output: output_files(self.dir / output) for output in extra}
        atomic_write_json(self.done_marker(stage), {**stats, **files})

    def check_output(self, stage: str, main_only: bool = False, then: str = "run the same command") -> None:
        """One line naming the file and the stage to redo when a finished stage's output is damaged.

        Compared with the file lists its done marker recorded (markers written before
        those lists existed are not checked); Parquet shards must also have a readable footer.
        `main_only` checks the stage's main output alone (a later round's replay reads only
        rerank's lists); `then` is the step after deleting the marker.
        """
        stats = self.stage_stats(stage)
        recorded = {STAGE_OUTPUTS[stage]: stats.get("files"),
                    **({} if main_only else stats.get("extra_outputs", {}))}
        redo = f"redo the {stage} stage of round {self.number}: delete {self.done_marker(stage)} and {then}"
        for output, files in recorded.items():
            for relative, expected in sorted((files or {}).items()):
                check_file(self.dir / output / relative, expected, redo)


def check_file(path: Path, expected: dict[str, int], redo: str) -> None:
    """`path` must still have the bytes (and, for a shard, the rows) its stage recorded."""
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
