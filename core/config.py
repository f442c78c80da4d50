"""Typed configuration: YAML plus `key=value` overrides, validated once at load.

Every knob of a round lives in one of the dataclasses below, declared with `knob`: its
default, its help text, the range its value must lie in, whether it defines the run and
whether it is part of a training checkpoint's fingerprint all sit with the field, as
dataclass field metadata. `load_config` is the only way in: it rejects unknown keys and
wrong types (core/config_parse.py) and values out of range with a one-line error
naming the key, so nothing downstream has to re-check its inputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, NamedTuple

import yaml

from core.config_parse import apply_override, build, leaf_fields, yaml_problem
from core.errors import ConfigError
from core.project_files import PROJECT_FILES, relative_base


class Check(NamedTuple):
    ok: Callable[[Any], bool]
    must_be: str  # completes "config key 'x' must be ..."


POSITIVE = Check(lambda v: v > 0, "positive")
ZERO_OR_MORE = Check(lambda v: v >= 0, "zero or more")
MORE_THAN_1 = Check(lambda v: v > 1, "more than 1")
UP_TO_1 = Check(lambda v: 0 < v <= 1, "in (0, 1]")
BELOW_1 = Check(lambda v: 0 <= v < 1, "in [0, 1)")

# What vLLM's SamplingParams refuses (vllm/sampling_params.py, _verify_args), checked here at
# load rather than by the first engine asked, minutes into a round.
# Most samples of one request (SamplingParams.n): the default of vLLM's VLLM_MAX_N_SEQUENCES
# (vllm/envs.py). The engines run in Ray actors, which need not share this process's
# environment, so only the default is sure to hold there.
VLLM_MAX_N = 16384
# SamplingParams takes temperatures in [0, 2].
VLLM_MAX_TEMPERATURE = 2.0
# Below this temperature (vLLM's _SAMPLING_EPS) vLLM decodes greedily, and refuses a request
# for more than one sample then (SamplingParams._verify_greedy_sampling).
VLLM_GREEDY_BELOW = 1e-5
# vLLM seeds numpy with its engine seed, and numpy takes seeds in [0, 2**32). A round's engine
# seed is the run's seed + 1000 * round + engine index (core/seeds.py): a run's seed up to
# 2**31 - 1 leaves the other half of that range to the rounds.
MAX_SEED = 2**31 - 1

TEMPERATURE = Check(lambda v: 0 <= v <= VLLM_MAX_TEMPERATURE, "from 0 to 2 (vLLM's range)")


def knob(default: Any = MISSING, help: str = "", check: Check | None = None, *, identity: bool = False,
         fingerprint: bool = True, default_factory: Any = MISSING) -> Any:
    """A config field, documented and validated by its metadata.

    help: what the knob does. check: the range its value must lie in (tested after its type).
    identity: the knob defines the run: rounds of one run must agree on it (RUN_IDENTITY_KEYS);
    everything else (learning rate, K, workers...) may change between rounds.
    fingerprint: False for a train knob that changes neither the training steps nor their
    results, so a training checkpoint saved under another value is still resumed.
    """
    metadata = {"help": help, "check": check, "identity": identity, "fingerprint": fingerprint}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


# pipeline/tracking.py's TRACKERS, named here so that loading a config imports no tracker.
TRACKER_NAMES = ("tensorboard", "mlflow", "wandb")
AnyDtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    name: str = knob("embedded:smollm2-135m-instruct", "`embedded:<name>` (prepared by `make setup`), a local HF "
                     "checkpoint directory, or a hub id already in the local HF cache.", identity=True)
    max_model_len: int = knob(2048, "Context length given to vLLM; prompt tokens + generate.max_tokens must fit. "
                              "vLLM refuses more than the model's config.json allows when the engine starts.",
                              POSITIVE)
    trust_remote_code: bool = knob(False, "Run the model's own code from its checkpoint (off: only transformers' "
                                   "and vLLM's classes).")


@dataclass
class PromptsConfig:
    train: str = knob("data/prompts/train.jsonl", "JSONL or Parquet file, a local dataset directory, or "
                      "`hf:<dataset>[:<split>]`.", identity=True)
    heldout: str = knob("data/prompts/heldout.jsonl", "The held-out prompts, in the same forms as `train`.",
                        identity=True)
    messages_field: str = knob("messages", "Column holding the chat messages (list of {role, content}), or a "
                               "column of plain strings (UltraFeedback's `instruction`), each taken as one user "
                               "message.", identity=True)
    per_round: int = knob(64, "M: training prompts drawn per round; each round takes its own slice.", POSITIVE,
                          identity=True)
    eval_size: int = knob(64, "Held-out prompts scored by the evaluate stage (the first N of the file).",
                          ZERO_OR_MORE)
    too_long: Literal["drop", "error"] = knob("drop", "A prompt that does not fit the context with max_tokens of "
                                              "answer: `drop` it (counted in the round's metrics) or stop with an "
                                              "`error`.")
    metadata_fields: list[str] | None = knob(
        None, "The row's other columns that travel with the prompt as `metadata` (into every candidate row, and to "
        "the reward: ifeval reads `constraints`). null: all of them; a list: only these ([] none). A listed column "
        "absent from a row is absent from its metadata; one that no row of a set has is an error (a typo).",
        Check(lambda v: v is None or (all(v) and len(set(v)) == len(v)),
              "null (all columns) or a list of column names, without empty names or repeats"))
    duplicates: Literal["error", "drop"] = knob(
        "error", "A prompt_id seen again in a set: stop with an `error` naming both rows, or `drop` the later rows "
        "(the first is kept; the count is logged). Dropping repeats changes the prompt list, so every round's "
        "slice.", identity=True)


@dataclass
class GenerateConfig:
    num_samples: int = knob(4, f"K: responses sampled per prompt (vLLM takes up to {VLLM_MAX_N} in one request).",
                            Check(lambda v: 2 <= v <= VLLM_MAX_N, "at least 2 (a list needs a positive and a "
                                  f"negative) and at most {VLLM_MAX_N} (vLLM's VLLM_MAX_N_SEQUENCES)"))
    temperature: float = knob(0.8, "Sampling temperature (when `temperatures` is empty), 0 to 2; below 1e-5 vLLM "
                              "decodes greedily, one answer per prompt, so it cannot give K of them.", TEMPERATURE)
    temperatures: list[float] = knob(
        help="Several temperatures in one round: the K samples of each prompt are split into consecutive blocks, "
        "one per temperature in this order, as evenly as possible (the first K mod T temperatures take one more), "
        "e.g. K=4 and [0.6, 1.0] give samples 0-1 at 0.6 and 2-3 at 1.0. Empty: all at `temperature`.",
        check=Check(lambda v: all(0 <= t <= VLLM_MAX_TEMPERATURE for t in v) and len(set(v)) == len(v),
                    "from 0 to 2 each (vLLM's range), without repeats"),
        default_factory=list)
    top_p: float = knob(1.0, "Nucleus sampling: the smallest set of tokens holding this much probability.", UP_TO_1)
    max_tokens: int = knob(128, "Longest response, in tokens; less than model.max_model_len, which holds the prompt "
                           "too.", POSITIVE)
    num_actors: int = knob(1, "vLLM engines (Ray actors) that share the prompts.", POSITIVE)
    tensor_parallel_size: int = knob(1, "GPUs each vLLM engine spreads the model over.", POSITIVE)
    dtype: AnyDtype = knob("auto", "auto: bfloat16 on GPUs and on CPUs with native bf16 (AVX512_BF16 / AMX); float32 "
                        "on other CPUs, where bf16 matmuls are emulated and far slower (docs/benchmarks.md).")
    cpu_kv_cache_gib: int = knob(2, "KV-cache memory per engine on CPU hosts (vLLM's default asks for 92%).",
                                 POSITIVE)
    enforce_eager: bool = knob(True, "CUDA graphs / torch.compile lengthen start-up and did not speed up "
                               "decoding on CPU (docs/benchmarks.md): CPU engines run eagerly; GPUs may turn it off.")
    gpu_memory_utilization: float = knob(0.85, "Share of each GPU's memory a vLLM engine may take.", UP_TO_1)
    keep_engines: Literal["auto", "on", "off"] = knob(
        "auto", "on: the engines live through the whole `round`/`rounds` command and load each new policy from its "
        "checkpoint (vLLM reload_weights) instead of restarting; on GPUs they sleep while reference and train run. "
        "off: each generate and evaluate stage starts its own. auto: on on CPU hosts, off on GPUs (where it was not "
        "measured yet; docs/engine-reuse.md).")


@dataclass
class CompositeOptions:
    """reward.composite: read by the composite reward only (pipeline/settings.py refuses them set for another)."""

    components: dict[str, float] = knob(
        help="The weight of each registered reward, e.g. {ifeval: 1.0, hf_classifier: 0.5} (on the command line: "
        "reward.composite.components=ifeval:1.0,hf_classifier:0.5). An hf_classifier among them reads the flat "
        "reward.model, reward.max_length... as it does alone.",
        # abs(w) < inf is False for NaN too.
        check=Check(lambda v: all(abs(w) < float("inf") for w in v.values()), "finite weights"),
        identity=True, default_factory=dict)
    length_penalty: float = knob(0.0, "Subtracted per 100 words of response (whitespace-separated, so the same for "
                                 "every tokenizer); 0.1 costs a 300-word answer 0.3.", ZERO_OR_MORE, identity=True)


@dataclass
class PairrmOptions:
    """reward.pairrm: read by the pairwise reranker only (rewards/pairrm.py), as PairRM's own tokenize_pair."""

    source_max_length: int = knob(1224, "pairrm: tokens of the prompt kept, its marker and [CLS]/[SEP] included; "
                                  "a longer prompt loses its end.", Check(lambda v: v >= 3, "3 or more"))
    candidate_max_length: int = knob(412, "pairrm: tokens of each answer, plus half of what a short prompt leaves "
                                     "unused; a longer answer loses its end.", Check(lambda v: v >= 3, "3 or more"))


