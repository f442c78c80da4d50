"""Chunked sequence log-probs against the naive full log_softmax; tokenisation and collation."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pools.logprobs import collate, pack_lists, response_to_score, sequence_logprobs, tokenize_example

PAD = 0


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).float().eval()


def make_examples() -> list[tuple[list[int], int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [(5, 9), (3, 1), (8, 4), (2, 14)]  # (prompt, response): unequal, so rows are right-padded
    return [(torch.randint(1, 300, (p + r,), generator=generator).tolist(), p) for p, r in lengths]


def make_batch() -> dict[str, torch.Tensor]:
    return collate(make_examples(), pad_id=PAD)


def naive_logprobs(model, batch, average: bool) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    targets = batch["completion_mask"][:, 1:]
    totals = (logps * targets).sum(-1)
    return totals / targets.sum(-1) if average else totals


class Wrapper(nn.Module):
    """Stands in for DDP: forwards calls, keeps the model in ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_collate_masks():
    batch = collate([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 4096])
def test_matches_naive_full_log_softmax(tie, average, chunk_size):
    model, batch = tiny_llama(tie), make_batch()
    with torch.no_grad():
        expected = naive_logprobs(model, batch, average)
        got_no_grad = sequence_logprobs(model, batch, chunk_size=chunk_size, average=average)
    got = sequence_logprobs(model, batch, chunk_size=chunk_size, average=average)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_no_grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_gradients_match_naive(tie):
    model, batch = tiny_llama(tie), make_batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a generic upstream gradient

    (naive_logprobs(model, batch, average=False) * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    (sequence_logprobs(Wrapper(model), batch, chunk_size=5) * weights).sum().backward()

    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_only_the_last_chunk_keeps_vocab_sized_activations_for_backward():
    """Between forward and backward autograd holds one chunk's logits, the last one's (backward
    needs them first); every other chunk is recomputed."""
    model, batch = tiny_llama(True), make_batch()
    vocab_wide = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):  # weights (and views of them, like lm_head.weight.T) cost nothing extra
        storage = tensor.untyped_storage().data_ptr()
        if storage not in weights and 300 in tensor.shape:
            vocab_wide[storage] = tuple(tensor.shape)
        return tensor

    labels = int(batch["label_count"].sum())
    assert labels == 28  # 6 chunks of 5, the last one of 3
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logps = sequence_logprobs(model, batch, chunk_size=5)
    logps.sum().backward()
    assert list(vocab_wide.values()) == [(3, 300)]


def test_padding_does_not_change_a_row():
    model, examples = tiny_llama(False), make_examples()
    with torch.no_grad():
        together = sequence_logprobs(model, collate(examples, PAD), chunk_size=4)
        for i, example in enumerate(examples):
            alone = collate([example], PAD)
            torch.testing.assert_close(sequence_logprobs(model, alone)[0], together[i], atol=1e-5, rtol=1e-5)


def make_lists() -> list[list[tuple[list[int], int]]]:
    """Three lists: two share their prompts (of different lengths), the third's items have
    different prompts, so it is packed as whole items."""
    generator = torch.Generator().manual_seed(2)
    tokens = lambda n: torch.randint(1, 300, (n,), generator=generator).tolist()  # noqa: E731
    first, second = tokens(5), tokens(3)
    return [[(first + tokens(r), 5) for r in (4, 9, 1)],
            [(second + tokens(r), 3) for r in (7, 2)],
            [(tokens(6), 2), (tokens(8), 3)]]


def test_pack_lists_layout():
    batch = pack_lists([[([7, 8, 9, 10], 2), ([7, 8, 11], 2)], [([5, 6], 1), ([4, 3, 2], 2)]], pad_id=PAD)
    # Row 0: the prompt 7 8 once, then 9 10 and 11; row 1: no shared prompt, whole items, then padding.
    assert batch["input_ids"].tolist() == [[7, 8, 9, 10, 11], [5, 6, 4, 3, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 1, 2]]
    allowed = batch["attention_mask"][:, 0].int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],
                          [1, 1, 1, 1, 0],
                          [1, 1, 0, 0, 1]]  # the second response sees the prompt, not the first response
    assert allowed[1] == [[1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0],
                          [0, 0, 1, 0, 0],
                          [0, 0, 1, 1, 0],
                          [0, 0, 1, 1, 1]]
    # Labels in item order: 9 10 (predicted by positions 1, 2), 11 (by 1), 6 (by row 1's 0), 2 (by its 3).
    assert batch["labels"].tolist() == [9, 10, 11, 6, 2]
    assert batch["label_index"].tolist() == [1, 2, 1, 5 + 0, 5 + 3]
    assert batch["label_item"].tolist() == [0, 0, 1, 2, 3]
    assert batch["label_count"].tolist() == [2, 1, 1, 1]


