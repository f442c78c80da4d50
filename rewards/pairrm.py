"""Pairwise reward: a PairRM cross-encoder compares a prompt's candidates two at a time.

PairRM (llm-blender, "LLM-Blender", ACL 2023; checkpoint llm-blender/PairRM-hf) is DeBERTa-v3-large
read as a cross-encoder: one sequence holds the source (the instruction) and two candidate answers,
each part opened by a marker token and encoded on its own by the tokenizer, so each carries its own
[CLS] ... [SEP]:

    [CLS] <|source|> source [SEP] [CLS] <|candidate1|> answer A [SEP] [CLS] <|candidate2|> answer B [SEP]

The encoder's last hidden states at the three markers feed one MLP, `head_layer`, twice:
head(source ++ A) - head(source ++ B) is the logit that A beats B. Our `DebertaV2PairRM` is
transformers' `DebertaV2Model` under the attribute `pretrained_model` plus a `head_layer` Sequential
laid out as llm-blender's, so PairRM's checkpoints load with their own parameter names, and so do
the tiny ones `build_tiny_pairrm` writes for tests. The llm-blender package itself is not used: it
pins its own stack (deepspeed, protobuf<=3.20.1, BLEURT from git) and imports names that
transformers 5 removed.

Every ordered pair of a prompt's distinct candidates is compared, in both orders, so that the
model's preference for one side of the sequence cancels: K(K-1) comparisons for K distinct
answers. Candidates whose token ids are equal after truncation are one answer to the model; they
are never compared with each other (the answer would only be compared with itself) and share
every other comparison, so they get exactly equal scores.

The comparisons become scores by `pairwise_scores`: the mean antisymmetrised logit, which is
llm-blender's own aggregation ("max_logits"), halved to stay on one comparison's logit scale.
With every pair compared it is the least-squares fit of s_i - s_j to the logits, so the scores of
a consistent comparison matrix are its Bradley-Terry strengths (up to a shared shift), in closed
form: unlike a Bradley-Terry maximum-likelihood fit, nothing iterates, and a candidate that wins
every comparison gets a finite score instead of one that diverges. Score differences read as
log-odds, so reward margins (lists.min_margin) keep a meaning.

A prompt's candidates must all come in one `score` call: scores are relative to the other
candidates of the same call, grouped by `Sample.prompt_id`, and a prompt split across calls gets
scores that do not compare. A prompt with a single candidate scores 0.

Batches of pairs are sorted by length, longest first, and halved on out-of-memory as in
hf_classifier. `comparisons` counts the pairs the model has scored, for the stage to log.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigError, PipelineError
from rewards.base import Sample, register_reward
from rewards.batching import HalvingBatches, locate

log = logging.getLogger("rewards.pairrm")

ARCHITECTURE = "DebertaV2PairRM"
SOURCE_PREFIX = "<|source|>"
CAND1_PREFIX = "<|candidate1|>"
CAND2_PREFIX = "<|candidate2|>"
# Unused when comparing, but PairRM's tokenizer and config carry it; the tiny checkpoint does too.
CAND_PREFIX = "<|candidate|>"
# Config keys of PairRM's checkpoint that hold the marker ids, by marker.
PREFIX_ID_KEYS = {SOURCE_PREFIX: "source_prefix_id", CAND1_PREFIX: "cand1_prefix_id",
                  CAND2_PREFIX: "cand2_prefix_id", CAND_PREFIX: "cand_prefix_id"}
# PairRM's own limits (llm-blender/PairRM ranker_config.json; PairRM-hf's tokenize_pair defaults).
SOURCE_MAX_LENGTH = 1224
CANDIDATE_MAX_LENGTH = 412
# [CLS], the marker and [SEP]: a shorter limit would cut the marker the head reads.
MIN_PART_LENGTH = 3

MISSING_MODEL = ("config key 'reward.model' must name the PairRM checkpoint for pairrm "
                 "(a local checkpoint directory or a hub id in the local HF cache)")


def pairwise_scores(logits: Sequence[Sequence[float]]) -> list[float]:
    """Per-candidate scores from a K x K matrix of comparison logits.

    logits[i][j] is the logit that candidate i, read first, beats candidate j, read second; the
    diagonal is ignored. d_ij = (logits[i][j] - logits[j][i]) / 2 cancels a constant advantage of
    either side, and score_i = sum_j d_ij / K, the least-squares solution of s_i - s_j = d_ij
    with scores summing to zero. Two candidates whose rows and columns hold the same values, with
    equal logits between them, get equal scores to the last bit: the sums are exactly rounded,
    so their order does not matter.
    """
    k = len(logits)
    scores = []
    for i in range(k):
        terms = [(logits[i][j] - logits[j][i]) / 2 for j in range(k) if j != i]
        # fsum refuses inf - inf; a plain sum lets NaN and inf through to the caller's on_invalid.
        total = math.fsum(terms) if all(map(math.isfinite, terms)) else sum(terms)
        scores.append(total / k if k else 0.0)
    return scores


def pair_ids(source_ids: list[int], cand1_ids: list[int], cand2_ids: list[int]) -> list[int]:
    """One comparison's input ids: PairRM concatenates the separately encoded parts."""
    return source_ids + cand1_ids + cand2_ids


