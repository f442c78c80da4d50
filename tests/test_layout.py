"""core/layout.py: the run directory contract and atomic writes."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import layout
from core.layout import (STAGE_OUTPUTS, STAGES, RoundLayout, RunLayout, atomic_write_json,
                             atomic_write_text, read_parquet_dir, shard_name, write_parquet)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def table(values: list[int]) -> pa.Table:
    return pa.table({"x": pa.array(values, pa.int64())})


@pytest.fixture
def round1(tmp_path) -> RoundLayout:
    return RunLayout.at(tmp_path, "run").round(1)


# --- paths ---------------------------------------------------------------------

def test_round_directories_are_zero_padded(tmp_path):
    run = RunLayout.at(tmp_path, "myrun")
    assert run.dir == tmp_path.resolve() / "myrun"
    assert run.config == run.dir / "config.yaml"
    assert run.round(1).dir.name == "round_001"
    assert run.round(12).dir.name == "round_012"
    assert run.round(123).dir.name == "round_123"
    assert run.round(7).number == 7


def test_round_paths(round1):
    d = round1.dir
    assert d.name == "round_001"
    assert round1.candidates == d / "candidates"
    assert round1.lists == d / "lists"
    assert round1.train == d / "train"
    assert round1.policy == d / "policy"
    assert round1.eval == d / "eval"
    assert round1.metrics == d / "metrics.json"
    assert round1.done_marker("rerank") == d / "_done" / "rerank"
    assert round1.partial("generate") == d / "candidates.partial"
    for stage in STAGES:
        assert round1.output(stage) == d / STAGE_OUTPUTS[stage]


def test_stage_order_and_outputs():
    assert STAGES == ("generate", "rerank", "reference", "train", "evaluate")
    assert STAGE_OUTPUTS == {"generate": "candidates", "rerank": "lists", "reference": "train",
                             "train": "policy", "evaluate": "eval"}


def test_shard_name():
    assert shard_name(0) == "part-00000.parquet"
    assert shard_name(42) == "part-00042.parquet"


def test_run_layout_expands_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunLayout.at("runs", "r").dir == tmp_path.resolve() / "runs" / "r"


# --- stages --------------------------------------------------------------------

def test_begin_stage_creates_partial(round1):
    partial = round1.begin_stage("generate")
    assert partial == round1.dir / "candidates.partial"
    assert partial.is_dir() and not os.listdir(partial)
    assert not round1.candidates.exists()
    assert not round1.is_done("generate")


def test_begin_stage_keeps_shards_already_there(round1):
    partial = round1.begin_stage("generate")
    write_parquet(table([1, 2]), partial / shard_name(0))
    again = round1.begin_stage("generate")
    assert again == partial
    assert names(again) == [shard_name(0)]
    assert pq.read_table(again / shard_name(0)).column("x").to_pylist() == [1, 2]


def test_begin_stage_moves_unmarked_output_back_to_partial(round1):
    # A crash between the rename and the done marker leaves `candidates/` without `_done/generate`.
    partial = round1.begin_stage("generate")
    write_parquet(table([1, 2, 3]), partial / shard_name(0))
    os.replace(partial, round1.candidates)
    assert not round1.is_done("generate")

    partial = round1.begin_stage("generate")
    assert not round1.candidates.exists()
    assert names(partial) == [shard_name(0)]
    # The stage redoes only what is missing; rewriting the same shard replaces it.
    write_parquet(table([1, 2, 3]), partial / shard_name(0))
    write_parquet(table([4]), partial / shard_name(1))
    round1.finish_stage("generate", {"rows": 4})
    assert read_parquet_dir(round1.candidates).column("x").to_pylist() == [1, 2, 3, 4]


def test_begin_stage_with_both_output_and_partial_keeps_partial(round1):
    partial = round1.begin_stage("rerank")
    write_parquet(table([1]), partial / shard_name(0))
    round1.lists.mkdir()
    write_parquet(table([9]), round1.lists / shard_name(0))
    partial = round1.begin_stage("rerank")
    assert not round1.lists.exists()
    assert pq.read_table(partial / shard_name(0)).column("x").to_pylist() == [1]


def test_finish_stage_renames_and_writes_marker(round1):
    partial = round1.begin_stage("rerank")
    write_parquet(table([5]), partial / shard_name(0))
    write_parquet(table([5, 6]), round1.partial("rerank", "scored") / shard_name(0))
    round1.finish_stage("rerank", {"lists": 1, "all_tied_dropped": 0})
    assert not partial.exists() and not round1.partial("rerank", "scored").exists()
    assert names(round1.lists) == [shard_name(0)] and names(round1.scored) == [shard_name(0)]
    assert round1.is_done("rerank")
    # The marker keeps the stage's numbers and what it wrote: each file's size, a shard's rows,
    # for its main output and for every other output the registry declares.
    files = {shard_name(0): {"bytes": (round1.lists / shard_name(0)).stat().st_size, "rows": 1}}
    scored = {shard_name(0): {"bytes": (round1.scored / shard_name(0)).stat().st_size, "rows": 2}}
    expected = {"lists": 1, "all_tied_dropped": 0, "files": files, "extra_outputs": {"scored": scored}}
    assert json.loads(round1.done_marker("rerank").read_text()) == expected
    assert round1.stage_stats("rerank") == expected
    assert names(round1.dir / "_done") == ["rerank"]  # no temporary files next to the marker


def test_finish_stage_writes_marker_last(round1, monkeypatch):
    partial = round1.begin_stage("generate")
    write_parquet(table([1]), partial / shard_name(0))
    seen = {}
    real = layout.atomic_write_json

    def spy(path, data):
        seen["output_exists"] = round1.candidates.is_dir()
        seen["partial_exists"] = round1.partial("generate").exists()
        real(path, data)

    monkeypatch.setattr(layout, "atomic_write_json", spy)
    round1.finish_stage("generate", {})
    assert seen == {"output_exists": True, "partial_exists": False}


def test_failed_rename_writes_no_marker(round1, monkeypatch):
    round1.begin_stage("generate")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(layout.os, "replace", broken_replace)
    with pytest.raises(OSError):
        round1.finish_stage("generate", {})
    monkeypatch.undo()
    assert not round1.is_done("generate")
    assert not (round1.dir / "_done" / "generate").exists()


def test_is_finished_needs_every_stage(round1):
    assert not round1.is_finished()
    for stage in STAGES:
        assert not round1.is_finished()
        round1.begin_stage(stage)
        round1.finish_stage(stage, {"stage": stage})
    assert round1.is_finished()
    assert all(round1.stage_stats(s) == {"stage": s, "files": {}, **({"extra_outputs": {"scored": {}}}
                                                                     if s == "rerank" else {})} for s in STAGES)
    round1.done_marker("train").unlink()
    assert not round1.is_finished()


def test_every_output_of_a_stage_is_kept_and_checked(round1):
    """rerank's scored/ goes back to .partial with lists/ when the stage reruns, and a damaged one is named."""
    round1.begin_stage("rerank")
    write_parquet(table([1, 2]), round1.partial("rerank", "scored") / shard_name(0))
    round1.finish_stage("rerank", {})
    round1.check_output("rerank")
    (round1.scored / shard_name(0)).write_bytes(b"cut")
    with pytest.raises(layout.PipelineError, match=r"scored/part-00000.parquet has 3 bytes.*redo the rerank stage"):
        round1.check_output("rerank")
    round1.done_marker("rerank").unlink()
    round1.begin_stage("rerank")
    assert not round1.scored.exists() and (round1.partial("rerank", "scored") / shard_name(0)).is_file()


