"""LLM judge: a chat model served by vLLM grades the candidates, from a prompt template file.

Two modes (reward.judge.mode), one registered name, so that a composite component named
llm_judge and every judge option mean the same in both:

  pointwise  each distinct answer of a prompt is judged alone; the reply is searched for a score
             on the template's scale (`parse_score`), and that number is the reward.
  listwise   a prompt's distinct answers are shown at once, as LLM rerankers in IR do (RankGPT):
             sorted, then shuffled with an RNG seeded by the judge's seed, the prompt_id and the
             attempt, so that the judge's preference for a position follows neither the sampling
             order nor the batch's, and labelled [1]..[K]; the reply is read as an order such as
             "[3] > [1] > [2]" (`parse_order`) and mapped back through the shuffle: K-1 for the
             best down to 0 (`order_scores`). Those scores only compare the answers of one call,
             so listwise is the one mode that `needs_whole_prompts`, and lists.memory must be none.

Identical answers to one prompt are one answer to the judge: judged once, equal scores.

The template (rewards/judge_templates/<mode>.txt, or reward.judge.template) is YAML front matter
between "---" lines (reply_prefix, stop; pointwise: pattern, min_score, max_score) and then the
judge's message in str.format syntax; the bundled files' headers list the placeholders.
`load_template` refuses, in one line naming the file, a template that lacks a required
placeholder or names an unknown one; pipeline/settings.py calls it at load.

A reply that does not parse is asked again, up to reward.judge.retries times, at
reward.judge.retry_temperature (listwise: reshuffled too). vLLM on CPU refuses per-request seeds,
so a retry gets another sample from the engine-level seed's stream instead, which moves on with
every request. One still unparseable after that is scored NaN, never a made-up 0: reward.on_invalid
then stops the stage naming the prompt, or drops the candidate. `counters()` (judge_calls,
judge_unparsed, judge_too_long) reaches the rerank stage's statistics through the reward actor.

The vLLM engine is built inside the reward actor on the first `score` call, so building the reward
(and tests, with another engine) costs nothing. On a GPU cluster the reward actor holds
reward.num_gpus_per_actor GPUs, which the judge engine then uses (reward.judge.gpu_memory_utilization
of their memory, beside any kept generation engine).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from core.errors import ConfigError, PipelineError
from core.models import resolve_model
from rewards.base import Sample, register_reward

log = logging.getLogger("rewards.llm_judge")

MODES = ("pointwise", "listwise")
TEMPLATE_DIR = Path(__file__).resolve().parent / "judge_templates"
FRONT_MATTER = "---"
# Placeholders of each mode's template: those it must use, and all it may.
REQUIRED_PLACEHOLDERS = {"pointwise": ("prompt", "answer"), "listwise": ("prompt", "answers")}
ALLOWED_PLACEHOLDERS = {"pointwise": {"prompt", "answer"}, "listwise": {"prompt", "answers", "count"}}
COMMON_KEYS = {"mode", "reply_prefix", "stop"}
MODE_KEYS = {"pointwise": COMMON_KEYS | {"pattern", "min_score", "max_score"}, "listwise": COMMON_KEYS}
DEFAULT_SCORE_PATTERN = r"(?i)score\s*[:=]?\s*(-?\d+(?:\.\d+)?)"
# An order: labels joined by ">" or ",", e.g. "[3] > [1] > [2]".
LABEL_CHAIN = re.compile(r"\[\s*\d+\s*\](?:\s*[>,]\s*\[\s*\d+\s*\])*")
LABEL = re.compile(r"\d+")

MISSING_MODEL = ("config key 'reward.judge.model' must name the judge model for llm_judge (a local checkpoint "
                 "directory, `embedded:<name>`, or a hub id in the local HF cache)")


# --- the template ---------------------------------------------------------------

@dataclass(frozen=True)
class JudgeTemplate:
    path: Path
    mode: str
    body: str
    reply_prefix: str = ""
    stop: tuple[str, ...] = ()
    pattern: str = DEFAULT_SCORE_PATTERN
    min_score: float = 1.0
    max_score: float = 10.0

    def render(self, **values: Any) -> str:
        return self.body.format(**values)


def default_template(mode: str) -> Path:
    return TEMPLATE_DIR / f"{mode}.txt"


def load_template(path: str | Path, mode: str) -> JudgeTemplate:
    """The template at `path` (empty: the bundled one for `mode`), or a one-line ConfigError naming the file."""
    if mode not in MODES:
        raise ConfigError(f"config key 'reward.judge.mode' must be one of {', '.join(MODES)}; got {mode!r}")
    file = Path(path).expanduser() if path else default_template(mode)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config key 'reward.judge.template': template file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config key 'reward.judge.template': template file {file} cannot be read: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    problem, template = parse_template(text, mode, file)
    if problem:
        raise ConfigError(f"config key 'reward.judge.template': template file {file} {problem}")
    return template


def parse_template(text: str, mode: str, path: Path) -> tuple[str | None, JudgeTemplate | None]:
    """(None, the template) or (what is wrong with it, None): a pure function of the file's text."""
    settings, body, problem = split_front_matter(text)
    if problem:
        return problem, None
    unknown = sorted(set(settings) - MODE_KEYS[mode])
    if unknown:
        return f"has front-matter keys that {mode} does not read: {', '.join(unknown)}", None
    if settings.get("mode", mode) != mode:
        return f"is written for mode {settings['mode']!r}, but reward.judge.mode is {mode}", None
    problem = placeholder_problem(body, mode)
    if problem:
        return problem, None
    stop = settings.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(settings.get("reply_prefix", ""), str) or not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        return "needs reply_prefix to be a string and stop a list of non-empty strings", None
    options: dict[str, Any] = {"reply_prefix": settings.get("reply_prefix", ""), "stop": tuple(stop)}
    if mode == "pointwise":
        problem = scale_problem(settings)
        if problem:
            return problem, None
        options.update(pattern=settings.get("pattern", DEFAULT_SCORE_PATTERN),
                       min_score=float(settings.get("min_score", 1)), max_score=float(settings.get("max_score", 10)))
    return None, JudgeTemplate(path=path, mode=mode, body=body, **options)


