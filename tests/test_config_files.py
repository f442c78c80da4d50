"""Config files that cannot be read, and values vLLM would refuse: one ConfigError line at load."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from core.config import MAX_SEED, VLLM_GREEDY_BELOW, VLLM_MAX_N, VLLM_MAX_TEMPERATURE, config_from_dict, portable_dict, read_yaml_file
from core.errors import ConfigError
from pipeline.cli import main
from pipeline.settings import load_config
from tests.conftest import REPO_ROOT


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def one_line_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message and "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --- reading a config file -------------------------------------------------------------

def test_a_tab_indent_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path / "tab.yaml", "seed: 0\ngenerate:\n\tnum_samples: 4\n")
    assert one_line_error(path) == (f"config file {path} is not valid YAML: line 3, column 1: found character "
                                    "'\\t' that cannot start any token")


def test_an_unclosed_bracket_names_where_it_was_opened(tmp_path):
    path = write(tmp_path / "open.yaml", "generate:\n  num_samples: 4\nseed: [1\n")
    message = one_line_error(path)
    assert message.startswith(f"config file {path} is not valid YAML: line 4, column 1: expected ',' or ']'")
    assert "opened at line 3, column 7" in message


@pytest.mark.parametrize("content, kind", [
    ("- seed: 1\n- output: x\n", "a list"),
    ("just some words\n", "a plain string"),
    ("42\n", "a number"),
])
def test_a_top_level_that_is_not_a_mapping_is_named(tmp_path, content, kind):
    path = write(tmp_path / "c.yaml", content)
    assert one_line_error(path) == (f"config file {path} holds {kind} at its top level; it must be a mapping of "
                                    "keys (such as `seed: 0`)")


def test_an_empty_file_or_one_of_comments_is_the_defaults(tmp_path):
    assert read_yaml_file(write(tmp_path / "empty.yaml", "")) == {}
    assert read_yaml_file(write(tmp_path / "comments.yaml", "# nothing set\n")) == {}


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "latin1.yaml", "seed: 1\nmodel:\n  name: caf\xe9\n".encode("latin-1"))
    assert one_line_error(path) == f"config file {path}, line 3, column 12: not UTF-8 text (byte b'\\xe9')"


def test_a_control_character_names_the_line_and_column(tmp_path):
    path = write(tmp_path / "nul.yaml", "seed: 1\noutput: a\x00b\n")
    message = one_line_error(path)
    assert message.startswith(f"config file {path} is not valid YAML: line 2, column 10: character #x0000")


def test_an_unreadable_file_is_one_line(tmp_path, monkeypatch):
    # Permissions do not stop root, who runs the tests in containers: the refusal is simulated.
    path = write(tmp_path / "locked.yaml", "seed: 1\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert one_line_error(path) == f"config file {path} cannot be read: Permission denied"


def test_a_directory_is_named_as_one(tmp_path):
    write(tmp_path / "mine.yaml", "seed: 1\n")
    assert one_line_error(tmp_path) == (f"config file {tmp_path} is a directory; give a YAML file such as "
                                        f"{tmp_path / 'mine.yaml'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(empty) == f"config file {empty} is a directory; give a YAML file"


def test_read_yaml_file_reads_a_runs_stored_config_back(tmp_path):
    # What a run's config.yaml holds (pipeline/driver.py writes portable_dict), read as the driver does.
    import yaml

    config = load_config(REPO_ROOT / "configs" / "smoke.yaml", ["train.beta=0.25"])
    stored = write(tmp_path / "config.yaml", yaml.safe_dump(portable_dict(config), sort_keys=False))
    raw = read_yaml_file(stored)
    assert isinstance(raw, dict)
    assert config_from_dict(raw, source=str(stored)).train.beta == 0.25


# --- the command line --------------------------------------------------------------------

# main() configures the `pipeline` logger for a terminal, as the command does: tests/test_cli.py's
# fixture puts it back (autouse here too, being imported).
from tests.test_cli import _restore_logging  # noqa: E402,F401


@pytest.mark.parametrize("argv", [["round", "1", "--dry-run"], ["config"]])
def test_a_directory_as_config_on_the_command_line(capsys, tmp_path, argv, _restore_logging):
    import ray

    code = main([*argv, "--config", str(REPO_ROOT / "configs"), "--output", str(tmp_path / "runs")]
                if argv[0] == "round" else [*argv, "--config", str(REPO_ROOT / "configs")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"error: config file {REPO_ROOT / 'configs'} is a directory; give a YAML file such as "
                   f"{REPO_ROOT / 'configs' / 'default.yaml'}\n")
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_a_bad_yaml_file_on_the_command_line(capsys, tmp_path, _restore_logging):
    path = write(tmp_path / "tab.yaml", "seed: 0\n\tgenerate: {}\n")
    code = main(["config", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: config file {path} is not valid YAML: line 2, column 1: ")


# --- overrides that are not valid YAML -----------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("seed=[1", "override 'seed=[1' is not valid YAML: column 3 of its value: expected ',' or ']', but got "
                "'<stream end>'"),
    ("train.beta={a", "override 'train.beta={a' is not valid YAML: column 3 of its value: expected ',' or '}', "
                      "but got '<stream end>'"),
    ("generate.temperatures=[0.5", "config key 'generate.temperatures' (command line): '[0.5' is not valid YAML "
                                   "(column 5: expected ',' or ']', but got '<stream end>')"),
    ("reward.composite.components=ifeval:[1", "config key 'reward.composite.components.ifeval' (command line): "
                                              "'[1' is not valid YAML (column 3: expected ',' or ']', but got "
                                              "'<stream end>')"),
])
def test_an_override_that_is_not_valid_yaml_is_one_line(override, message):
    assert one_line_error(None, [override]) == message


def test_a_string_knob_still_takes_text_that_is_not_yaml():
    assert load_config(None, ["model.name=@org/model"]).model.name == "@org/model"


# --- floats for int knobs ------------------------------------------------------------------

@pytest.mark.parametrize("override, value", [
    ("generate.num_samples=4.0", 4),
    ("train.epochs=1e1", 10),  # YAML 1.1 reads `1e1` as a string
    ("prompts.eval_size=2.5e1", 25),
])
def test_a_whole_float_for_an_int_knob_becomes_that_int(override, value):
    key = override.partition("=")[0]
    section, leaf = key.split(".")
    got = getattr(getattr(load_config(None, [override]), section), leaf)
    assert got == value and type(got) is int


@pytest.mark.parametrize("override, message", [
    ("generate.num_samples=4.5", "config key 'generate.num_samples' (command line) must be a whole number (int); "
                                 "got 4.5"),
    ("generate.num_samples=1e21", "config key 'generate.num_samples' (command line) must be int; got '1e21', in "
                                  "float notation beyond 2**53, where floats no longer hold every whole number: "
                                  "write it in digits"),
    ("generate.num_samples=1.0e+21", "config key 'generate.num_samples' (command line) must be int; got 1e+21, in "
                                     "float notation beyond 2**53"),
    ("train.epochs=.nan", "config key 'train.epochs' (command line) must be a finite number; got nan"),
    ("train.epochs=true", "config key 'train.epochs' (command line) must be int; got bool True"),
])
def test_a_float_for_an_int_knob_is_refused_unless_exact(override, message):
    assert one_line_error(None, [override]).startswith(message)


def test_a_float_for_an_int_knob_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  epochs: 1.5\n")
    assert one_line_error(path) == f"config key 'train.epochs' ({path}) must be a whole number (int); got 1.5"


# --- values vLLM would refuse --------------------------------------------------------------

NUM_SAMPLES_RANGE = ("config key 'generate.num_samples' must be at least 2 (a list needs a positive and a negative) "
                     "and at most 16384 (vLLM's VLLM_MAX_N_SEQUENCES)")


@pytest.mark.parametrize("value", ["16385", "1000000000000000000000"])
def test_num_samples_over_vllms_limit_is_refused_at_load(value):
    assert one_line_error(None, [f"generate.num_samples={value}"]) == f"{NUM_SAMPLES_RANGE}; got {value}"


def test_num_samples_over_vllms_limit_in_a_file(tmp_path):
    path = write(tmp_path / "c.yaml", "generate:\n  num_samples: 20000\n")
    assert one_line_error(path) == f"{NUM_SAMPLES_RANGE}; got 20000"
    assert load_config(None, ["generate.num_samples=16384"]).generate.num_samples == 16384


@pytest.mark.parametrize("override, message", [
    ("generate.temperature=2.5", "config key 'generate.temperature' must be from 0 to 2 (vLLM's range); got 2.5"),
    ("evaluate.temperature=3", "config key 'evaluate.temperature' must be from 0 to 2 (vLLM's range); got 3.0"),
    ("generate.temperatures=0.5,2.5", "config key 'generate.temperatures' must be from 0 to 2 each (vLLM's range), "
                                      "without repeats; got [0.5, 2.5]"),
    ("generate.top_p=1.01", "config key 'generate.top_p' must be in (0, 1]; got 1.01"),
    ("generate.max_tokens=2048", "config key 'generate.max_tokens' must be less than model.max_model_len (2048), "
                                 "which holds the prompt too; got 2048"),
    ("evaluate.max_tokens=4096", "config key 'evaluate.max_tokens' must be less than model.max_model_len (2048), "
                                 "which holds the prompt too; got 4096"),
    ("seed=-1", "config key 'seed' must be from 0 to 2**31 - 1 (vLLM seeds numpy with it, plus 1000 per round); "
                "got -1"),
    ("seed=2147483648", "config key 'seed' must be from 0 to 2**31 - 1"),
])
def test_values_vllm_refuses_are_refused_at_load(override, message):
    assert one_line_error(None, [override]).startswith(message)


def test_the_edges_vllm_takes_are_taken():
    config = load_config(None, ["generate.temperature=2", "evaluate.temperature=0", "seed=2147483647",
                                "generate.max_tokens=2047", "evaluate.max_tokens=2047"])
    assert (config.generate.temperature, config.seed, config.generate.max_tokens) == (2.0, MAX_SEED, 2047)


@pytest.mark.parametrize("overrides, message", [
    (["generate.temperature=0"], "config key 'generate.temperature' asks temperature 0.0 for 4 samples per prompt, "
                                 "but below 1e-5 vLLM decodes greedily and takes one"),
    (["generate.temperatures=0,1.0"], "config key 'generate.temperatures' asks temperature 0.0 for 2 samples per "
                                      "prompt"),
])
def test_greedy_decoding_of_several_samples_is_refused(overrides, message):
    assert one_line_error(None, overrides).startswith(message)


def test_greedy_decoding_of_one_sample_per_temperature_is_taken():
    config = load_config(None, ["generate.num_samples=4", "generate.temperatures=0,0.6,0.8,1.0"])
    assert config.generate.temperatures == [0.0, 0.6, 0.8, 1.0]


def _vllm_source(module: str) -> str:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vllm is not installed: run `make setup` before the tests")
    return (Path(spec.submodule_search_locations[0]) / module).read_text()


def test_the_limits_are_the_installed_vllms():
    # The constants in core/config.py copy vLLM's; a vLLM upgrade that moves one fails here.
    envs = _vllm_source("envs.py")
    assert re.search(rf'"VLLM_MAX_N_SEQUENCES", "{VLLM_MAX_N}"', envs)
    sampling = _vllm_source("sampling_params.py")
    assert re.search(r"^_SAMPLING_EPS = 1e-5$", sampling, re.M) and VLLM_GREEDY_BELOW == 1e-5
    assert "if self.temperature > 2.0:" in sampling and VLLM_MAX_TEMPERATURE == 2.0
    assert "n must be 1 when using greedy sampling" in sampling
    assert "if not 0.0 < self.top_p <= 1.0:" in sampling
