"""Model reward: a Hugging Face sequence-classification reward model with one output.

The kind of reward model in the literature (Skywork-Reward, FsfairX-LLaMA3-RM):
the prompt's chat plus the response, rendered by the reward model's own chat
template, goes through `AutoModelForSequenceClassification` (num_labels 1) and
the logit it reads at the last real token is the reward.

An encoder reward model without a chat template (the DeBERTa-v3 reward models of
OpenAssistant) reads a text pair instead, as it was trained: the prompt's messages'
contents joined by blank lines, then the response; the score is its [CLS] logit.
A decoder reward model without a chat template is refused in one line.

Scoring follows open-instruct: sort by length so that a batch holds sequences
of about the same length (little padding), and halve the batch when it runs out
of memory instead of failing the round. A reward does not depend on its batch:
each row is padded with an id no row of the batch holds (batch_pad_id), so every
row is read at its own last token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from core.chat_tokens import chat_token_ids
from core.errors import ConfigError, PipelineError
from rewards.base import Sample, register_reward
from rewards.batching import HalvingBatches, locate

log = logging.getLogger("rewards.hf_classifier")

MISSING_MODEL = ("config key 'reward.model' must name the reward model for hf_classifier "
                 "(a local checkpoint directory or a hub id in the local HF cache)")

# Encoders that read a (prompt, response) text pair when their tokenizer has no chat template.
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "modernbert"})

# RewardConfig keys this reward takes (see `from_config`), under their __init__ names.
CONFIG_KEYS = {"model": "model", "micro_batch_size": "batch_size", "max_length": "max_length",
               "dtype": "dtype", "trust_remote_code": "trust_remote_code"}


@register_reward("hf_classifier")
class HFClassifierReward(HalvingBatches):
    name = "hf_classifier"

    def __init__(self, model: str = "", batch_size: int = 16, max_length: int = 2048, dtype: str = "auto",
                 trust_remote_code: bool = False, device: str | None = None):
        # torch and transformers load here, not at import: importing rewards/ is
        # how a config is validated, and that must stay cheap.
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not model:
            raise ConfigError(MISSING_MODEL)
        self.path, self.device = locate(model, device)
        self.batch_size = batch_size
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True,
                                                           trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"reward model {self.path} (reward.model): no usable tokenizer: "
                                f"{_first_line(exc)}") from exc
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(self.path, local_files_only=True,
                                                    trust_remote_code=trust_remote_code).model_type
        except (OSError, ValueError) as exc:
            raise PipelineError(f"reward model {self.path} (reward.model) does not load as a sequence classifier: "
                                f"{_first_line(exc)}") from exc
        self.text_pairs = not self.tokenizer.chat_template
        if self.text_pairs and model_type not in ENCODER_TYPES:
            raise PipelineError(f"reward model {self.path} (reward.model) has no chat template in its tokenizer; "
                                "hf_classifier renders prompt and response with it (only encoders such as "
                                "DeBERTa read a plain text pair)")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                self.path, local_files_only=True, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype),
            ).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise PipelineError(f"reward model {self.path} (reward.model) does not load as a sequence classifier: "
                                f"{_first_line(exc)}") from exc
        if self.model.config.num_labels != 1:
            raise PipelineError(f"reward model {self.path} (reward.model) has {self.model.config.num_labels} "
                                "labels; hf_classifier needs a single-score model (num_labels 1)")
        self.pad_id = self._pad_token_id()

    @classmethod
    def from_config(cls, settings: dict[str, Any]) -> HFClassifierReward:
        return cls(**{arg: settings[key] for key, arg in CONFIG_KEYS.items() if key in settings})

    def score(self, samples: Sequence[Sample]) -> list[float]:
        encoded = [self.encode(sample) for sample in samples]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        return self.in_batches(encoded, order)

    def encode(self, sample: Sample) -> list[int]:
        """Token ids of the sample's chat, rendered by the reward model's template."""
        if self.text_pairs:
            question = "\n\n".join(m["content"] for m in sample.prompt)
            # The score is read at [CLS]; a pair too long loses the start of the question first.
            # A "[SEP]" written in the text stays text: only the tokenizer's own marks the pair's parts.
            return self.tokenizer(question, sample.response, truncation="only_first", max_length=self.max_length,
                                  split_special_tokens=True)["input_ids"]
        messages = [{"role": m["role"], "content": m["content"]} for m in sample.prompt]
        # Each content is plain text, so that a prompt or answer cannot write turns of its own.
        ids = chat_token_ids(self.tokenizer, messages, answer=sample.response)
        # The score is read at the last token, so a chat that is too long keeps its end.
        return ids[-self.max_length:]

    def forward(self, batch: list[list[int]]) -> list[float]:
        """Rewards of a batch of token-id sequences (padded on the right here)."""
        import torch

        width = max(len(ids) for ids in batch)
        pad_id = self.batch_pad_id(batch)
        self.model.config.get_text_config().pad_token_id = pad_id
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()

    def batch_pad_id(self, batch: list[list[int]]) -> int:
        """A pad id that no sequence of the batch holds.

        A decoder classifier reads each row at its last token that is not the pad id. Many reward
        models pad with their end-of-turn token (Llama-3's <|eot_id|>), which also ends every
        chat: padding with it would read the score one token early, and only in rows that were
        not the batch's longest, so a reward would depend on its batch. Any id the batch does not
        hold is safe: padded positions are masked, and come after every real token.
        """
        used = {token for ids in batch for token in ids}
        if self.pad_id not in used:
            return self.pad_id
        return next(token for token in range(len(used) + 1) if token not in used)

    def _pad_token_id(self) -> int:
        # The classifier reads each row at its last token that is not padding,
        # so the model must know the pad id; many reward models leave it unset.
        config = self.model.config
        pad_id = config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise PipelineError(f"reward model {self.path} (reward.model) defines neither a pad nor an eos token")
        config.pad_token_id = pad_id
        return pad_id


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