def candidate_budget(source_len: int, source_max_length: int, candidate_max_length: int) -> int:
    """Tokens each candidate may hold: PairRM hands the room a short source leaves to the candidates."""
    return (source_max_length + 2 * candidate_max_length - source_len) // 2


@functools.cache
def pairrm_class():
    """`DebertaV2PairRM`, built on first use so that importing rewards/ does not import torch."""
    import torch
    from torch import nn
    from transformers import DebertaV2Model
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2PreTrainedModel

    class DebertaV2PairRM(DebertaV2PreTrainedModel):
        """PairRM's model: state-dict keys `pretrained_model.*` and `head_layer.{1,4}.*`."""

        base_model_prefix = "pretrained_model"

        def __init__(self, config):
            super().__init__(config)
            self.pretrained_model = DebertaV2Model(config)
            hidden = config.hidden_size
            dropout = getattr(config, "drop_out", 0.05)
            # The indices are the checkpoint's key names: head_layer.1 and head_layer.4 hold the weights.
            self.head_layer = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(2 * hidden, hidden),
                nn.Tanh(),
                nn.Dropout(dropout),
                nn.Linear(hidden, getattr(config, "n_tasks", 1)),
            )
            self.post_init()

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """The logit that candidate 1 beats candidate 2, one per row (each row holds each marker once)."""
            states = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)

            def at(token_id: int) -> torch.Tensor:
                return states[rows, (input_ids == token_id).int().argmax(dim=1)]

            source = at(self.config.source_prefix_id)
            left = self.head_layer(torch.cat([source, at(self.config.cand1_prefix_id)], dim=-1))
            right = self.head_layer(torch.cat([source, at(self.config.cand2_prefix_id)], dim=-1))
            # PairRM averages its tasks' logits; its checkpoint has one.
            return (left - right).mean(dim=-1)

    return DebertaV2PairRM


