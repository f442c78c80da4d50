"""Typed configuration: YAML plus `key=value` overrides, validated once at load.

Every knob of a round lives in one of the dataclasses below, with its default
and a comment. `load_config` is the only way in: it rejects unknown keys and
wrong types with a one-line error naming the key, so nothing downstream has to
re-check its inputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


@dataclass
class ModelConfig:
    # `embedded:<name>` (prepared by `make setup`), a local HF checkpoint
    # directory, or a hub id already in the local HF cache.
    name: str = "embedded:smollm2-135m-instruct"
    # Context length given to vLLM; prompt tokens + generate.max_tokens must fit.
    max_model_len: int = 2048
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    # JSONL or Parquet file, a local dataset directory, or `hf:<dataset>[:<split>]`.
    train: str = "data/prompts/train.jsonl"
    heldout: str = "data/prompts/heldout.jsonl"
    # Column holding the chat messages (list of {role, content}), or a column of
    # plain strings (UltraFeedback's `instruction`), each taken as one user message.
    messages_field: str = "messages"
    # M: training prompts drawn per round; each round takes its own slice.
    per_round: int = 64
    # Held-out prompts scored by the evaluate stage (the first N of the file).
    eval_size: int = 64
    # A prompt that does not fit the context with max_tokens of answer:
    # `drop` it (counted in the round's metrics) or stop with an `error`.
    too_long: Literal["drop", "error"] = "drop"
    # The row's other columns that travel with the prompt as `metadata` (into every
    # candidate row, and to the reward: ifeval reads `constraints`). null: all of
    # them; a list: only these ([] none). A listed column absent from a row is
    # absent from its metadata; one that no row of a set has is an error (a typo).
    metadata_fields: list[str] | None = None
    # A prompt_id seen again in a set: stop with an `error` naming both rows, or
    # `drop` the later rows (the first is kept; the count is logged).
    duplicates: Literal["error", "drop"] = "error"


@dataclass
class GenerateConfig:
    # K: responses sampled per prompt.
    num_samples: int = 4
    temperature: float = 0.8
    # Several temperatures in one round: the K samples of each prompt are split
    # into consecutive blocks, one per temperature in this order, as evenly as
    # possible (the first K mod T temperatures take one more), e.g. K=4 and
    # [0.6, 1.0] give samples 0-1 at 0.6 and 2-3 at 1.0. Empty: all at `temperature`.
    temperatures: list[float] = field(default_factory=list)
    top_p: float = 1.0
    max_tokens: int = 128
    # vLLM engines (Ray actors) that share the prompts.
    num_actors: int = 1
    tensor_parallel_size: int = 1
    # auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512_BF16 / AMX);
    # float32 on other CPUs, where bf16 matmuls are emulated and 100x slower.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # KV-cache memory per engine on CPU hosts (vLLM's default asks for 92%).
    cpu_kv_cache_gib: int = 2
    # CUDA graphs / torch.compile cost a minute of start-up and did not speed
    # up decoding on CPU, so CPU engines run eagerly; GPUs may turn it off.
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85


@dataclass
class RewardConfig:
    # A name registered in rewards/ (see `rewards.REWARDS`).
    name: str = "ifeval"
    batch_size: int = 64
    # A reward that is NaN or infinite: stop with an `error` naming the prompt,
    # or `drop` that candidate (counted in the stage's statistics).
    on_invalid: Literal["error", "drop"] = "error"
    # Reward actors that share the candidates, and the GPUs each one holds
    # (0 on CPU hosts; 1 puts one reward model on each GPU).
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    # hf_classifier: the reward model (AutoModelForSequenceClassification with one
    # label, e.g. Skywork-Reward): a local checkpoint directory, `embedded:<name>`,
    # or a hub id already in the local HF cache. Its tokenizer needs a chat template.
    model: str = ""
    # Run the reward model's own code from its checkpoint (off: only transformers' classes).
    trust_remote_code: bool = False
    # auto: bfloat16 on GPUs, float32 on CPUs.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Longest chat (prompt + response) in tokens; a longer one keeps its end,
    # where the classifier reads its score.
    max_length: int = 2048
    # Sequences per forward pass of the reward model. Each batch of batch_size
    # samples is sorted by length and cut into these; halved on out-of-memory.
    micro_batch_size: int = 16
    # composite: the weight of each registered reward, e.g. {ifeval: 1.0, hf_classifier: 0.5}
    # (on the command line: reward.components=ifeval:1.0,hf_classifier:0.5).
    components: dict[str, float] = field(default_factory=dict)
    # composite: subtracted per 100 words of response (whitespace-separated, so the
    # same for every tokenizer); 0.1 costs a 300-word answer 0.3.
    length_penalty: float = 0.0


@dataclass
class ListsConfig:
    # How a prompt's candidates, best-first, become positives and negatives
    # (stages/rerank.py, LIST_STRATEGIES). Every strategy takes the best
    # `num_positives` candidates as positives; the negatives are drawn from the
    # eligible rest (see `ties` and `min_margin`):
    #   top_bottom: the `num_negatives` lowest (contrastive: 1 vs bottom 3 of 4);
    #   top_rest:   all of them;
    #   hardest:    the `num_negatives` highest (the hardest negatives);
    #   random:     `num_negatives` drawn uniformly, seeded by seed, round and prompt.
    strategy: Literal["top_bottom", "top_rest", "hardest", "random"] = "top_rest"
    num_positives: int = 1
    # Ignored by top_rest, which keeps every eligible negative.
    num_negatives: int = 3
    # A candidate whose reward equals the lowest positive's: `drop` never uses it
    # as a negative (a tie is no preference); `allow` may.
    ties: Literal["drop", "allow"] = "drop"
    # A negative must be at least this far below every positive; a prompt left
    # without a negative is dropped and counted.
    min_margin: float = 0.0
    # The candidate pool of a prompt: this round only (`none`), plus the previous
    # round's responses to the same prompt (`previous`), or every earlier
    # round's (`all`). Earlier rewards are reused, not re-scored. It only acts when
    # prompts recur (a small prompt set, or prompts.per_round equal to the set): each
    # round draws new prompts until the set is used up. Earlier rounds' lists: train.replay.
    memory: Literal["none", "previous", "all"] = "none"


@dataclass
class ReferenceConfig:
    # previous: the round's starting policy (LarPO Algorithm 1);
    # initial: the base model (as in RLHFlow).
    policy: Literal["previous", "initial"] = "previous"
    # List items per forward pass, in whole lists (a longer list goes alone).
    batch_size: int = 16


@dataclass
class TrainConfig:
    # A name in stages/train/objectives.py: dpo, contrastive, lambdarank, listmle, ipo, simpo.
    objective: str = "contrastive"
    # Scale of the retriever score s = beta * (log pi - log pi_ref); IPO's tau.
    beta: float = 0.1
    # lambdarank: weight each pair by |delta DCG| of swapping it (LiPO-lambda).
    lambdarank_ndcg: bool = False
    # simpo: target margin between the best and the worst item, in score units.
    simpo_gamma: float = 0.5
    learning_rate: float = 1e-6
    epochs: int = 1
    # Prompts per optimizer step (each brings its whole list).
    batch_size: int = 8
    # Prompts per forward pass; batch_size / micro_batch_size steps are accumulated.
    micro_batch_size: int = 2
    # Longest prompt + response in tokens; longer responses are cut from the end.
    max_length: int = 512
    # The longest list trained on (positives first, then the hardest negatives).
    max_list_size: int = 8
    weight_decay: float = 0.0
    # adamw: torch's AdamW. adamw_bf16: the same update with both moments stored in
    # bf16 (stochastically rounded): half the optimizer memory (stages/train/optim.py).
    optimizer: Literal["adamw", "adamw_bf16"] = "adamw"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # Data-parallel Ray Train workers.
    num_workers: int = 1
    # none: every worker holds the whole model and gradients are summed across workers
    # (CPU or GPU). fsdp: torch FSDP2 shards weights, gradients and optimizer state
    # across the workers (for models that do not fit one GPU; not with LoRA).
    sharding: Literal["none", "fsdp"] = "none"
    # Save model, optimizer, scheduler and data position every N optimizer steps
    # (0: never), so a killed train stage resumes instead of restarting.
    checkpoint_every: int = 50
    # Dtype of the policy's weights (and of the reference log-probs, which must match).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # bf16 autocast of forward passes over fp32 weights (reference stage too):
    # auto = where the hardware has native bf16 (GPUs, AVX512_BF16 / AMX CPUs).
    autocast: Literal["auto", "on", "off"] = "auto"
    # Recompute each layer's activations in backward: about a third more compute,
    # a quarter less peak memory for the 135M model (docs/benchmarks.md).
    gradient_checkpointing: bool = False
    # LoRA adapters (peft) instead of full fine-tuning when lora_rank > 0; they are
    # merged into the saved checkpoint, so vLLM loads it as a plain model.
    # Earlier rounds' lists trained on again beside this round's (LarPO's Algorithm 1 trains
    # iteration s on D_0 ... D_s): `previous` adds round N-1's, `all` rounds 1..N-1's. Their
    # reference log-probs are scored again under this round's reference; one shuffled pass
    # over the union. Not `lists.memory`, which pools earlier answers to the *same prompt*.
    replay: Literal["none", "previous", "all"] = "none"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    # peft's target_modules: "all-linear" or comma-separated module names (q_proj,v_proj).
    lora_target_modules: str = "all-linear"
    # bf16 rounding can erase a round's small update, so checkpoints stay fp32.
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    # Positions per chunk of the vocabulary projection (bounds [chunk, vocab] memory).
    logprob_chunk_size: int = 512
    # Run a list's shared prompt through the model once, its K responses attending to
    # it through a packed attention mask, instead of once per item: the same log-probs
    # for fewer tokens (reference stage too). Needs sdpa or eager attention.
    share_prompt: bool = True


@dataclass
class EvaluateConfig:
    # Decoding of the one answer per held-out prompt (0: greedy). Round 0's
    # answers (the base model, round_000/) are made with these, and a later
    # round with other values is refused: its win rate would compare unlike answers.
    temperature: float = 0.0
    max_tokens: int = 128


@dataclass
class Config:
    seed: int = 0
    # Root of run directories (a local path or a shared mount on clusters).
    output: str = "runs"
    # A worker that dies mid-stage (a generation engine, a reward actor, the reference
    # task, a Ray Train worker: a preempted node, an out-of-memory kill) is replaced this
    # many times per stage, redoing only its unfinished part; then the round stops.
    worker_retries: int = 2
    # A round that asks for more workers or GPUs than the Ray cluster has stops before any
    # stage; on an autoscaling cluster, give it this many seconds to grow first.
    resources_wait_seconds: float = 0.0
    # Experiment trackers that receive every training step and round (README, "Experiment
    # tracking"): any of tensorboard, mlflow, wandb. A tracker that fails never fails a round.
    tracking: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# pipeline/tracking.py's TRACKERS, named here so that loading a config imports no tracker.
TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")

# Keys that define what a run is. Rounds of one run must agree on them;
# everything else (learning rate, K, workers...) may change between rounds.
RUN_IDENTITY_KEYS = ("seed", "model.name", "prompts.train", "prompts.heldout",
                     "prompts.messages_field", "prompts.per_round",
                     # Dropping repeats changes the prompt list, so every round's slice.
                     "prompts.duplicates", "reward.name",
                     "reference.policy", "train.replay",
                     "reward.model", "reward.components", "reward.length_penalty",
                     # Round 0's held-out answers, every win rate's baseline, were made with these.
                     "evaluate.temperature", "evaluate.max_tokens")

# Checked after types: (key, predicate, what it must be).
_RANGE_CHECKS: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("worker_retries", lambda v: v >= 0, "zero (no retry) or more"),
    ("resources_wait_seconds", lambda v: v >= 0, "zero or more"),
    ("tracking", lambda v: set(v) <= set(TRACKER_NAMES) and len(set(v)) == len(v),
     f"a list of {', '.join(TRACKER_NAMES)}, without repeats"),
    ("model.max_model_len", lambda v: v > 0, "positive"),
    ("prompts.per_round", lambda v: v > 0, "positive"),
    ("prompts.eval_size", lambda v: v >= 0, "zero or more"),
    ("prompts.metadata_fields", lambda v: v is None or (all(v) and len(set(v)) == len(v)),
     "null (all columns) or a list of column names, without empty names or repeats"),
    ("generate.num_samples", lambda v: v >= 2, "at least 2 (a list needs a positive and a negative)"),
    ("generate.temperature", lambda v: v >= 0, "zero or more"),
    ("generate.temperatures", lambda v: all(t >= 0 for t in v) and len(set(v)) == len(v),
     "zero or more each, without repeats"),
    ("generate.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("generate.max_tokens", lambda v: v > 0, "positive"),
    ("generate.num_actors", lambda v: v > 0, "positive"),
    ("generate.tensor_parallel_size", lambda v: v > 0, "positive"),
    ("generate.cpu_kv_cache_gib", lambda v: v > 0, "positive"),
    ("generate.gpu_memory_utilization", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("reward.batch_size", lambda v: v > 0, "positive"),
    ("reward.num_actors", lambda v: v > 0, "positive"),
    ("reward.num_gpus_per_actor", lambda v: v >= 0, "zero or more"),
    ("reward.max_length", lambda v: v > 1, "more than 1"),
    ("reward.micro_batch_size", lambda v: v > 0, "positive"),
    ("reward.length_penalty", lambda v: v >= 0, "zero or more"),
    # abs(w) < inf is False for NaN too.
    ("reward.components", lambda v: all(abs(w) < float("inf") for w in v.values()), "finite weights"),
    ("lists.num_positives", lambda v: v > 0, "positive"),
    ("lists.num_negatives", lambda v: v > 0, "positive"),
    ("lists.min_margin", lambda v: v >= 0 and math.isfinite(v), "zero or more"),
    ("reference.batch_size", lambda v: v > 0, "positive"),
    ("train.beta", lambda v: v > 0, "positive"),
    ("train.learning_rate", lambda v: v >= 0, "zero or more"),
    ("train.epochs", lambda v: v > 0, "positive"),
    ("train.batch_size", lambda v: v > 0, "positive"),
    ("train.micro_batch_size", lambda v: v > 0, "positive"),
    ("train.max_length", lambda v: v > 1, "more than 1"),
    ("train.max_list_size", lambda v: v >= 2, "at least 2"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("train.max_grad_norm", lambda v: v > 0, "positive"),
    ("train.num_workers", lambda v: v > 0, "positive"),
    ("train.logprob_chunk_size", lambda v: v > 0, "positive"),
    ("train.checkpoint_every", lambda v: v >= 0, "zero (never) or more"),
    ("train.lora_rank", lambda v: v >= 0, "zero (full fine-tuning) or more"),
    ("train.lora_alpha", lambda v: v > 0, "positive"),
    ("train.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("evaluate.temperature", lambda v: v >= 0, "zero or more"),
    ("evaluate.max_tokens", lambda v: v > 0, "positive"),
]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            first_line = str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    source = str(path) if path is not None else "defaults"
    config = _build(Config, raw, prefix="", source=source)
    for item in overrides:
        _apply_override(config, item)
    _check_ranges(config)
    _check_registries(config)
    return config


def config_from_dict(raw: dict[str, Any], source: str = "dict") -> Config:
    """Rebuild a validated Config from `to_dict()` output (Ray workers, run dirs)."""
    config = _build(Config, raw, prefix="", source=source)
    _check_ranges(config)
    return config


def get_key(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(_unknown_key_message(dotted, source))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' ({source}) must be a mapping of keys")
            kwargs[key] = _build(hint, value, prefix=f"{dotted}.", source=source)
        else:
            kwargs[key] = _coerce(value, hint, dotted, source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        # YAML 1.1 reads a bare on/off as a boolean.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"config key '{dotted}' ({source}) must be one of "
                              f"{', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        # A YAML list, or a comma-separated string on the command line (temperatures=0.6,1.0).
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            # Names stay strings as written (a column may be called `1` or `true`).
            value = [part.strip() if item_hint is str else yaml.safe_load(part)
                     for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{dotted}' ({source}) must be a list; got {type(value).__name__} {value!r}")
        return [_coerce(item, item_hint, f"{dotted}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        # A YAML mapping, or `name:weight,name:weight` on the command line.
        if isinstance(value, str):
            pairs = [part.split(":", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ConfigError(f"config key '{dotted}' ({source}) must look like name:value,name:value; got {value!r}")
            value = {k.strip(): yaml.safe_load(v) for k, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' ({source}) must be a mapping; got {type(value).__name__} {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(k, key_hint, f"{dotted} key", source): _coerce(v, value_hint, f"{dotted}.{k}", source)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        return _coerce(value, next(a for a in typing.get_args(hint) if a is not type(None)), dotted, source)
    # bool is an int in Python; a `true` given for a number is a mistake.
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # YAML 1.1 reads `1e-5` (no dot) as a string; it is a float to any reader.
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config key '{dotted}' ({source}) must be {hint.__name__}; "
                      f"got {type(value).__name__} {value!r}")


def _unknown_key_message(dotted: str, source: str) -> str:
    known = _all_keys(Config)
    close = difflib.get_close_matches(dotted, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}' ({source}){hint}"


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _apply_override(config: Config, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value (for example train.beta=0.2)")
    source = "command line"
    if key not in _all_keys(Config):
        raise ConfigError(_unknown_key_message(key, source))
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    section: Any = config
    for part in parents:
        section = getattr(section, part)
    hint = typing.get_type_hints(type(section))[leaf]
    if hint is str and not isinstance(value, str):
        value = text  # `run=123` or `name=true` are strings when a string is expected
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and value is not None:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))  # `key=null` stays None
    if typing.get_origin(hint) in (list, dict) and not isinstance(value, (list, dict)):
        value = text  # `temperatures=0.6,1.0` reads as a string; _coerce splits it
    setattr(section, leaf, _coerce(value, hint, key, source))


def _check_ranges(config: Config) -> None:
    for key, ok, what in _RANGE_CHECKS:
        value = get_key(config, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}; got {value!r}")
    if len(config.generate.temperatures) > config.generate.num_samples:
        raise ConfigError(f"config key 'generate.temperatures' has {len(config.generate.temperatures)} values but "
                          f"generate.num_samples is {config.generate.num_samples}: each temperature needs a sample")
    reserved = {"prompt_id", config.prompts.messages_field} & set(config.prompts.metadata_fields or ())
    if reserved:
        raise ConfigError(f"config key 'prompts.metadata_fields' must not name '{min(reserved)}': the prompt "
                          "itself (prompt_id and prompts.messages_field) is never metadata")
    if config.train.sharding == "fsdp" and config.train.lora_rank:
        raise ConfigError("config key 'train.sharding' must be none with LoRA (train.lora_rank > 0): "
                          "merging adapters into FSDP-sharded weights is not supported")
    if config.train.batch_size % config.train.micro_batch_size:
        raise ConfigError("config key 'train.micro_batch_size' must divide train.batch_size; "
                          f"got {config.train.micro_batch_size} and {config.train.batch_size}")


def _check_registries(config: Config) -> None:
    # Imported here so that loading a config stays cheap for tools that only read it.
    from rewards import REWARDS
    from stages.train.objectives import OBJECTIVES

    if config.train.objective not in OBJECTIVES:
        raise ConfigError(f"config key 'train.objective' must be one of {', '.join(sorted(OBJECTIVES))}; "
                          f"got {config.train.objective!r}")
    if config.reward.name not in REWARDS:
        raise ConfigError(f"config key 'reward.name' must be one of {', '.join(sorted(REWARDS))}; "
                          f"got {config.reward.name!r}")
    _check_reward_components(config.reward)


def _check_reward_components(reward: RewardConfig) -> None:
    # Caught here, at load, rather than minutes later in the rerank stage's actor.
    from rewards.composite import check_components
    from rewards.hf_classifier import MISSING_MODEL

    used = {reward.name}
    if reward.name == "composite":
        check_components(reward.components)
        used = set(reward.components)
    if "hf_classifier" in used and not reward.model:
        raise ConfigError(MISSING_MODEL)