def test_pack_lists_pads_rows_and_lets_padding_see_itself():
    batch = pack_lists([[([1, 2, 3], 1)], [([4, 5, 6, 7, 8], 1)]], pad_id=PAD)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, PAD, PAD]
    allowed = batch["attention_mask"][0, 0]
    assert allowed[3].tolist() == [False, False, False, True, False]
    assert not allowed[:3, 3:].any()  # real tokens never see padding
    assert allowed.any(-1).all()  # no empty attention row (NaN in softmax)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_lists_match_one_row_per_item(attention, average):
    model, lists = tiny_llama(True), make_lists()
    model.config._attn_implementation = attention
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25])  # a generic upstream gradient

    expected = sequence_logprobs(model, collate([item for items in lists for item in items], PAD), 4, average)
    (expected * weights).sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    got = sequence_logprobs(model, pack_lists(lists, PAD), 4, average)
    (got * weights).sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_lists_need_an_attention_that_takes_a_mask():
    model = tiny_llama(True)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="train.share_prompt"):
        sequence_logprobs(model, pack_lists(make_lists(), PAD))


class CharTokenizer:
    """The few tokenizer methods tokenize_example uses; one token per character, eos = 2."""

    eos_token_id = 2
    bos_token_id = 1

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + [ord(c) for c in text]


MESSAGES = [{"role": "user", "content": "hi?"}]
PROMPT = "<user>hi?|<assistant>"


def test_tokenize_example_layout():
    ids, num_prompt = tokenize_example(CharTokenizer(), MESSAGES, "ok", max_length=100)
    assert num_prompt == len(PROMPT)
    assert ids == [ord(c) for c in PROMPT] + [ord("o"), ord("k"), 2]  # no extra bos, eos at the end


def test_tokenize_example_truncates_the_response_only():
    tokenizer = CharTokenizer()
    ids, num_prompt = tokenize_example(tokenizer, MESSAGES, "abcdef", max_length=len(PROMPT) + 3)
    assert ids == [ord(c) for c in PROMPT + "abc"] and num_prompt == len(PROMPT)
    # Exactly one token of room: the first response token survives.
    ids, _ = tokenize_example(tokenizer, MESSAGES, "abcdef", max_length=len(PROMPT) + 1)
    assert ids[-1] == ord("a")
    # Room for everything: eos kept.
    ids, _ = tokenize_example(tokenizer, MESSAGES, "abcdef", max_length=len(PROMPT) + 7)
    assert ids[-1] == 2


def test_sampled_ids_are_scored_as_they_are():
    tokenizer = CharTokenizer()
    # A finished answer ends with the stop token the engine emitted, which need not be eos
    # (Gemma's <end_of_turn>, Llama-3's <|eot_id|>): nothing is replaced or added.
    ids, num_prompt = tokenize_example(tokenizer, MESSAGES, [5, 6, 107], max_length=100)
    assert ids[num_prompt:] == [5, 6, 107]
    # A truncated answer (max_tokens) gets no end-of-answer token.
    ids, num_prompt = tokenize_example(tokenizer, MESSAGES, [5, 6, 7], max_length=100)
    assert ids[num_prompt:] == [5, 6, 7] and 2 not in ids[num_prompt:]
    # Ids that are not what the text tokenizes to are still the ones scored.
    ids, num_prompt = tokenize_example(tokenizer, MESSAGES, [ord("o"), ord("k")], max_length=100)
    assert ids[num_prompt:] == [ord("o"), ord("k")]
    ids, _ = tokenize_example(tokenizer, MESSAGES, [5, 6, 7, 8], max_length=len(PROMPT) + 2)
    assert ids[len(PROMPT):] == [5, 6]


def test_rows_without_ids_are_scored_from_their_text():
    # Lists made before response_token_ids existed: the text, and eos, as they were trained then.
    assert response_to_score({"response": "ok", "response_token_ids": None}) == "ok"
    assert response_to_score({"response": "ok"}) == "ok"
    assert response_to_score({"response": "ok", "response_token_ids": [5, 2]}) == [5, 2]


def test_tokenize_example_rejects_an_overlong_prompt():
    with pytest.raises(ValueError):
        tokenize_example(CharTokenizer(), MESSAGES, "ok", max_length=len(PROMPT))


SMOLLM = Path(__file__).resolve().parents[1] / ".cache/models/smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOLLM / "tokenizer_config.json").exists(), reason="SmolLM2 tokenizer not prepared")
def test_tokenize_example_with_smollm2():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    ids, num_prompt = tokenize_example(tokenizer, MESSAGES, "Hello there.", max_length=512)
    assert ids[-1] == tokenizer.eos_token_id == 2  # <|im_end|> closes the turn
    assert tokenizer.decode(ids[:num_prompt]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[num_prompt:]) == "Hello there.<|im_end|>"