def test_done_marker_directory_is_not_done(round1):
    round1.done_marker("generate").mkdir(parents=True)
    assert not round1.is_done("generate")


# --- atomic writes -------------------------------------------------------------

def test_atomic_write_text_creates_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "metrics.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    atomic_write_text(path, "second, longer content")
    assert path.read_text() == "second, longer content"
    atomic_write_text(path, "3")
    assert path.read_text() == "3"
    assert names(path.parent) == ["metrics.json"]


def test_atomic_write_text_failure_keeps_old_content_and_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, 123)  # not a str: the write fails midway
    assert path.read_text() == "old"
    assert names(tmp_path) == ["config.yaml"]


def test_atomic_write_json(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, None]}
    assert path.read_text().endswith("\n")
    assert names(tmp_path) == ["m.json"]


def test_write_parquet_creates_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out" / shard_name(0)
    write_parquet(table([1, 2, 3]), path)
    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3]
    write_parquet(table([7]), path)
    assert pq.read_table(path).column("x").to_pylist() == [7]
    assert names(path.parent) == [shard_name(0)]


# --- reading shards -------------------------------------------------------------

def test_read_parquet_dir_concatenates_in_shard_order(tmp_path):
    for index in (2, 0, 10, 1):  # written out of order
        write_parquet(table([index * 100, index * 100 + 1]), tmp_path / shard_name(index))
    (tmp_path / "notes.txt").write_text("ignored")
    write_parquet(table([-1]), tmp_path / "other.parquet")  # not a part-* shard
    result = read_parquet_dir(tmp_path)
    assert result.column("x").to_pylist() == [0, 1, 100, 101, 200, 201, 1000, 1001]


