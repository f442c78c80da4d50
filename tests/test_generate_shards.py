"""stages/generate.py: a re-run keeps the shard split it started with."""

from stages.generate import shard_count


def touch_shards(directory, count):
    for index in range(count):
        (directory / f"part-{index:05d}.parquet").write_bytes(b"shard")


def test_first_start_records_the_split(tmp_path):
    assert shard_count(tmp_path, ["a", "b", "c"], 2) == 2
    assert (tmp_path / "_shards.json").is_file()


def test_rerun_with_another_actor_count_keeps_the_first_split_and_its_shards(tmp_path):
    ids = ["a", "b", "c", "d"]
    shard_count(tmp_path, ids, 2)
    touch_shards(tmp_path, 1)
    # With 3 engines the prompts would be split differently and shard 0 would hold other rows.
    assert shard_count(tmp_path, ids, 3) == 2
    assert (tmp_path / "part-00000.parquet").exists()


def test_shards_made_for_other_prompts_are_removed(tmp_path):
    shard_count(tmp_path, ["a", "b"], 2)
    touch_shards(tmp_path, 2)
    assert shard_count(tmp_path, ["a", "b", "c"], 3) == 3
    assert not list(tmp_path.glob("part-*.parquet"))


def test_shards_without_a_recorded_split_are_not_trusted(tmp_path):
    touch_shards(tmp_path, 1)
    assert shard_count(tmp_path, ["a"], 1) == 1
    assert not list(tmp_path.glob("part-*.parquet"))
