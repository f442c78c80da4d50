"""core/timing.py on a fake clock, and the driver adding a stage's timings to its stats."""

import os
from types import SimpleNamespace

import pytest

from core import timing
from pipeline import driver
from core.layout import RunLayout
from core.timing import Timings


@pytest.fixture
def clock(monkeypatch):
    """perf_counter as a number the test moves forward by hand."""
    now = SimpleNamespace(t=100.0)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now.t)
    return now


def test_durations_add_up_by_name(clock):
    timings = Timings()
    with timings("startup"):
        clock.t += 2.0
    with timings("io"):
        clock.t += 0.25
    with timings("io"):
        clock.t += 0.5
    assert timings.seconds == {"startup": 2.0, "io": 0.75}


def test_a_block_that_raises_is_still_counted(clock):
    timings = Timings()
    with pytest.raises(ValueError), timings("work"):
        clock.t += 3.0
        raise ValueError("boom")
    assert timings.seconds == {"work": 3.0}


def test_stats_name_every_part_and_round():
    timings = Timings()
    timings.add({"work": 1.23456, "save": 0.5})
    timings.add({"work": 1.0})
    assert timings.stats() == {"startup_seconds": 0.0, "io_seconds": 0.0, "work_seconds": 2.23,
                               "save_seconds": 0.5}


def test_timed_goes_to_the_active_timings_and_is_a_no_op_without_one(clock):
    ran = []
    with timing.timed("io"):  # no stage running: only runs the block
        clock.t += 1.0
        ran.append(1)
    outer, inner = Timings(), Timings()
    with outer.active():
        with timing.timed("io"):
            clock.t += 1.0
        with inner.active(), timing.timed("io"):
            clock.t += 5.0
        timing.add(inner.seconds)
        with timing.timed("work"):
            clock.t += 2.0
    assert ran == [1]
    assert inner.seconds == {"io": 5.0}
    assert outer.seconds == {"io": 6.0, "work": 2.0}
    timing.add({"io": 9.0})  # no active Timings: dropped
    assert outer.seconds == {"io": 6.0, "work": 2.0}


def test_add_slowest_takes_the_worker_that_spent_the_longest():
    timings = Timings()
    with timings.active():
        timing.add_slowest([{"startup": 20.0, "work": 30.0}, {"startup": 22.0, "work": 31.0},
                            {"startup": 25.0, "work": 20.0}])
        timing.add_slowest([])
    assert timings.seconds == {"startup": 22.0, "work": 31.0}


def test_the_driver_adds_the_stage_timings_to_its_stats(tmp_path, monkeypatch):
    def run_stage(plan, out_dir):
        with timing.timed("io"):
            (out_dir / "part-00000.parquet").write_bytes(b"")
        timing.add({"startup": 1.5, "work": 2.5})
        return {"lists": 3}

    monkeypatch.setitem(driver.STAGE_RUNNERS, "rerank", run_stage)
    plan = SimpleNamespace(round=RunLayout(tmp_path / "run").round(1))
    driver.run_one_stage(plan, "rerank", lambda *args, **kwargs: None)
    stats = plan.round.stage_stats("rerank")
    assert stats["lists"] == 3
    assert stats["startup_seconds"] == 1.5 and stats["work_seconds"] == 2.5
    assert 0.0 <= stats["io_seconds"] <= stats["wall_seconds"]
    assert "peak_memory_gib" in stats


def test_a_failing_stage_says_which_log_holds_the_details(tmp_path, monkeypatch):
    def run_stage(plan, out_dir):
        os.write(2, b"a library's noise\n")  # as vLLM or a C extension writes
        raise ValueError("bad shard\nsecond line")

    monkeypatch.setitem(driver.STAGE_RUNNERS, "rerank", run_stage)
    plan = SimpleNamespace(round=RunLayout(tmp_path / "run").round(1))
    with pytest.raises(driver.StageFailed) as failure:
        driver.run_one_stage(plan, "rerank", lambda *args, **kwargs: None)
    log = tmp_path / "run" / "logs" / "round_001" / "rerank.log"
    assert str(failure.value) == f"rerank of round 1 failed: ValueError: bad shard (details: {log})"
    text = log.read_text()
    assert "a library's noise" in text and "Traceback" in text and "second line" in text
    assert not plan.round.is_done("rerank")


def test_the_round_time_counts_each_stage_once_and_names_round_0_apart():
    # tune-f's round 1 on the EPYC: reference inside train, round 0's evaluation run first.
    metrics = {"stage_seconds": {"generate": 234.3, "rerank": 4.9, "reference": 88.8, "train": 394.4,
                                 "evaluate": 127.2},
               "stages": {"reference": {"in_train_workers": True}, "train": {"reference_seconds_inside": 88.8}},
               "ray_init_seconds": 9.6, "baseline_seconds": 202.1, "round_seconds": 972.4}
    assert timing.round_time_text(metrics) == (
        "770.3 s (760.8 s of stages, 9.6 s ray.init; round 0's evaluation took 202.1 s before it)")


def test_a_reference_stage_of_its_own_counts_and_a_later_round_has_no_baseline():
    metrics = {"stage_seconds": {"generate": 10.0, "rerank": 1.0, "reference": 5.0, "train": 20.0, "evaluate": 4.0},
               "stages": {"reference": {"in_train_workers": False}, "train": {}},
               "ray_init_seconds": 0.0, "round_seconds": 41.0}
    assert timing.round_time_text(metrics) == "41.0 s (40.0 s of stages, 0.0 s ray.init)"


def test_the_log_metrics_and_report_give_one_wall_time_per_round():
    from pipeline.report import table_row

    metrics = {"round": 1, "eval": {}, "stage_seconds": {"generate": 234.3, "rerank": 4.9, "reference": 88.8,
                                                        "train": 394.4, "evaluate": 127.2},
               "stages": {"train": {"reference_seconds_inside": 88.8}},
               "ray_init_seconds": 9.6, "baseline_seconds": 202.1, "round_seconds": 972.4}
    metrics["wall_seconds"] = round(timing.round_wall_seconds(metrics), 2)  # as the driver stores it
    assert metrics["wall_seconds"] == 770.3
    assert timing.round_time_text(metrics).startswith("770.3 s ")
    assert table_row(metrics, [])["wall_seconds"] == 770.3


def test_rounds_from_before_wall_seconds_read_the_same():
    with_total = {"round_seconds": 972.4, "baseline_seconds": 202.1, "stage_seconds": {"train": 1.0}}
    assert timing.round_wall_seconds(with_total) == pytest.approx(770.3)
    stages_only = {"stage_seconds": {"generate": 10.0, "train": 20.0},
                   "stages": {"train": {"reference_seconds_inside": 5.0}}}
    assert timing.round_wall_seconds(stages_only) == 25.0
    assert timing.round_wall_seconds({"stage_seconds": {}}) is None