def split_front_matter(text: str) -> tuple[dict[str, Any], str, str | None]:
    """(settings, body, problem): the YAML between a first line "---" and the next, and the rest."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != FRONT_MATTER:
        return {}, text.strip(), None
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == FRONT_MATTER), None)
    if end is None:
        return {}, "", f"opens its front matter with {FRONT_MATTER!r} but never closes it"
    try:
        settings = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as exc:
        return {}, "", f"has front matter that is not valid YAML: {' '.join(str(exc).split())}"
    if not isinstance(settings, dict):
        return {}, "", "has front matter that is not a mapping of keys"
    return settings, "".join(lines[end + 1:]).strip(), None


def placeholder_problem(body: str, mode: str) -> str | None:
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(body) if field is not None}
    except ValueError as exc:
        return f"is not a valid str.format template ({exc}; write {{{{ and }}}} for literal braces)"
    missing = [name for name in REQUIRED_PLACEHOLDERS[mode] if name not in fields]
    if missing:
        return f"lacks the placeholder {', '.join('{' + name + '}' for name in missing)} that {mode} needs"
    unknown = sorted(fields - ALLOWED_PLACEHOLDERS[mode])
    if unknown:
        known = ", ".join("{" + name + "}" for name in sorted(ALLOWED_PLACEHOLDERS[mode]))
        return f"names unknown placeholders {', '.join(repr(name) for name in unknown)} (known: {known})"
    return None


def scale_problem(settings: dict[str, Any]) -> str | None:
    low, high = settings.get("min_score", 1), settings.get("max_score", 10)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
            or low >= high:
        return f"needs numbers min_score < max_score, not {low!r} and {high!r}"
    try:
        groups = re.compile(str(settings.get("pattern", DEFAULT_SCORE_PATTERN))).groups
    except re.error as exc:
        return f"has a pattern that is not a regular expression: {exc}"
    if groups != 1:
        return f"has a pattern with {groups} groups; it needs exactly one, around the score"
    return None


def prompt_text(messages: list[dict]) -> str:
    """The request as the judge reads it: a lone message's content, or each message headed by its role."""
    if len(messages) == 1:
        return str(messages[0]["content"])
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in messages)