@dataclass
class JudgeOptions:
    """reward.judge: read by the LLM judge only (rewards/llm_judge.py), a vLLM engine inside the reward actor."""

    mode: Literal["pointwise", "listwise"] = knob(
        "pointwise", "llm_judge: `pointwise` grades each answer alone (one judge call per candidate, a score on the "
        "template's scale); `listwise` shows the judge a prompt's answers together, shuffled and labelled [1]..[K], "
        "and reads back an order (one call per prompt; scores K-1 for the best down to 0, relative to that list "
        "only, so lists.memory must be none).", identity=True)
    model: str = knob("", "llm_judge: the judge model (not the policy), a local checkpoint directory, "
                      "`embedded:<name>`, or a hub id already in the local HF cache; an instruction-tuned chat "
                      "model.", identity=True)
    template: str = knob("", "llm_judge: the judge's prompt template, a text file (empty: the bundled one for the "
                         "mode, rewards/judge_templates/<mode>.txt, whose header says which placeholders and "
                         "front-matter keys exist).")
    max_tokens: int = knob(32, "llm_judge: most tokens of a judge's reply (the template's stop strings usually "
                           "end it sooner).", POSITIVE)
    temperature: float = knob(0.0, "llm_judge: sampling temperature of the first judgement (0: greedy).", TEMPERATURE)
    retries: int = knob(2, "llm_judge: times an unparseable judgement is asked again, at retry_temperature (and, "
                        "listwise, reshuffled); one still unparseable is scored NaN, counted, and left to "
                        "reward.on_invalid.", ZERO_OR_MORE)
    retry_temperature: float = knob(1.0, "llm_judge: sampling temperature of the retries: above 0, so that a "
                                    "retry can reply otherwise.",
                                    Check(lambda v: 0 < v <= VLLM_MAX_TEMPERATURE, "above 0, up to 2 (vLLM's range)"))
    seed: int = knob(0, "llm_judge: seeds the judge engine's sampling and the listwise shuffle.",
                     Check(lambda v: 0 <= v <= MAX_SEED, "from 0 to 2**31 - 1"))
    max_model_len: int = knob(4096, "llm_judge: the judge engine's context length; a judgement whose prompt and "
                              "max_tokens do not fit is not asked, scored NaN and counted.", POSITIVE)
    cpu_kv_cache_gib: int = knob(1, "llm_judge: KV-cache memory of the judge engine on CPU hosts.", POSITIVE)
    gpu_memory_utilization: float = knob(0.3, "llm_judge: share of the reward actor's GPU memory the judge "
                                         "engine may take (it may share the GPU with kept generation engines).",
                                         UP_TO_1)