@register_reward("pairrm")
class PairwiseRanker(HalvingBatches):
    """Scores each sample against the other samples of its prompt in the same call (see the module's docstring)."""

    name = "pairrm"
    UNIT = "pair"
    TOO_BIG = "lower reward.pairrm.source_max_length or candidate_max_length"
    # For the scorer: a prompt's candidates must reach one `score` call together.
    needs_whole_prompts = True

    def __init__(self, model: str = "", batch_size: int = 16, source_max_length: int = SOURCE_MAX_LENGTH,
                 candidate_max_length: int = CANDIDATE_MAX_LENGTH, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if not model:
            raise ConfigError(MISSING_MODEL)
        for key, value in (("source_max_length", source_max_length), ("candidate_max_length", candidate_max_length)):
            if value < MIN_PART_LENGTH:
                raise ConfigError(f"config key 'reward.pairrm.{key}' must be at least {MIN_PART_LENGTH}, not {value}")
        if batch_size < 1:
            raise ConfigError(f"config key 'reward.micro_batch_size' must be positive, not {batch_size}")
        self.path, self.device = locate(model, device)
        self.batch_size = batch_size
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        self.comparisons = 0
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"reward model {self.path} (reward.model) does not load: {_first_line(exc)}") from exc
        self._check_markers(config)
        # Strings the tokenizer would read as its own tokens; inside an answer they are text (see `_clean`).
        self.reserved = sorted(set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()),
                               key=len, reverse=True)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        try:
            loaded, info = pairrm_class().from_pretrained(self.path, config=config, local_files_only=True,
                                                          dtype=getattr(torch, dtype), output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"reward model {self.path} (reward.model) does not load as PairRM: "
                                f"{_first_line(exc)}") from exc
        # A missing head would be filled with random weights without a word: refuse it.
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise PipelineError(f"reward model {self.path} (reward.model) lacks PairRM weights: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        self.model = loaded.to(self.device).eval()

    @classmethod
    def from_config(cls, settings: dict[str, Any]) -> PairwiseRanker:
        options = settings.get("pairrm") or {}
        kwargs: dict[str, Any] = {"model": settings.get("model", "")}
        for key, arg in (("micro_batch_size", "batch_size"), ("dtype", "dtype")):
            if key in settings:
                kwargs[arg] = settings[key]
        for key in ("source_max_length", "candidate_max_length"):
            if key in options:
                kwargs[key] = options[key]
        return cls(**kwargs)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        rows: dict[tuple[int, ...], int] = {}
        plans = []
        for indices in group_by_prompt(samples).values():
            source_ids, cand1, cand2 = self.encode_group(source_text(samples[indices[0]]),
                                                         [samples[i].response for i in indices])
            k = len(indices)
            # cells[i][j]: the row of "i first, j second"; rows met twice (here or in another prompt) run once.
            cells: list[list[int | None]] = [[None] * k for _ in range(k)]
            for i in range(k):
                for j in range(k):
                    if cand1[i] != cand1[j]:
                        cells[i][j] = rows.setdefault(tuple(pair_ids(source_ids, cand1[i], cand2[j])), len(rows))
            plans.append((indices, cells))
        logits = self.compare([list(row) for row in rows])
        scores = [0.0] * len(samples)
        for indices, cells in plans:
            # Not compared: the same answer twice, or the diagonal; 0 is a tie either way.
            matrix = [[0.0 if cell is None else logits[cell] for cell in line] for line in cells]
            for i, value in zip(indices, pairwise_scores(matrix), strict=True):
                scores[i] = value
        return scores

    def encode_group(self, source: str, responses: list[str]) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """A prompt's source ids and each response's ids as candidate 1 and as candidate 2, as PairRM's tokenize_pair.

        Each part is encoded alone, marker first, with the tokenizer's [CLS] and [SEP], and cut at its
        end: the source at source_max_length, each candidate at the room the source leaves. Only
        texts that write one of the tokenizer's own tokens differ from tokenize_pair's (see `_clean`).
        """
        source_ids = self._encode(SOURCE_PREFIX + self._clean(source), self.source_max_length)
        budget = candidate_budget(len(source_ids), self.source_max_length, self.candidate_max_length)
        cand1 = [self._encode(CAND1_PREFIX + self._clean(r), budget) for r in responses]
        cand2 = [self._encode(CAND2_PREFIX + self._clean(r), budget) for r in responses]
        return source_ids, cand1, cand2

    def compare(self, rows: list[list[int]]) -> list[float]:
        """The comparison logit of each row, in order: length-sorted batches, halved on out-of-memory."""
        # Longest first: the batch most likely to run out of memory comes first, and a halved batch
        # size then holds for the rest. Ties go by the ids, so that batches do not depend on the
        # order the candidates came in.
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), rows[i]))
        return self.in_batches(rows, order)

    def batch_done(self, rows: int) -> None:
        self.comparisons += rows

    def forward(self, batch: list[list[int]]) -> list[float]:
        """Comparison logits of a batch of pair ids (padded on the right here)."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return logits.float().cpu().tolist()

    def _encode(self, text: str, max_length: int) -> list[int]:
        return self.tokenizer(text, max_length=max_length, truncation=True)["input_ids"]

    def _clean(self, text: str) -> str:
        # An answer that writes "<|candidate2|>" or "[SEP]" must not add a marker the head would read,
        # or a separator: llm-blender's collator blanks its separator in texts the same way.
        for token in self.reserved:
            text = text.replace(token, " ")
        return text

    def _check_markers(self, config) -> None:
        """A PairRM checkpoint whose tokenizer and config agree on the markers' ids, which the head reads at."""
        if ARCHITECTURE not in (getattr(config, "architectures", None) or []):
            raise PipelineError(f"reward model {self.path} (reward.model) is not a PairRM checkpoint: its config.json "
                                f"names architectures {getattr(config, 'architectures', None)}, not [{ARCHITECTURE!r}]")
        for marker, key in PREFIX_ID_KEYS.items():
            expected = getattr(config, key, None)
            actual = self.tokenizer.convert_tokens_to_ids(marker)
            if expected is None or actual != expected or actual == self.tokenizer.unk_token_id:
                raise PipelineError(f"reward model {self.path} (reward.model): the tokenizer's id for {marker} is "
                                    f"{actual}, config.json's {key} is {expected}")