def answers_text(answers: Sequence[str]) -> str:
    return "\n\n".join(f"[{n}] {answer}" for n, answer in enumerate(answers, start=1))


# --- reading the judge's reply ----------------------------------------------------

def parse_score(reply: str, pattern: str, low: float, high: float) -> float | None:
    """The first score `pattern` finds in `reply`, or None when there is none or it is off the scale."""
    match = re.search(pattern, reply)
    if match is None:
        return None
    try:
        value = float(match.group(1))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and low <= value <= high else None


def parse_order(reply: str, count: int) -> list[int] | None:
    """The 0-based positions of `count` shown answers, best first, from labels [1]..[count] in `reply`.

    The longest chain of labels counts (the first of equals): a judge that names one answer while
    reasoning and then gives its ranking is read by its ranking. A single label left out is
    implied last (nothing else is left for it); a repeated label contradicts itself, and an
    unknown one or two missing leave the order unknown: None.
    """
    chains = [LABEL.findall(match.group(0)) for match in LABEL_CHAIN.finditer(reply)]
    if not chains:
        return None
    labels = [int(label) for label in max(chains, key=len)]
    if len(set(labels)) != len(labels) or not all(1 <= label <= count for label in labels):
        return None
    missing = [label for label in range(1, count + 1) if label not in labels]
    if len(missing) > 1:
        return None
    return [label - 1 for label in labels + missing]


def shuffled(count: int, key: str) -> list[int]:
    """A permutation of range(count) drawn from an RNG seeded by `key`: shown position -> answer index."""
    order = list(range(count))
    random.Random(key).shuffle(order)
    return order


def order_scores(order: list[int], shown: list[int]) -> list[float]:
    """Scores by answer index: K-1 for the answer at shown position order[0] down to 0 for the last."""
    count = len(shown)
    scores = [0.0] * count
    for rank, position in enumerate(order):
        scores[shown[position]] = float(count - 1 - rank)
    return scores


# --- judgements -----------------------------------------------------------------

class Engine(Protocol):
    def complete(self, messages: list[str], reply_prefix: str, stop: Sequence[str],
                 temperature: float) -> list[str | None]:
        """The judge's reply to each user message, after `reply_prefix`; None where it did not fit."""
        ...


class PointwiseJudgement:
    """One answer judged alone: one score."""

    def __init__(self, template: JudgeTemplate, prompt: list[dict], answer: str):
        self.template, self.text = template, template.render(prompt=prompt_text(prompt), answer=answer)

    def ask(self, attempt: int) -> str:
        return self.text

    def read(self, reply: str) -> list[float] | None:
        value = parse_score(reply, self.template.pattern, self.template.min_score, self.template.max_score)
        return None if value is None else [value]


class ListwiseJudgement:
    """A prompt's distinct answers judged together: one score each, by `order_scores`."""

    def __init__(self, template: JudgeTemplate, prompt: list[dict], answers: list[str], key: str):
        self.template, self.prompt, self.answers, self.key = template, prompt_text(prompt), answers, key
        self.shown: list[int] = []

    def ask(self, attempt: int) -> str:
        # Reshuffled on each attempt: a retry's prompt differs even where its sampling cannot.
        self.shown = shuffled(len(self.answers), f"{self.key}/{attempt}")
        return self.template.render(prompt=self.prompt, answers=answers_text([self.answers[i] for i in self.shown]),
                                    count=len(self.answers))

    def read(self, reply: str) -> list[float] | None:
        order = parse_order(reply, len(self.answers))
        return None if order is None else order_scores(order, self.shown)