@dataclass
class RewardConfig:
    """The reward and its actors. The classifier's knobs (model, trust_remote_code, dtype, max_length,
    micro_batch_size) stay flat, beside the reward's name: an hf_classifier reads them whether it is
    the reward or one of composite's components, so no one plugin owns them."""

    name: str = knob("ifeval", "A name registered in rewards/ (see `rewards.REWARDS`).", identity=True)
    batch_size: int = knob(64, "Candidates handed to a reward actor at a time.", POSITIVE)
    on_invalid: Literal["error", "drop"] = knob("error", "A reward that is NaN or infinite: stop with an `error` "
                                                "naming the prompt, or `drop` that candidate (counted in the "
                                                "stage's statistics).")
    num_actors: int = knob(1, "Reward actors that share the candidates.", POSITIVE)
    num_gpus_per_actor: float | Literal["auto"] = knob(
        "auto", "GPUs each reward actor holds. auto: one on a GPU cluster (what kept engines leave of a GPU, "
        "beside them), none on CPUs; 0 on a GPU cluster runs the reward model on CPU, with no GPU visible "
        "(core/gpu_layout.py).", Check(lambda v: v == "auto" or v >= 0, "auto, or zero or more"))
    model: str = knob("", "hf_classifier and pairrm (alone or as composite components): the reward model, a "
                      "local checkpoint directory, `embedded:<name>`, or a hub id already in the local HF cache. "
                      "hf_classifier: an AutoModelForSequenceClassification with one label (e.g. Skywork-Reward) "
                      "whose tokenizer has a chat template; pairrm: a PairRM checkpoint (DebertaV2PairRM).",
                      identity=True)
    trust_remote_code: bool = knob(False, "Run the reward model's own code from its checkpoint (off: only "
                                   "transformers' classes).")
    dtype: AnyDtype = knob("auto", "auto: bfloat16 on GPUs, float32 on CPUs (llm_judge's engine: as generate.dtype's "
                           "auto).")
    max_length: int = knob(2048, "Longest chat (prompt + response) in tokens; a longer one keeps its end, where the "
                           "classifier reads its score.", MORE_THAN_1)
    micro_batch_size: int = knob(16, "Sequences per forward pass of the reward model. Each batch of batch_size "
                                 "samples is sorted by length and cut into these; halved on out-of-memory.", POSITIVE)
    composite: CompositeOptions = knob(help="Options of the composite reward (reward.name=composite).",
                                       default_factory=CompositeOptions)
    pairrm: PairrmOptions = knob(help="Options of the pairwise reranker (reward.name=pairrm, alone or as a "
                                 "composite component).", default_factory=PairrmOptions)
    judge: JudgeOptions = knob(help="Options of the LLM judge (reward.name=llm_judge, alone or as a composite "
                               "component).", default_factory=JudgeOptions)