def test_read_parquet_dir_empty_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="part-"):
        read_parquet_dir(tmp_path)


def test_read_parquet_dir_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_parquet_dir(tmp_path / "missing")


def test_read_parquet_dir_accepts_empty_shard_with_schema(tmp_path):
    schema = pa.schema([("x", pa.int64())])
    write_parquet(pa.Table.from_pylist([], schema=schema), tmp_path / shard_name(0))
    write_parquet(table([3]), tmp_path / shard_name(1))
    assert read_parquet_dir(tmp_path).column("x").to_pylist() == [3]


# --- damaged outputs -------------------------------------------------------------

@pytest.fixture
def finished_rerank(round1) -> RoundLayout:
    partial = round1.begin_stage("rerank")
    write_parquet(table([1, 2, 3]), partial / shard_name(0))
    write_parquet(table([4]), partial / shard_name(1))
    round1.finish_stage("rerank", {"lists": 4})
    round1.check_output("rerank")  # as written: nothing to say
    return round1


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "is missing"),
    (lambda p: p.write_bytes(p.read_bytes()[:-9]), "bytes, not the"),
    (lambda p: p.write_bytes(b"x" * p.stat().st_size), "is not a readable Parquet file"),
])
def test_a_damaged_shard_names_itself_and_the_stage_to_redo(finished_rerank, damage, message):
    shard = finished_rerank.lists / shard_name(1)
    damage(shard)
    with pytest.raises(layout.PipelineError, match=message) as error:
        finished_rerank.check_output("rerank")
    text = str(error.value)
    assert str(shard) in text and "redo the rerank stage of round 1" in text
    assert f"delete {finished_rerank.done_marker('rerank')}" in text and "\n" not in text


def test_a_shard_replaced_by_one_of_other_rows_is_found(finished_rerank):
    shard = finished_rerank.lists / shard_name(1)
    size = shard.stat().st_size
    write_parquet(table([7, 8]), shard)
    if shard.stat().st_size == size:  # the sizes may match: then the row count tells
        with pytest.raises(layout.PipelineError, match="has 2 rows, not the 1"):
            finished_rerank.check_output("rerank")
    else:
        with pytest.raises(layout.PipelineError, match="bytes, not the"):
            finished_rerank.check_output("rerank")


def test_a_marker_from_before_file_lists_is_not_checked(round1):
    round1.begin_stage("rerank")
    round1.finish_stage("rerank", {})
    atomic_write_json(round1.done_marker("rerank"), {"lists": 0})
    round1.check_output("rerank")


def test_a_stage_checks_its_input_before_it_starts(finished_rerank, tmp_path):
    from types import SimpleNamespace

    from pipeline.driver import check_input

    from pipeline.settings import load_config

    run = RunLayout.at(tmp_path, "run")
    config = load_config("configs/smoke.yaml")
    plan = SimpleNamespace(round=finished_rerank, run=run, config=config)
    check_input(plan, "reference")
    (finished_rerank.lists / shard_name(0)).write_bytes(b"PAR1")
    with pytest.raises(layout.PipelineError, match=r"lists/part-00000.parquet has 4 bytes.*redo the rerank stage"):
        check_input(plan, "reference")
    # Round 2's generate reads round 1's policy: a policy file gone is named.
    policy = run.round(1).begin_stage("train")
    (policy / "model.safetensors").write_bytes(b"weights")
    run.round(1).finish_stage("train", {})
    (run.round(1).policy / "model.safetensors").unlink()
    with pytest.raises(layout.PipelineError, match=r"policy/model.safetensors is missing; redo the train stage"):
        check_input(SimpleNamespace(round=run.round(2), run=run, config=config), "generate")


# --- file modes ----------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_take_the_process_umask_for_a_shared_mount(round1, umask):
    old = os.umask(umask)
    try:
        atomic_write_json(round1.metrics, {"a": 1})
        partial = round1.begin_stage("train")
        weights = partial / "model.safetensors"
        weights.write_bytes(b"w")
        os.chmod(weights, 0o600)  # as safetensors leaves it
        round1.finish_stage("train", {})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for path in (round1.metrics, round1.policy / "model.safetensors", round1.done_marker("train")):
        assert path.stat().st_mode & 0o777 == expected, path
