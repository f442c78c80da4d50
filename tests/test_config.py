"""core/config.py (and config_parse.py): YAML + overrides into a validated, typed Config."""

import re
from pathlib import Path

import pytest

from core.config import Config, config_from_dict
from core.errors import ConfigError, PipelineError
from pipeline.settings import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path, overrides=()) -> str:
    """Load, expect a ConfigError, check it is one line and return its message."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message, "a ConfigError needs a message"
    assert "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --- loading -----------------------------------------------------------------

def test_defaults_when_path_is_none():
    config = load_config(None)
    # The defaults' relative paths are the project's.
    assert config.output == str(REPO_ROOT / "runs")
    assert config.prompts.train == str(REPO_ROOT / Config().prompts.train)
    config.output, config.prompts.train, config.prompts.heldout = (Config().output, Config().prompts.train,
                                                                   Config().prompts.heldout)
    assert config == Config()
    assert config.train.beta == 0.1
    assert config.generate.num_samples == 4
    assert config.prompts.too_long == "drop"
    assert config.model.name == "embedded:smollm2-135m-instruct"


def test_default_yaml_loads():
    config = load_config(REPO_ROOT / "configs" / "default.yaml")
    assert config.model.name == "embedded:smollm2-135m-instruct"
    assert config.train.learning_rate == pytest.approx(5.0e-5)
    assert isinstance(config.train.learning_rate, float)
    assert config.train.objective == "contrastive"
    assert config.reward.name == "ifeval_graded"
    assert config.prompts.per_round == 128 and config.prompts.eval_size == 192
    assert config.generate.num_samples == 8
    assert (config.lists.strategy, config.lists.num_positives, config.lists.num_negatives) == ("top_bottom", 1, 3)


def test_smoke_yaml_loads_and_overrides_only_what_it_names():
    config = load_config(str(REPO_ROOT / "configs" / "smoke.yaml"))
    assert config.model.name == "embedded:tiny-random-llama"
    assert config.model.max_model_len == 1024
    assert config.prompts.per_round == 12
    assert config.train.batch_size == 4 and config.train.micro_batch_size == 4
    # keys the file does not name keep their defaults
    assert config.train.max_list_size == Config().train.max_list_size
    assert config.generate.top_p == 1.0


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == load_config(None)


def test_relative_paths_are_read_from_the_config_files_directory(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    path = write(tmp_path / "mine", "output: out\nprompts:\n  train: p/train.jsonl\n  heldout: hf:org/set\n")
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.output == str(tmp_path / "mine" / "out")
    assert config.prompts.train == str(tmp_path / "mine" / "p" / "train.jsonl")
    assert config.prompts.heldout == "hf:org/set"  # not a path
    # Keys the file does not name are the project's defaults; an override's path is read from here.
    assert config.model.name == "embedded:smollm2-135m-instruct"
    monkeypatch.chdir(tmp_path)
    assert load_config(path, ["output=elsewhere"]).output == str(tmp_path / "elsewhere")


def test_the_bundled_configs_name_the_projects_files_from_anywhere(monkeypatch, tmp_path):
    from core.config import DEFAULT_CONFIG, same_setting

    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT_CONFIG)
    assert config.prompts.train == str(REPO_ROOT / "data" / "prompts" / "train_multi.jsonl")
    assert Path(config.prompts.train).is_file() and config.output == str(REPO_ROOT / "runs")
    # A run made before paths were resolved stored them relative to the project: the same setting.
    assert same_setting("prompts.train", "data/prompts/train_multi.jsonl", config.prompts.train)
    assert not same_setting("prompts.train", "data/prompts/train.jsonl", config.prompts.train)
    assert not same_setting("train.beta", 0.1, 0.2)
    # A run's config.yaml names the project's files relative to it: it reads the same from another
    # checkout (or a `ray job submit` working directory), where the absolute paths differ.
    from core.config import portable_dict

    stored = portable_dict(config)
    assert stored["prompts"]["train"] == "data/prompts/train_multi.jsonl" and stored["output"] == "runs"
    assert same_setting("prompts.train", stored["prompts"]["train"], config.prompts.train)
    assert same_setting("prompts.train", "/elsewhere/data.jsonl", "/elsewhere/data.jsonl")


def test_partial_section_keeps_other_defaults(tmp_path):
    config = load_config(write(tmp_path, "train:\n  beta: 0.5\n"))
    assert config.train.beta == 0.5
    assert config.train.epochs == Config().train.epochs
    assert config.generate == Config().generate


def test_yaml_scientific_notation_float(tmp_path):
    # `1e-5` is how learning rates are written; the config's own default is `1e-6`.
    config = load_config(write(tmp_path, "train:\n  learning_rate: 1e-5\n"))
    assert config.train.learning_rate == pytest.approx(1e-5)


# --- unknown keys --------------------------------------------------------------

def test_unknown_top_level_key_in_yaml(tmp_path):
    path = write(tmp_path, "sede: 1\n")
    message = config_error(path)
    assert "'sede'" in message
    assert "'seed'" in message  # the close match
    assert str(path) in message


def test_unknown_nested_key_in_yaml_names_dotted_key_and_close_match(tmp_path):
    message = config_error(write(tmp_path, "train:\n  betta: 0.2\n"))
    assert "'train.betta'" in message
    assert "did you mean 'train.beta'" in message


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    message = config_error(write(tmp_path, "train:\n  zzzzqqqq: 1\n"))
    assert "'train.zzzzqqqq'" in message
    assert "did you mean" not in message


def test_unknown_override_key():
    message = config_error(None, ["train.betta=0.2"])
    assert "'train.betta'" in message
    assert "'train.beta'" in message
    assert "command line" in message


def test_override_naming_a_section_is_rejected():
    message = config_error(None, ["train=5"])
    assert "'train'" in message


# --- types ---------------------------------------------------------------------

def test_string_for_float_in_yaml(tmp_path):
    message = config_error(write(tmp_path, "train:\n  beta: high\n"))
    assert "'train.beta'" in message
    assert "float" in message
    assert "'high'" in message


def test_string_for_float_override():
    message = config_error(None, ["train.beta=abc"])
    assert "'train.beta'" in message and "float" in message


@pytest.mark.parametrize("key", ["train.epochs", "seed", "generate.num_samples"])
def test_true_for_int_is_rejected(tmp_path, key):
    section, _, leaf = key.rpartition(".")
    text = f"{section}:\n  {leaf}: true\n" if section else f"{leaf}: true\n"
    message = config_error(write(tmp_path, text))
    assert f"'{key}'" in message and "int" in message
    message = config_error(None, [f"{key}=true"])
    assert f"'{key}'" in message and "int" in message


@pytest.mark.parametrize("key", ["train.beta", "generate.temperature"])
def test_true_for_float_is_rejected(key):
    message = config_error(None, [f"{key}=true"])
    assert f"'{key}'" in message and "float" in message


def test_float_for_int_is_rejected():
    message = config_error(None, ["train.epochs=1.5"])
    assert "'train.epochs'" in message and "int" in message


def test_int_for_bool_is_rejected():
    message = config_error(None, ["model.trust_remote_code=1"])
    assert "'model.trust_remote_code'" in message and "bool" in message


def test_mapping_where_scalar_expected(tmp_path):
    message = config_error(write(tmp_path, "train:\n  beta:\n    value: 0.1\n"))
    assert "'train.beta'" in message
    message = config_error(write(tmp_path, "seed: {a: 1}\n"))
    assert "'seed'" in message


def test_list_where_scalar_expected_override():
    message = config_error(None, ["train.beta=[0.1, 0.2]"])
    assert "'train.beta'" in message


def test_scalar_where_section_expected(tmp_path):
    message = config_error(write(tmp_path, "train: 5\n"))
    assert "'train'" in message
    assert "mapping" in message


def test_literal_choice_override():
    message = config_error(None, ["prompts.too_long=maybe"])
    assert "'prompts.too_long'" in message
    assert "drop" in message and "error" in message
    assert "'maybe'" in message


def test_literal_choice_yaml(tmp_path):
    message = config_error(write(tmp_path, "generate:\n  dtype: float64\n"))
    assert "'generate.dtype'" in message and "bfloat16" in message


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_bad_duplicates_choice_names_the_key(tmp_path, where):
    message = (config_error(None, ["prompts.duplicates=maybe"]) if where == "override"
               else config_error(write(tmp_path, "prompts:\n  duplicates: maybe\n")))
    assert "'prompts.duplicates'" in message and "error" in message and "drop" in message and "'maybe'" in message


def test_prompt_options_defaults_keep_todays_behaviour():
    config = load_config(None)
    assert config.prompts.metadata_fields is None and config.prompts.duplicates == "error"
    assert load_config(None, ["prompts.duplicates=drop"]).prompts.duplicates == "drop"


@pytest.mark.parametrize("override, expected", [
    ("prompts.metadata_fields=constraints", ["constraints"]),
    ("prompts.metadata_fields=constraints, source", ["constraints", "source"]),
    ("prompts.metadata_fields=[constraints, '1']", ["constraints", "1"]),
    ("prompts.metadata_fields=1,true", ["1", "true"]),
    ("prompts.metadata_fields=[]", []),
    ("prompts.metadata_fields=", []),
    ("prompts.metadata_fields=null", None),
])
def test_metadata_fields_override(override, expected):
    assert load_config(None, [override]).prompts.metadata_fields == expected


@pytest.mark.parametrize("text, expected", [
    ("metadata_fields: [constraints]", ["constraints"]),
    ("metadata_fields: []", []),
    ("metadata_fields: null", None),
])
def test_metadata_fields_yaml_and_round_trip(tmp_path, text, expected):
    import yaml

    config = load_config(write(tmp_path, f"prompts:\n  {text}\n"))
    assert config.prompts.metadata_fields == expected
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize("text, fragment", [
    ("metadata_fields: 5", "must be a list"),
    ("metadata_fields: constraints", None),  # a bare name is a one-item list, as on the command line
    ("metadata_fields: [1]", "'prompts.metadata_fields[0]'"),
    ("metadata_fields: {a: 1}", "must be a list"),
    ("metadata_fields: [a, a]", "repeats"),
    ("metadata_fields: ['']", "empty"),
    ("metadata_fields: [prompt_id]", "'prompt_id'"),
    ("messages_field: instruction\n  metadata_fields: [instruction]", "'instruction'"),
])
def test_bad_metadata_fields_name_the_key(tmp_path, text, fragment):
    path = write(tmp_path, f"prompts:\n  {text}\n")
    if fragment is None:
        assert load_config(path).prompts.metadata_fields == ["constraints"]
        return
    message = config_error(path)
    assert "prompts.metadata_fields" in message and fragment in message


def test_run_identity_has_duplicates_but_not_metadata_fields():
    from core.config import RUN_IDENTITY_KEYS

    assert "prompts.duplicates" in RUN_IDENTITY_KEYS
    assert "prompts.metadata_fields" not in RUN_IDENTITY_KEYS


def test_literal_choices_accepted():
    config = load_config(None, ["prompts.too_long=error", "reference.policy=initial", "train.dtype=bfloat16"])
    assert config.prompts.too_long == "error"
    assert config.reference.policy == "initial"
    assert config.train.dtype == "bfloat16"


# --- ranges --------------------------------------------------------------------

def test_num_samples_must_be_at_least_two():
    message = config_error(None, ["generate.num_samples=1"])
    assert "'generate.num_samples'" in message and "at least 2" in message
    assert load_config(None, ["generate.num_samples=2"]).generate.num_samples == 2


def test_micro_batch_size_must_divide_batch_size():
    message = config_error(None, ["train.batch_size=8", "train.micro_batch_size=3"])
    assert "train.micro_batch_size" in message and "train.batch_size" in message
    assert "3" in message and "8" in message
    config = load_config(None, ["train.batch_size=9", "train.micro_batch_size=3"])
    assert (config.train.batch_size, config.train.micro_batch_size) == (9, 3)


def test_zero_micro_batch_size_is_a_config_error_not_zero_division():
    message = config_error(None, ["train.micro_batch_size=0"])
    assert "'train.micro_batch_size'" in message


@pytest.mark.parametrize("override, key", [
    ("generate.top_p=0", "generate.top_p"),
    ("generate.top_p=1.5", "generate.top_p"),
    ("train.beta=0", "train.beta"),
    ("train.warmup_ratio=1", "train.warmup_ratio"),
    ("model.max_model_len=-1", "model.max_model_len"),
])
def test_range_checks(override, key):
    assert f"'{key}'" in config_error(None, [override])


def test_range_checked_in_yaml_too(tmp_path):
    message = config_error(write(tmp_path, "generate:\n  num_samples: 1\n"))
    assert "'generate.num_samples'" in message


# --- files ---------------------------------------------------------------------

def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "does not exist" in message


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "train:\n  beta: [0.1, 0.2\n  epochs: 1\n")
    message = config_error(path)
    assert str(path) in message and "YAML" in message


def test_yaml_top_level_list(tmp_path):
    path = write(tmp_path, "- seed: 1\n- output: x\n")
    message = config_error(path)
    assert str(path) in message and "list" in message


def test_config_error_is_a_pipeline_error():
    with pytest.raises(PipelineError):
        load_config(None, ["nope=1"])


# --- override parsing -----------------------------------------------------------

def test_override_float():
    config = load_config(None, ["train.beta=0.2"])
    assert config.train.beta == 0.2 and type(config.train.beta) is float


def test_override_int():
    config = load_config(None, ["train.epochs=2"])
    assert config.train.epochs == 2 and type(config.train.epochs) is int


def test_override_int_accepted_for_float():
    config = load_config(None, ["train.beta=1"])
    assert config.train.beta == 1.0 and type(config.train.beta) is float


def test_override_scientific_notation_float():
    # Learning rates are written like this; the config's own default is `1e-6`.
    config = load_config(None, ["train.learning_rate=1e-5"])
    assert config.train.learning_rate == pytest.approx(1e-5)


def test_override_string_that_looks_like_a_number_stays_a_string():
    config = load_config(None, ["model.name=123"])
    assert config.model.name == "123"
    assert load_config(None, ["model.name=true"]).model.name == "true"
    assert load_config(None, ["output=null"]).output == str(Path.cwd() / "null")


def test_override_value_may_contain_equals_and_spaces():
    config = load_config(None, ["model.name=a=b", " train.beta = 0.3"])
    assert config.model.name == "a=b"
    assert config.train.beta == 0.3


def test_override_bool():
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True
    assert load_config(None, ["generate.enforce_eager=false"]).generate.enforce_eager is False


def test_later_override_wins_and_overrides_beat_yaml(tmp_path):
    path = write(tmp_path, "train:\n  beta: 0.5\n")
    config = load_config(path, ["train.beta=0.2", "train.beta=0.3"])
    assert config.train.beta == 0.3


@pytest.mark.parametrize("item", ["train.beta", "=0.2", "", "   "])
def test_override_without_key_or_equals(item):
    message = config_error(None, [item])
    assert "key=value" in message


# --- registries ------------------------------------------------------------------

def test_unknown_objective():
    message = config_error(None, ["train.objective=ranknet"])
    assert "'train.objective'" in message
    assert "'ranknet'" in message
    assert "dpo" in message and "listmle" in message


@pytest.mark.parametrize("name", ["dpo", "contrastive", "lambdarank", "listmle"])
def test_contract_objectives_accepted(name):
    assert load_config(None, [f"train.objective={name}"]).train.objective == name


def test_unknown_reward():
    message = config_error(None, ["reward.name=gpt4-judge"])
    assert "'reward.name'" in message and "ifeval" in message


# --- round trip ------------------------------------------------------------------

def test_config_from_dict_round_trips():
    config = load_config(REPO_ROOT / "configs" / "smoke.yaml",
                         ["train.beta=0.25", "prompts.too_long=error", "model.name=123"])
    rebuilt = config_from_dict(config.to_dict())
    assert rebuilt == config
    assert type(rebuilt.train.beta) is float
    assert rebuilt.to_dict() == config.to_dict()


def test_config_from_dict_after_yaml_dump_round_trips():
    # What the run directory stores (driver: yaml.safe_dump of to_dict()).
    import yaml

    config = load_config(None, ["train.learning_rate=0.0001", "generate.temperature=1"])
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    assert config_from_dict(yaml.safe_load(text)) == config


def test_config_from_dict_validates():
    raw = Config().to_dict()
    raw["train"]["betta"] = 0.1
    with pytest.raises(ConfigError, match="train.betta"):
        config_from_dict(raw)
    raw = Config().to_dict()
    raw["generate"]["num_samples"] = 1
    with pytest.raises(ConfigError, match="generate.num_samples"):
        config_from_dict(raw)


@pytest.mark.parametrize("value, hint, expected", [
    ([0.6, 1], list[float], [0.6, 1.0]),
    ("0.6,1.0", list[float], [0.6, 1.0]),
    ({"ifeval": 1, "hf_classifier": 0.5}, dict[str, float], {"ifeval": 1.0, "hf_classifier": 0.5}),
    ("ifeval:1, hf_classifier:0.5", dict[str, float], {"ifeval": 1.0, "hf_classifier": 0.5}),
])
def test_list_and_mapping_values(value, hint, expected):
    from core.config_parse import coerce

    assert coerce(value, hint, "section.key", "test") == expected


@pytest.mark.parametrize("value, hint, message", [
    ("a", list[float], "'section.key[0]' (test) must be float"),
    (3, list[float], "'section.key' (test) must be a list"),
    ({"a": "x"}, dict[str, float], "'section.key.a' (test) must be float"),
    ("a=1", dict[str, float], "must look like name:value"),
    ([1.0], dict[str, float], "'section.key' (test) must be a mapping"),
])
def test_bad_list_and_mapping_values_name_the_key(value, hint, message):
    from core.config_parse import coerce

    with pytest.raises(ConfigError, match=re.escape(message)):
        coerce(value, hint, "section.key", "test")


def test_worker_retries_default_and_range():
    assert load_config(None).worker_retries == 2
    assert load_config(None, ["worker_retries=0"]).worker_retries == 0
    with pytest.raises(ConfigError, match="'worker_retries' must be zero \\(no retry\\) or more"):
        load_config(None, ["worker_retries=-1"])


# --- field metadata ------------------------------------------------------------------

def test_every_knob_is_documented():
    import dataclasses

    from core.config_parse import leaf_fields

    sections = [(f.name, f) for f in dataclasses.fields(Config)]
    for key, f in [*leaf_fields(Config), *sections]:
        assert f.metadata.get("help"), f"config key '{key}' has no help text"


def test_run_identity_keys_come_from_the_fields():
    from core.config import RUN_IDENTITY_KEYS

    assert len(RUN_IDENTITY_KEYS) == len(set(RUN_IDENTITY_KEYS))
    assert set(RUN_IDENTITY_KEYS) == {
        "seed", "model.name", "prompts.train", "prompts.heldout", "prompts.messages_field", "prompts.per_round",
        "prompts.duplicates", "reward.name", "reference.policy", "train.replay", "reward.model",
        "reward.composite.components", "reward.composite.length_penalty", "evaluate.temperature", "evaluate.max_tokens",
        "reward.judge.mode", "reward.judge.model"}


@pytest.mark.parametrize("override, message", [
    ("worker_retries=-1", "config key 'worker_retries' must be zero (no retry) or more; got -1"),
    ("tracking=wandb,wandb", "config key 'tracking' must be a list of tensorboard, mlflow, wandb, without repeats; "
                             "got ['wandb', 'wandb']"),
    ("generate.temperatures=0.6,0.6", "config key 'generate.temperatures' must be from 0 to 2 each (vLLM's range), "
                                      "without repeats; got [0.6, 0.6]"),
    ("generate.top_p=0", "config key 'generate.top_p' must be in (0, 1]; got 0.0"),
    # Refused as numbers before any range is asked (config_parse.finite).
    ("reward.composite.components=ifeval:.nan", "config key 'reward.composite.components.ifeval' (command line) "
                                                "must be a finite number; got nan"),
    ("lists.min_margin=.inf", "config key 'lists.min_margin' (command line) must be a finite number; got inf"),
    ("train.checkpoint_every=-1", "config key 'train.checkpoint_every' must be zero (never) or more; got -1"),
    ("train.lora_dropout=1", "config key 'train.lora_dropout' must be in [0, 1); got 1.0"),
    ("evaluate.max_tokens=0", "config key 'evaluate.max_tokens' must be positive; got 0"),
])
def test_range_messages_from_field_metadata(override, message):
    assert config_error(None, [override]) == message


def test_train_fingerprint_leaves_out_the_same_knobs_and_hash(tmp_path):
    from core.config import TRAIN_FINGERPRINT_EXCLUDED
    from stages.train.checkpoint import fingerprint

    assert TRAIN_FINGERPRINT_EXCLUDED == {"checkpoint_every", "num_workers", "sharding"}
    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes(b"x" * 1000)
    train = {"objective": "lambdarank", "beta": 0.1, "learning_rate": 1e-06, "lambdarank_ndcg": True,
             "checkpoint_every": 50, "num_workers": 1, "sharding": "none"}
    cfg = {"train": train, "seed": 3, "policy_in": "round_001/policy", "train_shard": str(shard)}
    # The value the deny-list version of fingerprint() gave for these inputs: resumable checkpoints stay so.
    assert fingerprint(cfg, 12) == "7a8ed52ae16115da"
    moved = dict(train, checkpoint_every=0, num_workers=8, sharding="fsdp")
    assert fingerprint(dict(cfg, train=moved), 12) == "7a8ed52ae16115da"
    assert fingerprint(dict(cfg, train=dict(train, beta=0.2)), 12) != "7a8ed52ae16115da"


# --- objective-specific options ----------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["train.lambdarank.ndcg=true"],
     "config key 'train.lambdarank.ndcg' has no effect with train.objective=contrastive (read by: lambdarank)"),
    (["train.objective=dpo", "train.simpo.gamma=1.0"],
     "config key 'train.simpo.gamma' has no effect with train.objective=dpo (read by: simpo)"),
])
def test_option_of_another_objective_is_an_error(overrides, message):
    assert config_error(None, overrides) == message


def test_objective_options_for_the_chosen_objective_load():
    assert load_config(None, ["train.objective=lambdarank", "train.lambdarank.ndcg=true"]).train.lambdarank.ndcg
    assert load_config(None, ["train.objective=simpo", "train.simpo.gamma=1.0"]).train.simpo.gamma == 1.0
    # At their defaults they may be written for any objective; beta is common to all.
    load_config(None, ["train.objective=dpo", "train.simpo.gamma=0.5", "train.lambdarank.ndcg=false",
                       "train.beta=0.3"])


@pytest.mark.parametrize("override", ["train.beta=inf", "train.learning_rate=nan", "train.beta=-.inf",
                                      "lists.min_margin=1e400"])
def test_infinite_or_nan_numbers_are_refused_at_load_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(PipelineError, match=rf"config key '{re.escape(key)}' \(command line\) must be a finite number"):
        load_config(REPO_ROOT / "configs" / "default.yaml", [override])


def test_an_infinite_number_in_a_yaml_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  beta: .inf\n")
    with pytest.raises(PipelineError, match=rf"'train.beta' \({re.escape(str(path))}\) must be a finite number"):
        load_config(path)


# --- plugin options, nested per plugin -----------------------------------------------

def test_plugin_sections_load_from_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "train:\n  objective: simpo\n  simpo:\n    gamma: 0.3\n"
                           "reward:\n  name: composite\n  composite:\n    components: {ifeval: 2.0}\n"
                           "    length_penalty: 0.1\n")
    config = load_config(path)
    assert config.train.simpo.gamma == 0.3
    assert (config.reward.composite.components, config.reward.composite.length_penalty) == ({"ifeval": 2.0}, 0.1)
    assert load_config(path, ["train.simpo.gamma=0.7"]).train.simpo.gamma == 0.7
    assert load_config(None, ["train.objective=lambdarank", "train.lambdarank.ndcg=true"]).train.lambdarank.ndcg


def test_plugin_sections_round_trip_through_a_runs_config():
    from core.config import portable_dict

    config = load_config(None, ["train.objective=simpo", "train.simpo.gamma=0.25", "reward.name=composite",
                                "reward.composite.components=ifeval:1.0"])
    raw = portable_dict(config)
    assert raw["train"]["simpo"] == {"gamma": 0.25} and raw["train"]["lambdarank"] == {"ndcg": False}
    assert raw["reward"]["composite"] == {"components": {"ifeval": 1.0}, "length_penalty": 0.0}
    stored = config_from_dict(raw)
    assert (stored.train, stored.reward) == (config.train, config.reward)


def test_plugin_sections_are_listed_key_by_key():
    from pipeline.plan_view import describe_keys

    keys = {line.split(" = ")[0] for line in describe_keys() if not line.startswith(" ")}
    assert {"train.simpo.gamma", "train.lambdarank.ndcg", "reward.composite.components",
            "reward.composite.length_penalty"} <= keys
    assert not keys & {"train.simpo", "train.simpo_gamma", "reward.components"}


@pytest.mark.parametrize("old, new, value", [
    ("train.simpo_gamma", "train.simpo.gamma", "0.3"),
    ("train.lambdarank_ndcg", "train.lambdarank.ndcg", "true"),
    ("reward.components", "reward.composite.components", "{ifeval: 1.0}"),
    ("reward.length_penalty", "reward.composite.length_penalty", "0.1"),
])
def test_a_moved_key_is_refused_with_its_new_name(tmp_path, old, new, value):
    hint = f"config key '{old}' is now '{new}'"
    assert config_error(None, [f"{old}={value}"]) == f"{hint} (command line)"
    section, leaf = old.split(".")
    path = write(tmp_path, f"{section}:\n  {leaf}: {value}\n")
    assert config_error(path) == f"{hint} ({path})"
    with pytest.raises(ConfigError, match=re.escape(hint)):
        config_from_dict({section: {leaf: value}}, source="runs/old/config.yaml")


def test_a_plugin_section_must_be_a_mapping(tmp_path):
    assert config_error(write(tmp_path, "train:\n  simpo: 0.3\n")).startswith(
        "config key 'train.simpo' (")
    assert "unknown config key 'train.simpo'" in config_error(None, ["train.simpo=0.3"])


def test_composite_options_with_another_reward_are_an_error():
    assert config_error(None, ["reward.composite.components=ifeval:1.0"]) == (
        "config key 'reward.composite.components' has no effect with reward.name=ifeval (read by: composite)")
    assert config_error(None, ["reward.composite.length_penalty=0.1"]) == (
        "config key 'reward.composite.length_penalty' has no effect with reward.name=ifeval (read by: composite)")
    load_config(None, ["reward.composite.length_penalty=0"])  # at its default it may be written for any reward


def test_train_fingerprint_reads_an_objectives_section(tmp_path):
    from stages.train.checkpoint import fingerprint

    shard = tmp_path / "part-00000.parquet"
    shard.write_bytes(b"x" * 1000)
    train = Config().to_dict()["train"]
    cfg = {"train": train, "seed": 3, "policy_in": "round_001/policy", "train_shard": str(shard)}
    changed = {**train, "simpo": {"gamma": 0.9}}
    assert fingerprint(cfg, 12) != fingerprint(dict(cfg, train=changed), 12)
    assert fingerprint(cfg, 12) == fingerprint(dict(cfg, train={**train, "num_workers": 4}), 12)