@dataclass
class ListsConfig:
    strategy: Literal["top_bottom", "top_rest", "hardest", "random"] = knob(
        "top_rest", "How a prompt's candidates, best-first, become positives and negatives (stages/rerank.py, "
        "LIST_STRATEGIES). Every strategy takes the best `num_positives` candidates as positives; the negatives are "
        "drawn from the eligible rest (see `ties` and `min_margin`): top_bottom: the `num_negatives` lowest "
        "(contrastive: 1 vs bottom 3 of 4); top_rest: all of them; hardest: the `num_negatives` highest (the "
        "hardest negatives); random: `num_negatives` drawn uniformly, seeded by seed, round and prompt.")
    num_positives: int = knob(1, "Positives per list: the best candidates.", POSITIVE)
    num_negatives: int = knob(3, "Negatives per list; ignored by top_rest, which keeps every eligible negative.",
                              POSITIVE)
    ties: Literal["drop", "allow"] = knob("drop", "A candidate whose reward equals the lowest positive's: `drop` "
                                          "never uses it as a negative (a tie is no preference); `allow` may.")
    min_margin: float = knob(0.0, "A negative must be at least this far below every positive; a prompt left without "
                             "a negative is dropped and counted.",
                             Check(lambda v: v >= 0 and math.isfinite(v), "zero or more"))
    truncated: Literal["keep", "negative_only"] = knob(
        "keep", "Answers the engine cut at generate.max_tokens (finish_reason length), scored as sampled, with no "
        "end-of-answer token: `keep` ranks them like any other; `negative_only` never makes one a positive (a "
        "prompt whose best finished answer is not above the pool's floor gets no list). `larpo inspect` counts them.")
    memory: Literal["none", "previous", "all"] = knob(
        "none", "The candidate pool of a prompt: this round only (`none`), plus the previous round's responses to "
        "the same prompt (`previous`), or every earlier round's (`all`). Earlier rewards are reused, not re-scored. "
        "It only acts when prompts recur (a small prompt set, or prompts.per_round equal to the set): each round "
        "draws new prompts until the set is used up. Earlier rounds' lists: train.replay.")