def group_by_prompt(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Indices of the samples of each prompt, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.prompt_id, []).append(i)
    return groups


def source_text(sample: Sample) -> str:
    """PairRM's source, the instruction as text: the prompt's messages joined by blank lines (as hf_classifier)."""
    return "\n\n".join(m["content"] for m in sample.prompt)


# A few whole words, so that the test texts are not all single characters.
TINY_WORDS = ("the a an is are was and or of to in on it that this for with you your be not yes no good bad "
              "best answer question tea water cup warm green black leaves steep morning slowly paris france "
              "capital city").split()


# DeBERTa's std of 0.02 leaves a random encoder's marker states nearly blind to the answers,
# and so every logit nearly 0: the tiny model's candidates would hardly be told apart.
TINY_INIT_STD = 0.2


def build_tiny_pairrm(path: str | Path, seed: int = 0) -> Path:
    """Save a random-weight PairRM (2 layers, hidden 64) with PairRM's config keys and weight names.

    The tokenizer is a DeBERTa-v2 one (transformers' DebertaV2Tokenizer, a Unigram model) built
    from a small vocabulary here, laid out as DeBERTa-v3's: [PAD] [CLS] [SEP] [UNK] first, [MASK]
    after the pieces, then PairRM's four markers added as tokens, so that config.json's
    *_prefix_id keys point at them as in llm-blender/PairRM-hf.
    """
    import torch
    from transformers import DebertaV2Config, DebertaV2Tokenizer

    path = Path(path)
    # Printable ASCII, alone and word-initial: every test text tokenizes without [UNK].
    pieces = sorted({chr(c) for c in range(33, 127)} | {"▁" + chr(c) for c in range(33, 127)} | {"▁"})
    vocab = ([("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0)]
             + [(piece, -8.0 if len(piece) == 1 else -6.0) for piece in pieces]
             + [("▁" + word, -2.0) for word in TINY_WORDS] + [("[MASK]", 0.0)])
    tokenizer = DebertaV2Tokenizer(vocab=vocab)
    tokenizer.add_tokens([SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX])
    config = DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512, max_relative_positions=-1, position_buckets=256, relative_attention=True,
        norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, initializer_range=TINY_INIT_STD, pad_token_id=tokenizer.pad_token_id,
        n_tasks=1, drop_out=0.05,
        **{key: tokenizer.convert_tokens_to_ids(marker) for marker, key in PREFIX_ID_KEYS.items()},
    )
    torch.manual_seed(seed)
    model = pairrm_class()(config)
    model.config.architectures = [ARCHITECTURE]
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