@register_reward("llm_judge")
class LlmJudge:
    """Grades candidates with a judge LLM (see the module's docstring)."""

    name = "llm_judge"

    @staticmethod
    def needs_whole_prompts(settings: dict[str, Any]) -> bool:
        # Listwise scores compare one call's answers; pointwise ones stand alone.
        return (settings.get("judge") or {}).get("mode", "pointwise") == "listwise"

    def __init__(self, model: str = "", mode: str = "pointwise", template: str = "", max_tokens: int = 32,
                 temperature: float = 0.0, retries: int = 2, retry_temperature: float = 1.0, seed: int = 0,
                 max_model_len: int = 4096, cpu_kv_cache_gib: int = 1, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", trust_remote_code: bool = False, engine: Engine | None = None):
        if not model and engine is None:
            raise ConfigError(MISSING_MODEL)
        if retries < 0:
            raise ConfigError(f"config key 'reward.judge.retries' must be zero or more, not {retries}")
        self.mode = mode
        self.template = load_template(template, mode)
        self.temperature, self.retry_temperature = temperature, retry_temperature
        self.retries, self.seed = retries, seed
        self.engine_settings = dict(seed=seed, max_tokens=max_tokens, max_model_len=max_model_len,
                                    cpu_kv_cache_gib=cpu_kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization,
                                    dtype=dtype, trust_remote_code=trust_remote_code)
        self.path = None
        if engine is None:
            try:
                self.path = resolve_model(model)
            except PipelineError as exc:
                raise PipelineError(f"config key 'reward.judge.model': {exc}") from None
        self._engine = engine
        self.calls = self.unparsed = self.too_long = 0

    @classmethod
    def from_config(cls, settings: dict[str, Any]) -> LlmJudge:
        options = dict(settings.get("judge") or {})
        for key in ("dtype", "trust_remote_code"):
            if key in settings:
                options[key] = settings[key]
        return cls(**options)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = VllmJudge(self.path, **self.engine_settings)
        return self._engine

    def counters(self) -> dict[str, int]:
        """What the stage reports: judge calls made (retries included), judgements left unparseable
        after the retries (scored NaN), and those not asked for not fitting max_model_len (NaN too)."""
        return {"judge_calls": self.calls, "judge_unparsed": self.unparsed, "judge_too_long": self.too_long}

    def score(self, samples: Sequence[Sample]) -> list[float]:
        groups: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(sample.prompt_id, []).append(i)
        judgements: list[Any] = []
        # Per judgement, the samples it scores: targets[j][n] answers to score n of judgement j.
        targets: list[list[list[int]]] = []
        scores = [math.nan] * len(samples)
        for prompt_id, indices in groups.items():
            # Sorted: what the judge is shown does not depend on the order the candidates came in.
            answers = sorted({samples[i].response for i in indices})
            holders = [[i for i in indices if samples[i].response == answer] for answer in answers]
            prompt = samples[indices[0]].prompt
            if self.mode == "pointwise":
                for answer, held in zip(answers, holders):
                    judgements.append(PointwiseJudgement(self.template, prompt, answer))
                    targets.append([held])
            elif len(answers) == 1:
                for i in holders[0]:  # nothing to compare with: a tie with itself
                    scores[i] = 0.0
            else:
                judgements.append(ListwiseJudgement(self.template, prompt, answers, f"{self.seed}/{prompt_id}"))
                targets.append(holders)
        for result, held in zip(self.judge(judgements, [samples[t[0][0]].prompt_id for t in targets]), targets):
            for value, indices in zip(result or [math.nan] * len(held), held):
                for i in indices:
                    scores[i] = value
        return scores

    def judge(self, judgements: list[Any], prompt_ids: list[str]) -> list[list[float] | None]:
        """Each judgement's scores, asking again those whose reply does not parse; None for those that never did."""
        results: list[list[float] | None] = [None] * len(judgements)
        pending = list(range(len(judgements)))
        last_reply: dict[int, str] = {}
        for attempt in range(self.retries + 1):
            if not pending:
                break
            temperature = self.temperature if attempt == 0 else self.retry_temperature
            replies = self.engine.complete([judgements[j].ask(attempt) for j in pending], self.template.reply_prefix,
                                           self.template.stop, temperature)
            unread = []
            for j, reply in zip(pending, replies, strict=True):
                if reply is None:
                    self.too_long += 1  # asking again would not make it fit
                    log.warning("llm_judge: the judgement of prompt_id %r does not fit reward.judge.max_model_len; "
                                "scored NaN", prompt_ids[j])
                    continue
                self.calls += 1
                last_reply[j] = self.template.reply_prefix + reply
                results[j] = judgements[j].read(last_reply[j])
                if results[j] is None:
                    unread.append(j)
            pending = unread
        for j in pending:
            self.unparsed += 1
            log.warning("llm_judge: no parseable judgement of prompt_id %r in %d tries (scored NaN); last reply: %r",
                        prompt_ids[j], self.retries + 1, last_reply[j][:200])
        return results


# --- the vLLM engine --------------------------------------------------------------

class VllmJudge:
    """The judge model in a vLLM engine in this process (the reward actor), set up as
    pools/vllm_engines.py sets up the generation engines, which rewards/ may not import."""

    def __init__(self, path: str, seed: int, max_tokens: int, max_model_len: int, cpu_kv_cache_gib: int,
                 gpu_memory_utilization: float, dtype: str, trust_remote_code: bool):
        import torch

        # vLLM reads these when the engine starts. On CPU its default KV cache asks for most of the
        # host's memory; in-process (no engine-core child), the engine dies with the reward actor,
        # which the scorer kills after each call.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from transformers import AutoTokenizer
        from vllm import LLM

        from core.hardware import native_bf16

        if dtype == "auto":
            dtype = "bfloat16" if native_bf16() else "float32"
        # Eager: the actor lives for one stage, too short for compilation or CUDA graphs to pay off.
        args: dict[str, Any] = dict(model=path, seed=seed, max_model_len=max_model_len, dtype=dtype,
                                    enforce_eager=True, trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():
            args["gpu_memory_utilization"] = gpu_memory_utilization
        self.max_tokens, self.max_model_len = max_tokens, max_model_len
        self.llm = LLM(**args)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)

    def complete(self, messages: list[str], reply_prefix: str, stop: Sequence[str],
                 temperature: float) -> list[str | None]:
        from vllm import SamplingParams

        from core.chat_tokens import chat_token_ids, text_ids

        # Chat-rendered with each content as plain text: an answer that writes "<|im_end|>" cannot
        # close the judge's turn (core/chat_tokens.py).
        prefix = text_ids(self.tokenizer, reply_prefix) if reply_prefix else []
        requests, slots = [], []
        for n, message in enumerate(messages):
            ids = chat_token_ids(self.tokenizer, [{"role": "user", "content": message}]) + prefix
            if len(ids) + self.max_tokens <= self.max_model_len:
                requests.append({"prompt_token_ids": ids})
                slots.append(n)
        # No per-request seed: vLLM's CPU sampler refuses it; the engine's seed makes runs repeatable.
        params = SamplingParams(temperature=temperature, max_tokens=self.max_tokens, stop=list(stop) or None)
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        replies: list[str | None] = [None] * len(messages)
        for n, output in zip(slots, outputs, strict=True):
            replies[n] = output.outputs[0].text
        return replies