@dataclass
class ReferenceConfig:
    policy: Literal["previous", "initial"] = knob("previous", "previous: the round's starting policy (LarPO "
                                                  "Algorithm 1); initial: the base model (as in RLHFlow).",
                                                  identity=True)
    batch_size: int = knob(16, "List items per forward pass, in whole lists (a longer list goes alone).", POSITIVE)
    in_train_workers: bool = knob(True, "Where the reference is the round's starting policy (policy previous, and "
                                  "round 1), the train stage's Ray Train workers score it with the model they load "
                                  "to train, before the first step: one model load and one process start fewer. "
                                  "The log-probs still go to train/ (and its done marker) before training starts.")


# Each objective's own options (core/objectives.py, OPTION_FIELDS), in a section named after it:
# pipeline/settings.py refuses one set while another objective is chosen.
@dataclass
class LambdarankOptions:
    ndcg: bool = knob(False, "Weight each pair by |delta DCG| of swapping it (LiPO-lambda).")


@dataclass
class SimpoOptions:
    gamma: float = knob(0.5, "Target margin between the best and the worst item, in score units.")


@dataclass
class TrainConfig:
    objective: str = knob("contrastive", "A name in core/objectives.py: dpo, contrastive, lambdarank, listmle, "
                          "ipo, simpo.")
    beta: float = knob(0.1, "Scale of the retriever score s = beta * (log pi - log pi_ref); IPO's tau.", POSITIVE)
    lambdarank: LambdarankOptions = knob(help="Options of the lambdarank objective (train.objective=lambdarank).",
                                         default_factory=LambdarankOptions)
    simpo: SimpoOptions = knob(help="Options of the simpo objective (train.objective=simpo).",
                               default_factory=SimpoOptions)
    learning_rate: float = knob(1e-6, "Peak learning rate (linear warm-up, then cosine decay to zero).", ZERO_OR_MORE)
    epochs: int = knob(1, "Passes over the round's lists.", POSITIVE)
    batch_size: int = knob(8, "Prompts per optimizer step (each brings its whole list).", POSITIVE)
    micro_batch_size: int = knob(2, "Prompts per forward pass; batch_size / micro_batch_size steps are accumulated.",
                                 POSITIVE)
    max_length: int = knob(512, "Longest prompt + response in tokens; longer responses are cut from the end.",
                           MORE_THAN_1)
    max_list_size: int = knob(8, "The longest list trained on (positives first, then the hardest negatives).",
                              Check(lambda v: v >= 2, "at least 2"))
    weight_decay: float = knob(0.0, "The optimizer's decoupled weight decay.")
    optimizer: Literal["adamw", "adamw_bf16"] = knob(
        "adamw", "adamw: torch's AdamW. adamw_bf16: the same update with both moments stored in bf16 "
        "(stochastically rounded): half the optimizer memory (stages/train/optim.py).")
    warmup_ratio: float = knob(0.1, "Share of the steps over which the learning rate warms up from 0.", BELOW_1)
    max_grad_norm: float = knob(1.0, "Gradients are clipped to this global norm.", POSITIVE)
    num_workers: int = knob(1, "Data-parallel Ray Train workers.", POSITIVE, fingerprint=False)
    sharding: Literal["none", "fsdp"] = knob(
        "none", "none: every worker holds the whole model and gradients are summed across workers (CPU or GPU). "
        "fsdp: torch FSDP2 shards weights, gradients and optimizer state across the workers (for models that do not "
        "fit one GPU; not with LoRA).", fingerprint=False)
    checkpoint_every: int = knob(50, "Save model, optimizer, scheduler and data position every N optimizer steps "
                                 "(0: never), so a killed train stage resumes instead of restarting.",
                                 Check(lambda v: v >= 0, "zero (never) or more"), fingerprint=False)
    dtype: Literal["float32", "bfloat16"] = knob("float32", "Dtype of the policy's weights (and of the reference "
                                                 "log-probs, which must match).")
    autocast: Literal["auto", "on", "off"] = knob("auto", "bf16 autocast of forward passes over fp32 weights "
                                                  "(reference stage too): auto = where the hardware has native bf16 "
                                                  "(GPUs, AVX512_BF16 / AMX CPUs).")
    gradient_checkpointing: bool = knob(False, "Recompute each layer's activations in backward: more "
                                        "compute for less peak memory "
                                        "(docs/benchmarks.md).")
    replay: Literal["none", "previous", "all"] = knob(
        "none", "Earlier rounds' lists trained on again beside this round's (LarPO's Algorithm 1 trains iteration s "
        "on D_0 ... D_s): `previous` adds round N-1's, `all` rounds 1..N-1's. Their reference log-probs are scored "
        "again under this round's reference; one shuffled pass over the union. Not `lists.memory`, which pools "
        "earlier answers to the *same prompt*.", identity=True)
    lora_rank: int = knob(0, "LoRA adapters (peft) instead of full fine-tuning when lora_rank > 0; they are merged "
                          "into the saved checkpoint, so vLLM loads it as a plain model.",
                          Check(lambda v: v >= 0, "zero (full fine-tuning) or more"))
    lora_alpha: float = knob(32.0, "LoRA scaling: adapters are scaled by lora_alpha / lora_rank.", POSITIVE)
    lora_dropout: float = knob(0.0, "Dropout on the LoRA adapters' input.", BELOW_1)
    lora_target_modules: str = knob("all-linear", "peft's target_modules: \"all-linear\" or comma-separated module "
                                    "names (q_proj,v_proj).")
    save_dtype: Literal["float32", "bfloat16"] = knob("float32", "bf16 rounding can erase a round's small update, "
                                                      "so checkpoints stay fp32.")
    logprob_chunk_size: int = knob(512, "Positions per chunk of the vocabulary projection (bounds [chunk, vocab] "
                                   "memory).", POSITIVE)
    share_prompt: bool = knob(True, "Run a list's shared prompt through the model once, its K responses attending "
                              "to it through a packed attention mask, instead of once per item: the same log-probs "
                              "for fewer tokens (reference stage too). Needs sdpa or eager attention.")


