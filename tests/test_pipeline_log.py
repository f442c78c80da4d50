"""runs/<run>/pipeline.log: the driver's lines are appended while a round runs, and only then."""

import logging

from pipeline.driver import log, run_log


def test_lines_are_appended_and_the_handler_removed(tmp_path):
    path = tmp_path / "run" / "pipeline.log"
    for attempt in (1, 2):
        with run_log(path):
            log.info("round %d: generate finished in %.1f s", attempt, 1.5)
            logging.getLogger("pipeline.evaluate").info("round 0: base model evaluated")
    log.info("after the round: not in the file")
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "round 1: generate finished in 1.5 s", "round 0: base model evaluated",
        "round 2: generate finished in 1.5 s", "round 0: base model evaluated"]
    assert " INFO pipeline.evaluate" in lines[1]
    assert not log.handlers


def test_file_only_lines_do_not_reach_the_terminal(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # what reaches the root logger, which the CLI prints to stderr
    path = tmp_path / "pipeline.log"
    with run_log(path) as file_only:
        log.info("round 3: train started")
        file_only("round %d: %s failed after %.1f s", 3, "train", 2.0)
    assert "round 3: train failed after 2.0 s" in path.read_text()
    assert " ERROR " in path.read_text()
    assert "train started" in caplog.text and "failed" not in caplog.text
