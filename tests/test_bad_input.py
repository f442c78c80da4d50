"""Bad input through the real command line: one line on stderr naming the problem,
exit status 2, and no round directory left behind."""

import json
from pathlib import Path

import pytest
import yaml

from core.errors import PipelineError
from pipeline.driver import plan_round
from pipeline.settings import load_config
from tests.conftest import REPO_ROOT, run_cli, survivors


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def good_row(prompt_id: str, text: str = "Say hello. Answer in at most 16 words.") -> dict:
    return {"prompt_id": prompt_id, "messages": [{"role": "user", "content": text}],
            "constraints": [{"kind": "max_words", "limit": 16}]}


def smoke_config(tmp_path: Path, **sections) -> Path:
    """configs/smoke.yaml with some sections replaced, written to tmp_path."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def assert_no_run_dir(output: Path) -> None:
    assert not any(output.glob("*/round_*")), list(output.rglob("*"))


@pytest.fixture
def output(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def test_missing_config_file(tmp_path, output):
    result = run_cli("round", "1", "--config", str(tmp_path / "nope.yaml"), "--run", "r", "--output", str(output))
    assert_one_line_error(result, "nope.yaml", "does not exist")
    assert not output.exists()


def test_unknown_config_key(tmp_path, output):
    config = smoke_config(tmp_path, train={"betta": 0.1})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, "train.betta", "train.beta")
    assert not output.exists()


def test_unknown_override_key(output):
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output),
                     "generate.num_sampels=4")
    assert_one_line_error(result, "generate.num_sampels")


def test_wrong_type_override(output):
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output),
                     "train.beta=high")
    assert_one_line_error(result, "train.beta", "float")


def test_prompt_row_without_messages(tmp_path, output):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [good_row("a"), {"prompt_id": "b", "text": "hi"}])
    config = smoke_config(tmp_path, prompts={"train": str(prompts)})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, str(prompts), "row 2", "'b'", "messages")
    assert_no_run_dir(output)


def test_empty_prompt_set(tmp_path, output):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("")
    config = smoke_config(tmp_path, prompts={"train": str(prompts)})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, str(prompts), "empty")
    assert_no_run_dir(output)


def test_prompt_longer_than_context_is_an_error_when_configured(tmp_path, output):
    long_text = "Describe the sea. " * 400  # about 2000 tokens, over max_model_len=1024
    prompts = write_prompts(tmp_path / "prompts.jsonl", [good_row("short"), good_row("too-long", long_text)])
    config = smoke_config(tmp_path, prompts={"train": str(prompts), "too_long": "error"})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, "'too-long'", "max_model_len")
    assert_no_run_dir(output)


def test_prompt_longer_than_context_is_dropped_and_counted(tmp_path, output, tiny_model):
    long_text = "Describe the sea. " * 400
    prompts = write_prompts(tmp_path / "prompts.jsonl", [good_row("short"), good_row("too-long", long_text)])
    config = load_config("configs/smoke.yaml", [f"prompts.train={prompts}", "prompts.too_long=drop",
                                                f"output={output}"])
    plan = plan_round(config, "r", 1)
    assert [p.prompt_id for p in plan.prompts] == ["short"]
    assert plan.dropped_too_long == ["too-long"]
    assert_no_run_dir(output)


def test_prompt_options_reach_the_round_plan(tmp_path, output, tiny_model):
    rows = [good_row("a"), {**good_row("b"), "source": "x"}, good_row("a", "Say bye.")]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    config = load_config("configs/smoke.yaml", [f"prompts.train={prompts}", "prompts.duplicates=drop",
                                                "prompts.metadata_fields=constraints", f"output={output}"])
    plan = plan_round(config, "r", 1)
    kept = {p.prompt_id: p.messages[0]["content"] for p in plan.prompts}  # in the round's shuffled order
    assert kept == {"a": rows[0]["messages"][0]["content"], "b": rows[1]["messages"][0]["content"]}
    assert all(set(p.metadata) == {"constraints"} for p in plan.prompts + plan.heldout)
    assert_no_run_dir(output)


def test_previous_round_missing(output):
    result = run_cli("round", "2", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output))
    assert_one_line_error(result, "round 1", "not finished", "round_001")
    assert_no_run_dir(output)


def test_missing_prompt_file(tmp_path, output):
    config = smoke_config(tmp_path, prompts={"train": str(tmp_path / "missing.jsonl")})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, "missing.jsonl", "does not exist")
    assert_no_run_dir(output)


def test_missing_model_directory(tmp_path, output):
    config = smoke_config(tmp_path, model={"name": str(tmp_path / "no-model")})
    result = run_cli("round", "1", "--config", str(config), "--run", "r", "--output", str(output))
    assert_one_line_error(result, "no-model", "does not exist")
    assert_no_run_dir(output)


def test_run_with_incompatible_config_is_refused(tmp_path, output):
    """A later round may not change what defines the run (here the prompt set)."""
    run_dir = output / "r"
    run_dir.mkdir(parents=True)
    stored = load_config("configs/smoke.yaml", [f"output={output}"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored.to_dict()))
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output),
                     "prompts.train=data/prompts/train.jsonl")
    assert_one_line_error(result, "prompts.train", "new run name")
    assert_no_run_dir(output)


def test_prompts_that_leave_no_room_in_train_max_length_are_refused(output, tiny_model):
    config = load_config("configs/smoke.yaml", ["train.max_length=16", f"output={output}"])
    with pytest.raises(PipelineError, match="train.max_length"):
        plan_round(config, "r", 1)
    assert_no_run_dir(output)


def test_on_off_choices_survive_yaml_booleans():
    assert load_config("configs/smoke.yaml", ["train.autocast=on"]).train.autocast == "on"
    assert load_config("configs/smoke.yaml", ["train.autocast=off"]).train.autocast == "off"


@pytest.mark.parametrize("name", ["../../etc", "..", ".", "a/b", "", "run name", "x\x00y"])
def test_run_name_must_be_one_safe_path_component(output, name):
    config = load_config("configs/smoke.yaml", [f"output={output}"])
    with pytest.raises(PipelineError, match="run name .* must be letters, digits"):
        plan_round(config, name, 1)
    assert not output.exists()


def test_traversing_run_name_through_the_command_line(tmp_path, output):
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "../../etc", "--output", str(output))
    assert_one_line_error(result, "run name '../../etc'")
    assert not output.exists() and not (tmp_path.parent / "etc").exists()


def test_output_root_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = load_config("configs/smoke.yaml", [f"output={blocker / 'runs'}"])
    with pytest.raises(PipelineError, match=r"output root .*file/runs cannot be created"):
        plan_round(config, "r", 1)


def test_output_root_on_a_filesystem_that_takes_no_directories(output):
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "r", "--output", "/proc/forbidden")
    assert_one_line_error(result, "output root /proc/forbidden cannot be created")


def test_prompt_file_that_is_not_utf8(tmp_path, output):
    prompts = tmp_path / "latin1.jsonl"
    prompts.write_bytes((json.dumps(good_row("a")) + "\n").encode() + '{"prompt_id": "caf\xe9"}\n'.encode("latin-1"))
    config = load_config("configs/smoke.yaml", [f"prompts.train={prompts}", f"output={output}"])
    with pytest.raises(PipelineError, match=r"latin1.jsonl: line 2 is not UTF-8 text \(byte 19"):
        plan_round(config, "r", 1)
    assert_no_run_dir(output)


@pytest.mark.parametrize("constraints, message", [
    ([{"kind": "bogus_kind"}], "unknown constraint kind 'bogus_kind'"),
    ([{"kind": "max_words"}], "constraint 'max_words' lacks its argument 'limit'"),
    ([], "it has no constraints to check"),
    (["max_words"], "a constraint must be a mapping"),
])
def test_prompt_the_reward_cannot_score_is_refused_before_anything_runs(tmp_path, output, tiny_model,
                                                                          constraints, message):
    rows = [good_row("a"), {**good_row("b"), "constraints": constraints}]
    prompts = write_prompts(tmp_path / "prompts.jsonl", rows)
    config = load_config("configs/smoke.yaml", [f"prompts.train={prompts}", "prompts.per_round=2",
                                                f"output={output}"])
    with pytest.raises(PipelineError, match=rf"prompts.jsonl: prompt_id 'b' cannot be scored by reward 'ifeval': "
                                            rf"{message}"):
        plan_round(config, "r", 1)
    assert_no_run_dir(output)


def test_a_classifier_reward_needs_no_constraints(tmp_path, output, tiny_model):
    from pipeline.driver import check_metadata
    from core.prompts import Prompt

    config = load_config("configs/smoke.yaml", ["reward.name=composite", "reward.composite.components=ifeval:1.0"])
    bad = [Prompt("b", [{"role": "user", "content": "hi"}], {"constraints": [{"kind": "bogus_kind"}]})]
    with pytest.raises(PipelineError, match="bogus_kind"):
        check_metadata(config, [("f.jsonl", bad)])
    classifier = load_config("configs/smoke.yaml", ["reward.name=hf_classifier", "reward.model=/some/model"])
    check_metadata(classifier, [("f.jsonl", bad)])  # reads no metadata: nothing to refuse


def test_infeasible_resource_request_stops_before_any_stage(output, tiny_model):
    import os
    import subprocess
    import sys
    import time

    import psutil

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    too_many = f"train.num_workers={(os.cpu_count() or 1) + 2}"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "round", "1", "--config", "configs/smoke.yaml",
                                "--run", "r", "--output", str(output), too_many],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    family = set()
    while process.poll() is None:  # the Ray processes the command starts, to check none outlives it
        try:
            family.update(psutil.Process(process.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.1)
    stderr = process.stderr.read()
    # Ray prints its own start-up lines before the check can run; the error is the last line, alone.
    assert process.returncode == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: config key 'train.num_workers'") and "lower it or add nodes" in last
    assert_no_run_dir(output)
    assert not (output / "r" / "config.yaml").exists()
    assert not survivors(family)

def finished_round_with_a_damaged_policy(output: Path, run: str) -> Path:
    """Round 1 of `run` as its done markers record it, with a policy file cut short since."""
    from core.layout import STAGE_OUTPUTS, STAGES

    round_dir = output / run / "round_001"
    for stage in STAGES:
        files = {"model.safetensors": {"bytes": 1000}} if stage == "train" else {}
        (round_dir / "_done").mkdir(parents=True, exist_ok=True)
        (round_dir / "_done" / stage).write_text(json.dumps({"wall_seconds": 1.0, "files": files}))
    (round_dir / STAGE_OUTPUTS["train"]).mkdir(parents=True)
    (round_dir / STAGE_OUTPUTS["train"] / "model.safetensors").write_bytes(b"x" * 400)
    (output / run / ".lock").touch()  # left by round 1's command, as every run has one
    return round_dir


def test_a_refused_round_writes_nothing_and_names_the_command_that_works(output):
    damaged = finished_round_with_a_damaged_policy(output, "r")
    before = sorted(p.relative_to(output) for p in output.rglob("*"))
    result = run_cli("round", "2", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output),
                     "train.beta=0.2")
    line = assert_one_line_error(result, str(damaged / "policy" / "model.safetensors"), "400 bytes",
                                 str(damaged / "_done" / "train"))
    # The command that will work: round 1 again with the same options, then this one.
    assert (f"run `larpo round 1 --config configs/smoke.yaml --run r --output {output} train.beta=0.2`, "
            "then this command") in line
    assert sorted(p.relative_to(output) for p in output.rglob("*")) == before
    assert not (output / "r" / "round_002").exists()


def test_prompts_dropped_for_length_are_named_in_the_log(tmp_path, output, tiny_model, monkeypatch):
    from pipeline import driver

    long_text = "Describe the sea. " * 400
    prompts = write_prompts(tmp_path / "prompts.jsonl", [good_row("short"), good_row("too-long", long_text)])
    config = load_config("configs/smoke.yaml", [f"prompts.train={prompts}", "prompts.too_long=drop",
                                                "prompts.eval_size=0", f"output={output}"])
    plan = plan_round(config, "r", 1)

    def no_ray():
        raise RuntimeError("stopped before Ray: the drop is logged when the round starts")

    monkeypatch.setattr(driver, "ensure_ray", no_ray)
    with pytest.raises(RuntimeError, match="stopped before Ray"):
        driver.run_round(plan)
    log = (output / "r" / "pipeline.log").read_text()
    assert "round 1: 1 of 2 prompts dropped: longer than fits with room for the answer " \
           "(prompts.too_long=drop): too-long" in log


def test_inspect_names_the_prompts_dropped_for_length(tmp_path):
    from pipeline.inspect_round import too_long_lines
    from core.layout import RoundLayout

    layout = RoundLayout(tmp_path / "round_001", 1)
    assert too_long_lines(layout) == []
    layout.done_marker("generate").parent.mkdir(parents=True)
    layout.done_marker("generate").write_text(json.dumps({"too_long_dropped": 7,
                                                          "too_long_dropped_ids": ["a", "b", "c", "d", "e"]}))
    assert too_long_lines(layout) == ["  too long         7 prompts dropped before generation: a, b, c, d, e "
                                      "and 2 more"]


@pytest.mark.parametrize("text, line", [("seed: 0\n\tname: x\n", "line 2"), ("seed: [1\n", "line 2")])
def test_a_run_config_edited_into_invalid_yaml_is_one_line(output, text, line):
    stored = output / "r" / "config.yaml"
    stored.parent.mkdir(parents=True)
    stored.write_text(text)
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "r", "--output", str(output))
    assert_one_line_error(result, str(stored), "not valid YAML", line)
    assert_no_run_dir(output)