@dataclass
class EvaluateConfig:
    temperature: float = knob(0.0, "Decoding of the one answer per held-out prompt (0: greedy). Round 0's answers "
                              "(the base model, round_000/), every win rate's baseline, are made with these, and a "
                              "later round with other values is refused: its win rate would compare unlike "
                              "answers.", TEMPERATURE, identity=True)
    max_tokens: int = knob(128, "Longest held-out answer, in tokens; part of round 0's baseline, like temperature. "
                           "Less than model.max_model_len, which holds the prompt too.", POSITIVE, identity=True)


@dataclass
class Config:
    seed: int = knob(0, "Seeds sampling, list drawing and the training order.",
                     Check(lambda v: 0 <= v <= MAX_SEED, "from 0 to 2**31 - 1 (vLLM seeds numpy with it, plus 1000 "
                           "per round)"), identity=True)
    output: str = knob("runs", "Root of run directories (a local path or a shared mount on clusters).")
    worker_retries: int = knob(2, "A worker that dies mid-stage (a generation engine, a reward actor, the reference "
                               "task, a Ray Train worker: a preempted node, an out-of-memory kill) is replaced this "
                               "many times per stage, redoing only its unfinished part; then the round stops.",
                               Check(lambda v: v >= 0, "zero (no retry) or more"))
    resources_wait_seconds: float = knob(0.0, "A round that asks for more workers or GPUs than the Ray cluster has "
                                         "stops before any stage; on an autoscaling cluster, give it this many "
                                         "seconds to grow first.", ZERO_OR_MORE)
    tracking: list[str] = knob(
        help="Experiment trackers that receive every training step and round (README, \"Experiment tracking\"): any "
        "of tensorboard, mlflow, wandb. A tracker that fails never fails a round.",
        check=Check(lambda v: set(v) <= set(TRACKER_NAMES) and len(set(v)) == len(v),
                    f"a list of {', '.join(TRACKER_NAMES)}, without repeats"),
        default_factory=list)
    model: ModelConfig = knob(help="The policy's base model.", default_factory=ModelConfig)
    prompts: PromptsConfig = knob(help="Training and held-out prompts.", default_factory=PromptsConfig)
    generate: GenerateConfig = knob(help="Sampling K candidates per prompt (vLLM).", default_factory=GenerateConfig)
    reward: RewardConfig = knob(help="Scoring the candidates.", default_factory=RewardConfig)
    lists: ListsConfig = knob(help="Turning scored candidates into ranked lists.", default_factory=ListsConfig)
    reference: ReferenceConfig = knob(help="The reference policy's log-probs.", default_factory=ReferenceConfig)
    train: TrainConfig = knob(help="The LarPO objective's training.", default_factory=TrainConfig)
    evaluate: EvaluateConfig = knob(help="Held-out answers, reward and win rate.", default_factory=EvaluateConfig)

    # Keys that moved into their plugin's section: still named, they are refused with where they
    # went (core/config_parse.py, unknown_key_message), not as unknown keys.
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "train.lambdarank_ndcg": "train.lambdarank.ndcg",
        "train.simpo_gamma": "train.simpo.gamma",
        "reward.components": "reward.composite.components",
        "reward.length_penalty": "reward.composite.length_penalty",
    }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys that define what a run is: rounds of one run must agree on them (see `knob`).
RUN_IDENTITY_KEYS = tuple(dotted for dotted, f in leaf_fields(Config) if f.metadata["identity"])
# Train knobs a training checkpoint's fingerprint leaves out (stages/train/checkpoint.py), dotted
# below `train.` (an objective's section's knob as `simpo.gamma`).
TRAIN_FINGERPRINT_EXCLUDED = frozenset(dotted for dotted, f in leaf_fields(TrainConfig)
                                       if not f.metadata["fingerprint"])


# The project's files, a checkout's or an installed wheel's (core/project_files.py): the bundled configs name them.
PROJECT_DIR = PROJECT_FILES
BUNDLED_CONFIGS = PROJECT_DIR / "configs"
DEFAULT_CONFIG = BUNDLED_CONFIGS / "default.yaml"

# Keys that name a file or directory, with what tells a path from another kind of value
# (`embedded:<name>`, `hf:<dataset>`, a hub id); those values are left as they are.
PATH_KEYS: dict[str, Callable[[str], bool]] = {
    "output": lambda value: bool(value),
    "prompts.train": lambda value: bool(value) and not value.startswith("hf:"),
    "prompts.heldout": lambda value: bool(value) and not value.startswith("hf:"),
    "model.name": lambda value: bool(value) and not value.startswith("embedded:"),
    "reward.model": lambda value: bool(value) and not value.startswith("embedded:"),
    "reward.judge.model": lambda value: bool(value) and not value.startswith("embedded:"),
    "reward.judge.template": lambda value: bool(value),
}
# A model named by a relative path that does not exist there is a hub id ("org/name").
MAY_BE_HUB_IDS = ("model.name", "reward.model", "reward.judge.model")


def resolve_path(key: str, value: Any, base: Path) -> Any:
    """`value` of path key `key` as an absolute path, read from `base` when it is relative."""
    if not isinstance(value, str) or not PATH_KEYS[key](value) or Path(value).expanduser().is_absolute():
        return value
    candidate = base / Path(value).expanduser()
    if key in MAY_BE_HUB_IDS and not candidate.exists():
        return value
    return os.path.normpath(candidate)


def config_dir(path: Path | None) -> Path:
    """Where a config file's relative paths are read from: its own directory, or the project's
    for the bundled configs (and the defaults)."""
    if path is None:
        return PROJECT_DIR
    parent = path.resolve().parent
    return PROJECT_DIR if parent == BUNDLED_CONFIGS else parent


def set_key(config: Config, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    section: Any = config
    for part in parents:
        section = getattr(section, part)
    setattr(section, leaf, value)


# How a config file's top level is named when it is not the mapping it must be.
_YAML_KINDS = {list: "a list", str: "a plain string", int: "a number", float: "a number", bool: "a boolean"}


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds ({} for an empty file): every config YAML read from disk
    (`--config`, a run's own config.yaml) goes through here, so that any fault in one is a
    ConfigError on one line naming the file, and for bad YAML the line and column."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line, column, problem = yaml_problem(exc, text)
        raise ConfigError(f"config file {path} is not valid YAML: line {line}, column {column}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        kind = _YAML_KINDS.get(type(raw), type(raw).__name__)
        raise ConfigError(f"config file {path} holds {kind} at its top level; it must be a mapping of keys "
                          "(such as `seed: 0`)")
    return raw


def _read_config_text(path: Path) -> str:
    if path.is_dir():
        examples = sorted(path.glob("*.yaml"))
        such_as = f" such as {examples[0]}" if examples else ""
        raise ConfigError(f"config file {path} is a directory; give a YAML file{such_as}")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"config file {path}, line {line}, column {column}: not UTF-8 text "
                          f"(byte {data[exc.start:exc.start + 1]!r})") from None


def in_file(raw: dict[str, Any], dotted: str) -> bool:
    section: Any = raw
    for part in dotted.split("."):
        if not isinstance(section, dict) or part not in section:
            return False
        section = section[part]
    return True


def read_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None), apply overrides, validate what the
    config says on its own. The command line's `load_config` (pipeline/settings.py) also checks the
    objective and the rewards it names against those installed.

    Relative paths (PATH_KEYS) become absolute: a file's are read from its directory (the
    project's, for the bundled configs), the defaults' from the project's, and an override's
    from the current directory, where the person typing it is. So `larpo` runs from anywhere.
    """
    path = Path(path) if path is not None else None
    raw = read_yaml_file(path) if path is not None else {}
    config = build(Config, raw, source=str(path) if path is not None else "defaults")
    for key in PATH_KEYS:
        base = relative_base(key, config_dir(path) if in_file(raw, key) else PROJECT_DIR)
        set_key(config, key, resolve_path(key, get_key(config, key), base))
    for item in overrides:
        apply_override(config, item)
        key = item.partition("=")[0].strip()
        if key in PATH_KEYS:
            set_key(config, key, resolve_path(key, get_key(config, key), Path.cwd()))
    _check_ranges(config)
    return config


def portable(key: str, value: Any) -> Any:
    """A path inside the project as the project names it (relative to it), so that a run's
    config.yaml reads the same from another checkout or a `ray job submit` working directory."""
    if key in PATH_KEYS and isinstance(value, str) and os.path.isabs(value):
        try:
            return Path(value).relative_to(PROJECT_DIR).as_posix()
        except ValueError:
            return value
    return value


def portable_dict(config: Config) -> dict[str, Any]:
    """`config.to_dict()` with its paths `portable`: what a run's config.yaml stores."""
    raw = config.to_dict()
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section = raw
        for part in parents:
            section = section[part]
        section[leaf] = portable(key, section[leaf])
    return raw


def same_setting(key: str, stored: Any, wanted: Any) -> bool:
    """Whether a run's stored value of `key` is the one asked for now. A stored relative path is
    the project's (config.yaml stores them so, and runs made before paths were resolved ran
    from the project's root)."""
    if stored == wanted:
        return True
    return key in PATH_KEYS and portable(key, resolve_path(key, stored, PROJECT_DIR)) == portable(key, wanted)


def config_from_dict(raw: dict[str, Any], source: str = "dict") -> Config:
    """Rebuild a validated Config from `to_dict()` output (Ray workers, run dirs)."""
    config = build(Config, raw, source=source)
    _check_ranges(config)
    return config


def get_key(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_ranges(config: Config) -> None:
    for key, f in leaf_fields(Config):
        check: Check | None = f.metadata["check"]
        value = get_key(config, key)
        if check is not None and not check.ok(value):
            raise ConfigError(f"config key '{key}' must be {check.must_be}; got {value!r}")
    if len(config.generate.temperatures) > config.generate.num_samples:
        raise ConfigError(f"config key 'generate.temperatures' has {len(config.generate.temperatures)} values but "
                          f"generate.num_samples is {config.generate.num_samples}: each temperature needs a sample")
    _check_engine_requests(config)
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


def _check_engine_requests(config: Config) -> None:
    """What vLLM refuses in a request only when an engine is asked, minutes into a round."""
    context = config.model.max_model_len
    for key in ("generate.max_tokens", "evaluate.max_tokens"):
        # The budget of a prompt is max_model_len - max_tokens (pipeline/driver.py): none would fit.
        if get_key(config, key) >= context:
            raise ConfigError(f"config key '{key}' must be less than model.max_model_len ({context}), which holds "
                              f"the prompt too; got {get_key(config, key)}")
    gen = config.generate
    key = "generate.temperatures" if gen.temperatures else "generate.temperature"
    for temperature, count in _sample_blocks(gen.num_samples, gen.temperatures or [gen.temperature]):
        if temperature < VLLM_GREEDY_BELOW and count > 1:
            raise ConfigError(f"config key '{key}' asks temperature {temperature} for {count} samples per prompt, "
                              "but below 1e-5 vLLM decodes greedily and takes one: raise it, or give it one sample "
                              "(more temperatures)")


def _sample_blocks(num_samples: int, temperatures: list[float]) -> list[tuple[float, int]]:
    # pools/vllm_engines.py's split_samples (one request per block), not imported: that
    # module's imports are not for a config load.
    base, extra = divmod(num_samples, len(temperatures))
    return [(temperature, base + (i < extra)) for i, temperature in enumerate(temperatures)]
