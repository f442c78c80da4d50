"""GPU check: what the trainer, the reference stage and the reward model compute on a lent device.

One script for a machine that has torch, transformers, peft, pyarrow and accelerate but neither Ray
nor vLLM (and no network), sized to finish well under 8 minutes on one H100. Each part is timed and
checked; a failed check is one line (and a non-zero exit), a part that cannot run is reported as
skipped, never as passed.

  logprob_parity   every family of tests/tiny_families.py: our sequence log-probs (pools/logprobs.py) in
                   fp32 against the model's own logits (tolerance LOGPROB_TOLERANCE[float32] of
                   pools/logprob_scorer.py, both batch layouts), and in bf16 (autocast over fp32 weights,
                   as train.autocast runs, and bf16 weights, as train.dtype bfloat16 loads) against fp32
                   (tolerance LOGPROB_TOLERANCE[bfloat16], nats per response token)
  train_step       a ~1.24B-parameter random-weight Llama (Llama-3.2-1B's shape) trained as the trainer
                   does (list_scores + the dpo objective, AdamW, bf16 autocast, gradient checkpointing):
                   tokens/s and model FLOPs utilization (MFU only on a GPU whose bf16 dense peak is known)
  fsdp             FSDP2 on one rank (gloo on CPU, nccl on GPU): the trainer's shard_model with FSDP's
                   default precision and with MixedPrecisionPolicy(bf16 params, fp32 reduce), both under
                   bf16 autocast as the trainer runs them, one step each, against the unsharded step on
                   the same weights and lists
  reward_invariance  rewards/hf_classifier.py with a random sequence classifier: scores of batches of 1
                   against padded batches of 8, in fp32 and in bf16
  trl_dpo          TRL's DPOTrainer on the same pairs as ours: its log-probs, DPO loss and gradients against
                   sequence_logprobs + OBJECTIVES["dpo"]. TRL is imported if installed, else from the wheels
                   of --trl-wheel (a .whl or a folder of them) or vendor/; TRL needs `datasets` (and its
                   dependencies), so carry those wheels too where the machine lacks them

Usage: python bench/gpu_check.py [--device cuda|cpu] [--quick] [--out FILE] [--parts a,b] [--trl-wheel PATH]
The results go to --out (default docs/bench/gpu-check.json on cuda; nowhere on CPU unless given). The
JSON records whether `ray` or `vllm` were imported by the end (the `imports` check fails if so).

The modules it imports (pools/logprobs.py, pools/logprob_scorer.py, stages/train/loop.py, ...) import
Ray and vLLM only inside the functions that run them, never at module level.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
import traceback
import types
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_OUT = REPO_ROOT / "docs/bench/gpu-check.json"
PARTS = ("logprob_parity", "train_step", "fsdp", "reward_invariance", "trl_dpo")
BETA = 0.1

# bf16 dense tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),       # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)

# Llama-3.2-1B's shape, random weights: 1.236e9 parameters (tied head).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=True)
LLAMA_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False)

SIZES = {
    "full": dict(vocab=49152, parity_prompt=64, parity_responses=(48, 96, 33),
                 train_model=LLAMA_1B, train_lists=8, train_prompt=256, train_response=768, train_warmup=1,
                 train_steps=4, chunk_size=1024,
                 fsdp_model=LLAMA_1B, fsdp_lists=4, fsdp_prompt=128, fsdp_response=256,
                 reward_samples=32, trl_model=dict(LLAMA_TINY, hidden_size=256, intermediate_size=512,
                                                   num_attention_heads=4, head_dim=64),
                 trl_pairs=8),
    "quick": dict(vocab=4096, parity_prompt=12, parity_responses=(9, 14, 6),
                  train_model=LLAMA_TINY, train_lists=2, train_prompt=16, train_response=24, train_warmup=1,
                  train_steps=1, chunk_size=64,
                  fsdp_model=LLAMA_TINY, fsdp_lists=2, fsdp_prompt=8, fsdp_response=12,
                  reward_samples=12, trl_model=LLAMA_TINY, trl_pairs=3),
}


class CheckFailed(Exception):
    """A check that did not hold: its message is the one-line reason."""


class Skipped(Exception):
    """A part that could not run here: its message says why."""


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


# ---------------------------------------------------------------------------------------------------
# Our code, without Ray


def load_by_path(name: str, relative: str) -> types.ModuleType:
    """A module of tests/ (not a package) by its path."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


FORBIDDEN = ("ray", "vllm")


def our_code() -> types.SimpleNamespace:
    """The pipeline's functions this check runs, none of them importing Ray or vLLM."""
    from core.objectives import OBJECTIVES
    from pools.logprobs import list_batch, sequence_logprobs, tokenize_example
    from stages.train.data import ListExample
    from stages.train.optim import build_optimizer

    from pools.logprob_scorer import LOGPROB_TOLERANCE, attention_for, logprob_gap, pad_token_id
    from stages.train.loop import list_scores, shard_model

    return types.SimpleNamespace(
        OBJECTIVES=OBJECTIVES, list_batch=list_batch, sequence_logprobs=sequence_logprobs,
        tokenize_example=tokenize_example, ListExample=ListExample, build_optimizer=build_optimizer,
        LOGPROB_TOLERANCE=LOGPROB_TOLERANCE, logprob_gap=logprob_gap, pad_token_id=pad_token_id,
        attention_for=attention_for, list_scores=list_scores, shard_model=shard_model,
        families=load_by_path("gpu_check_tiny_families", "tests/tiny_families.py"),
        reward_model=load_by_path("gpu_check_tiny_reward_model", "tests/tiny_reward_model.py"),
    )


# ---------------------------------------------------------------------------------------------------
# TRL, installed or from a carried wheel


def wheel_is_pure(path: Path) -> bool:
    """A wheel whose platform tag is `any` (pure Python: it imports from the zip itself)."""
    return path.name[:-len(".whl")].split("-")[-1] == "any"


def import_trl(wheel: str | None, scratch: Path) -> tuple[types.ModuleType | None, str]:
    """TRL, and how it was found; or None and why not (the TRL part is then skipped)."""
    try:
        import trl
        from trl import DPOConfig, DPOTrainer  # noqa: F401 - its lazy imports (datasets) must work too

        return trl, f"installed ({trl.__version__})"
    except Exception as exc:  # noqa: BLE001 - transformers' lazy modules wrap an ImportError in a RuntimeError
        installed_error = one_line(exc)
    places = [Path(wheel)] if wheel else []
    places.append(REPO_ROOT / "vendor")
    wheels = []
    for place in places:
        if place.is_file() and place.name.endswith(".whl"):
            wheels.append(place)
        elif place.is_dir():
            wheels += sorted(place.glob("*.whl"))
    if wheel and not Path(wheel).exists():
        return None, f"--trl-wheel {wheel} does not exist (and trl is not installed: {installed_error})"
    if not any(w.name.lower().startswith("trl-") for w in wheels):
        where = f"{wheel} or vendor/" if wheel else "vendor/ (or give --trl-wheel FILE|DIR)"
        return None, f"trl is not installed ({installed_error}) and no trl-*.whl in {where}"
    added = []
    for path in wheels:
        if wheel_is_pure(path):
            entry = str(path.resolve())  # a pure wheel is a zip that imports as it is
        else:
            # Extension modules cannot load from a zip: unpack platform wheels.
            target = scratch / "wheels" / path.name
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target)
            entry = str(target)
        if entry not in sys.path:
            sys.path.append(entry)  # after the installed packages, which keep precedence
        added.append(path.name)
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        del sys.modules[name]  # a failed first import may have left half of it
    try:
        import trl
        from trl import DPOConfig, DPOTrainer  # noqa: F401,F811

        return trl, f"from wheel(s) {', '.join(added)} ({trl.__version__})"
    except Exception as exc:  # noqa: BLE001 - as above
        return None, (f"trl from wheel(s) {', '.join(added)} does not import here: {one_line(exc)} "
                      "(carry the wheels of its dependencies too, e.g. datasets, dill, multiprocess, xxhash, fsspec)")


# ---------------------------------------------------------------------------------------------------
# Shared set-up


def synthetic_tokenizer(out: Path, vocab_size: int) -> Path:
    """A word-level tokenizer of `vocab_size` ids (no hub here): the tiny families' special tokens at
    their SmolLM2 ids (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2: eos and pad, as SmolLM2-Instruct),
    then the words system, user, assistant and w6, w7, ..., and a ChatML-like chat template."""
    if (out / "tokenizer_config.json").is_file():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = ["system", "user", "assistant"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out


def words(rng: random.Random, count: int, vocab_size: int) -> str:
    return " ".join(f"w{rng.randrange(6, vocab_size)}" for _ in range(count))


def random_ids(rng: random.Random, count: int, vocab_size: int) -> list[int]:
    return [rng.randrange(6, vocab_size) for _ in range(count)]


def build_llama(shape: dict, device, seed: int):
    """A random-weight LlamaForCausalLM of `shape`, fp32, made on `device` directly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=2, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.float()


def pair_lists(code, rng: random.Random, count: int, prompt: int, response: int, vocab_size: int) -> list:
    """`count` ListExamples of two responses (a little shorter and longer than `response`) to one prompt."""
    examples = []
    for index in range(count):
        prompt_ids = random_ids(rng, prompt, vocab_size)
        items = [(prompt_ids + random_ids(rng, length, vocab_size), prompt)
                 for length in (response + response // 8, response - response // 8)]
        examples.append(code.ListExample(f"p{index}", items, [0.0, 0.0], [1.0, 0.0]))
    return examples


class PadOnly:
    """What list_scores reads of a tokenizer: its pad id."""

    pad_token_id = 2
    eos_token_id = 2


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_token_gap(a: list[float], b: list[float], lengths: list[int]) -> float:
    """The largest |a - b| / response tokens over items, as check_logprob_path measures it."""
    return max(abs(x - y) / n for x, y, n in zip(a, b, lengths, strict=True))


def matmul_params(model) -> tuple[int, int]:
    """Parameters of the decoder body that multiply every token, and of the head (which multiplies only the
    response tokens in sequence_logprobs); the input embedding is a lookup, counted only as a tied head."""
    body = sum(p.numel() for name, p in model.model.named_parameters() if "embed_tokens" not in name)
    return body, model.get_output_embeddings().weight.numel()


def peak_flops(device) -> tuple[str, float | None]:
    import torch

    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------------------------------------
# Parts


def check_logprob_parity(ctx) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    code, device, sizes = ctx.code, ctx.device, ctx.sizes
    tol32 = code.LOGPROB_TOLERANCE[torch.float32]
    tol16 = code.LOGPROB_TOLERANCE[torch.bfloat16]
    tokenizer = AutoTokenizer.from_pretrained(ctx.tokenizer_dir)
    rng = random.Random(0)
    prompt = random_ids(rng, sizes["parity_prompt"], sizes["vocab"])
    items = [(prompt + random_ids(rng, n, sizes["vocab"]), len(prompt)) for n in sizes["parity_responses"]]
    lengths = [len(ids) - n for ids, n in items]
    pad = code.pad_token_id(tokenizer)
    batches = {layout: {k: v.to(device) for k, v in code.list_batch([items], pad, layout == "packed").items()}
               for layout in ("rows", "packed")}

    def ours(model) -> dict[str, list[float]]:
        return {layout: code.sequence_logprobs(model, batch, 64).tolist() for layout, batch in batches.items()}

    families, failures = {}, []
    for name in code.families.FAMILIES:
        path = code.families.build_family(name, ctx.tokenizer_dir, ctx.workdir / "families" / name)
        attention = code.attention_for(AutoConfig.from_pretrained(path))
        extra = {"attn_implementation": attention} if attention else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).to(device).eval()
        with torch.no_grad():
            own_fp32 = code.logprob_gap(model, tokenizer, items)
            fp32 = ours(model)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                autocast = ours(model)
            model.to(torch.bfloat16)
            weights = ours(model)
            own_bf16 = code.logprob_gap(model, tokenizer, items)
        row = {
            "model_type": model.config.model_type, "attention": attention or "sdpa",
            "fp32_vs_model_own": own_fp32,
            "bf16_autocast_vs_fp32": max(per_token_gap(autocast[k], fp32[k], lengths) for k in batches),
            "bf16_weights_vs_fp32": max(per_token_gap(weights[k], fp32[k], lengths) for k in batches),
            "bf16_weights_vs_model_own": own_bf16,
        }
        families[name] = row
        for key, value in row.items():
            if key.startswith(("fp32", "bf16")):
                limit = tol32 if key.startswith("fp32") else tol16
                if not value <= limit:
                    failures.append(f"{name} {key} {value:.3g} > {limit:g}")
        del model
    result = {"tolerance_nats_per_token": {"fp32": tol32, "bf16": tol16}, "response_tokens": lengths,
              "families": families,
              "worst": {key: max(row[key] for row in families.values())
                        for key in ("fp32_vs_model_own", "bf16_autocast_vs_fp32", "bf16_weights_vs_fp32",
                                    "bf16_weights_vs_model_own")}}
    ctx.partial = result
    require(not failures, "log-prob parity: " + "; ".join(failures))
    return result


def check_train_step(ctx) -> dict:
    import torch

    code, device, sizes = ctx.code, ctx.device, ctx.sizes
    model = build_llama(sizes["train_model"], device, seed=0)
    total_params = sum(p.numel() for p in model.parameters())
    body, head = matmul_params(model)
    vocab = model.config.vocab_size
    examples = pair_lists(code, random.Random(1), sizes["train_lists"], sizes["train_prompt"],
                          sizes["train_response"], vocab)
    chunk = sizes["chunk_size"]
    tol16 = code.LOGPROB_TOLERANCE[torch.bfloat16]

    # bf16 against fp32 at this width (the tiny families are 128 wide).
    model.eval()
    with torch.no_grad():
        fp32, _, _ = code.list_scores(model, examples[:2], PadOnly, "dpo", 1.0, chunk)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16, _, _ = code.list_scores(model, examples[:2], PadOnly, "dpo", 1.0, chunk)
    lengths = [len(ids) - n for e in examples[:2] for ids, n in e.tokens]
    wide_gap = per_token_gap(bf16.flatten().tolist(), fp32.flatten().tolist(), lengths)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = code.build_optimizer("adamw", params, lr=1e-5, weight_decay=0.0)
    probe = model.model.layers[0].mlp.up_proj.weight
    before = probe.detach()[:4, :4].clone()
    batch = code.list_batch([e.tokens for e in examples], PadOnly.pad_token_id, True)
    # What the packed forward runs (train.share_prompt): each list's prompt once, then its responses.
    processed = sum(e.tokens[0][1] + sum(len(ids) - n for ids, n in e.tokens) for e in examples)
    labels = int(batch["labels"].numel())
    sequence_tokens = sum(len(ids) for e in examples for ids, _ in e.tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, norms = [], [], []
    for step in range(sizes["train_warmup"] + sizes["train_steps"]):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            scores, mask, _ = code.list_scores(model, examples, PadOnly, "dpo", BETA, chunk)
        loss = code.OBJECTIVES["dpo"](scores.float(), mask).mean()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())
        synchronize(device)
        if step >= sizes["train_warmup"]:
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    device_name, peak = peak_flops(device)
    nominal = 6 * total_params * processed  # 6 x parameters x tokens
    counted = 6 * (body * processed + head * labels)
    result = {
        "parameters": total_params, "config": {k: v for k, v in sizes["train_model"].items()},
        "lists_per_step": len(examples), "items_per_list": 2,
        "tokens_per_step": {"sequences": sequence_tokens, "processed": processed, "response_labels": labels},
        "seconds_per_step": seconds, "timed_steps": len(times),
        "tokens_per_second": sequence_tokens / seconds, "processed_tokens_per_second": processed / seconds,
        "model_tflops_per_second": nominal / seconds / 1e12,
        "mfu": nominal / seconds / peak if peak else None,
        "mfu_head_on_labels_only": counted / seconds / peak if peak else None,
        "mfu_note": ("mfu: 6 x parameters x processed tokens per step (each list's prompt once, as packed) over "
                     f"the {peak / 1e12:.0f} TFLOP/s bf16 dense peak of {device_name}; mfu_head_on_labels_only "
                     "counts the head only at response tokens, where sequence_logprobs applies it; neither counts "
                     "attention scores or gradient checkpointing's recomputation"
                     if peak else f"no MFU: the bf16 peak of {device_name!r} is not known to this script"),
        "losses": losses, "grad_norms": norms,
        "bf16_autocast_vs_fp32_nats_per_token": wide_gap,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "settings": {"autocast": "bf16", "gradient_checkpointing": True, "optimizer": "adamw", "objective": "dpo",
                     "share_prompt": True, "logprob_chunk_size": chunk},
    }
    ctx.partial = result
    require(all(math.isfinite(x) for x in losses + norms), f"train step: a loss or gradient norm is not finite: "
            f"losses {losses}, norms {norms}")
    require(not torch.equal(before, probe.detach()[:4, :4]), "train step: AdamW left the weights unchanged")
    require(wide_gap <= tol16, f"train step: bf16 autocast log-probs of the {total_params / 1e9:.2f}B model differ "
            f"from fp32 by {wide_gap:.3g} nats per token (tolerance {tol16:g})")
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_fsdp(ctx) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    code, device, sizes = ctx.code, ctx.device, ctx.sizes
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise CheckFailed("fsdp: a process group is already initialized in this process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    port = free_port()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        base = build_llama(sizes["fsdp_model"], device, seed=1)
        examples = pair_lists(code, random.Random(2), sizes["fsdp_lists"], sizes["fsdp_prompt"],
                              sizes["fsdp_response"], base.config.vocab_size)
        lengths = [len(ids) - n for e in examples for ids, n in e.tokens]
        chunk = sizes["chunk_size"]

        def step(model, use_autocast: bool) -> dict:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = code.build_optimizer("adamw", params, lr=1e-5, weight_decay=0.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                scores, mask, _ = code.list_scores(model, examples, PadOnly, "dpo", BETA, chunk)
            loss = code.OBJECTIVES["dpo"](scores.float(), mask).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
                norm = norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                after, mask, _ = code.list_scores(model, examples, PadOnly, "dpo", BETA, chunk)
            return {"loss": loss.item(), "loss_after_step": code.OBJECTIVES["dpo"](after.float(), mask).mean().item(),
                    "grad_norm": norm.item(), "logps": (scores.detach().float() / BETA).flatten().tolist(),
                    "logps_after_step": (after.float() / BETA).flatten().tolist()}

        unsharded = step(copy.deepcopy(base), use_autocast=True)
        # The trainer's shard_model (train.sharding: fsdp) with FSDP's default precision: layers gather
        # the fp32 weights, the forward runs under bf16 autocast as train.autocast does.
        sharded = copy.deepcopy(base)
        code.shard_model(sharded)
        full_precision = step(sharded, use_autocast=True)
        del sharded
        # bf16 weights gathered, gradients reduced in fp32 into the fp32 sharded weights: through the
        # trainer's shard_model where it takes a policy, else the same layering here.
        sharded = copy.deepcopy(base)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        policy_through = "stages/train/loop.py shard_model"
        if len(inspect.signature(code.shard_model).parameters) > 1:
            code.shard_model(sharded, policy)
        else:
            policy_through = "fully_shard per decoder layer and the root, here"
            layer_classes = set(getattr(sharded, "_no_split_modules", None) or ())
            for module in sharded.modules():
                if type(module).__name__ in layer_classes:
                    fully_shard(module, mp_policy=policy)
            fully_shard(sharded, mp_policy=policy)
        mixed = step(sharded, use_autocast=True)
        del sharded, base
    finally:
        dist.destroy_process_group()

    tol32 = code.LOGPROB_TOLERANCE[torch.float32]
    tol16 = code.LOGPROB_TOLERANCE[torch.bfloat16]
    pair_tokens = max(lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2))
    variants, failures = {}, []
    for name, run, tolerance in (("fp32_params", full_precision, tol32), ("bf16_params_fp32_reduce", mixed, tol16)):
        gap = per_token_gap(run["logps"], unsharded["logps"], lengths)
        gap_after = per_token_gap(run["logps_after_step"], unsharded["logps_after_step"], lengths)
        # The DPO loss is 1-Lipschitz in beta * (logp_chosen - logp_rejected).
        loss_tolerance = BETA * tolerance * pair_tokens
        row = {"loss": run["loss"], "loss_after_step": run["loss_after_step"], "grad_norm": run["grad_norm"],
               "logp_gap_nats_per_token": gap, "logp_gap_after_step_nats_per_token": gap_after,
               "loss_diff": abs(run["loss"] - unsharded["loss"]),
               "loss_after_step_diff": abs(run["loss_after_step"] - unsharded["loss_after_step"]),
               "tolerance_nats_per_token": tolerance, "loss_tolerance": loss_tolerance}
        variants[name] = row
        for key, limit in (("logp_gap_nats_per_token", tolerance), ("logp_gap_after_step_nats_per_token", tolerance),
                           ("loss_diff", loss_tolerance), ("loss_after_step_diff", loss_tolerance)):
            if not row[key] <= limit:
                failures.append(f"{name} {key} {row[key]:.3g} > {limit:.3g}")
        if not math.isfinite(run["grad_norm"]):
            failures.append(f"{name} gradient norm {run['grad_norm']}")
    result = {"backend": backend, "world_size": 1, "mixed_precision_through": policy_through,
              "parameters": sum(p.numel() for p in build_meta_params(sizes["fsdp_model"])),
              "unsharded_autocast": {k: unsharded[k] for k in ("loss", "loss_after_step", "grad_norm")},
              "variants": variants}
    ctx.partial = result
    require(not failures, "fsdp: " + "; ".join(failures))
    return result


def build_meta_params(shape: dict):
    """The parameters of a Llama of `shape`, on the meta device (for counting)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return list(LlamaForCausalLM(LlamaConfig(**shape)).parameters())


def check_reward_invariance(ctx) -> dict:
    import torch

    from rewards.base import Sample
    from rewards.hf_classifier import HFClassifierReward

    code, device, sizes = ctx.code, ctx.device, ctx.sizes
    base = code.families.build_family("llama-untied", ctx.tokenizer_dir, ctx.workdir / "families" / "llama-untied")
    path = ctx.workdir / "reward-classifier"
    if not (path / "config.json").is_file():
        code.reward_model.save_tiny_classifier(base, path)
    rng = random.Random(3)
    samples = [Sample(f"p{i}", [{"role": "user", "content": words(rng, rng.randrange(2, 40), sizes["vocab"])}],
                      words(rng, rng.randrange(1, 80), sizes["vocab"]), {}) for i in range(sizes["reward_samples"])]
    # Bounds as a share of the largest |score|: batch shapes change the rounding only (fp32: 1e-4; bf16,
    # whose step is 2^-8 of a value: 5e-2), while a row read at the wrong token is off by about the spread
    # of the scores themselves (their standard deviation is about sqrt(hidden) ~ 11 here, 10x the bf16 bound).
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}
    dtypes, failures = {}, []
    for dtype in ("float32", "bfloat16"):
        reward = HFClassifierReward(model=str(path), batch_size=1, dtype=dtype, device=str(device))
        single = reward.score(samples)
        reward.batch_size = 8
        sorted_batches = reward.score(samples)  # length-sorted batches of 8, as the reward stage runs
        encoded = [reward.encode(sample) for sample in samples]
        mixed = []  # batches of 8 in sample order: the most padding
        for start in range(0, len(encoded), 8):
            mixed += reward.forward(encoded[start:start + 8])
        spread = float(torch.tensor(single).std())
        scale = max(1.0, max(abs(x) for x in single))
        row = {"max_abs_diff_sorted_batches": max(abs(a - b) for a, b in zip(single, sorted_batches)),
               "max_abs_diff_mixed_batches": max(abs(a - b) for a, b in zip(single, mixed)),
               "score_std": spread, "score_max_abs": scale, "tolerance": tolerance[dtype] * scale,
               "pad_id": reward.pad_id, "batch_pad_id_differs": reward.batch_pad_id(encoded[:8]) != reward.pad_id,
               "lengths": [min(map(len, encoded)), max(map(len, encoded))]}
        dtypes[dtype] = row
        for key in ("max_abs_diff_sorted_batches", "max_abs_diff_mixed_batches"):
            if not row[key] <= row["tolerance"]:
                failures.append(f"{dtype} {key} {row[key]:.3g} > {row['tolerance']:.3g}")
        del reward
    result = {"samples": len(samples), "dtypes": dtypes}
    ctx.partial = result
    require(not failures, "reward batch invariance: " + "; ".join(failures))
    return result


def check_trl_dpo(ctx) -> dict:
    if ctx.trl is None:
        raise Skipped(ctx.trl_how)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    code, device, sizes = ctx.code, ctx.device, ctx.sizes
    tokenizer = AutoTokenizer.from_pretrained(ctx.tokenizer_dir)
    shape = dict(sizes["trl_model"], vocab_size=len(tokenizer))
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(2)
    reference = LlamaForCausalLM(config)
    torch.manual_seed(3)
    policy = LlamaForCausalLM(config)  # other weights than the reference: log-ratios far from 0
    rng = random.Random(4)
    rows = [{"prompt": [{"role": "user", "content": words(rng, rng.randrange(4, 12), len(tokenizer))}],
             "chosen": [{"role": "assistant", "content": words(rng, rng.randrange(3, 15), len(tokenizer))}],
             "rejected": [{"role": "assistant", "content": words(rng, rng.randrange(3, 15), len(tokenizer))}]}
            for _ in range(sizes["trl_pairs"])]
    # bench/train_bench.py's DPOConfig, for one batch of these pairs on this device.
    args = DPOConfig(output_dir=str(ctx.workdir / "trl"), per_device_train_batch_size=len(rows), learning_rate=1e-6,
                     beta=BETA, max_length=None, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
                     bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                     precompute_ref_log_probs=False, seed=0, lr_scheduler_type="constant")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    inputs = {k: v.to(trainer.accelerator.device) for k, v in trainer.data_collator(tokenized).items()}
    model, ref_model = trainer.model, trainer.ref_model
    model.train()

    loss_trl = trainer.compute_loss(model, inputs)
    loss_trl.backward()
    grads_trl = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    # TRL's per-sequence log-probs, read as its _compute_loss reads them.
    with torch.no_grad():
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        width = inputs["completion_mask"].shape[1] - 1
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False,
                  "labels": labels, "fused_lm_head": True}
        trl_policy = model(**kwargs).log_probs[:, -width:].sum(1).tolist()
        trl_reference = ref_model(**kwargs).log_probs[:, -width:].sum(1).tolist()

    # Ours on the very token ids TRL made of the pairs: the reference stage's log-probs, then the trainer's step.
    items = [[(r["prompt_ids"] + r["chosen_ids"], len(r["prompt_ids"])),
              (r["prompt_ids"] + r["rejected_ids"], len(r["prompt_ids"]))] for r in tokenized]
    pad = code.pad_token_id(tokenizer)
    with torch.no_grad():
        batch = {k: v.to(ref_model.device) for k, v in code.list_batch(items, pad, True).items()}
        ours_reference = code.sequence_logprobs(ref_model, batch, sizes["chunk_size"]).tolist()
    examples = [code.ListExample(f"p{i}", pair, ours_reference[2 * i:2 * i + 2], [1.0, 0.0])
                for i, pair in enumerate(items)]
    scores, mask, _ = code.list_scores(model, examples, tokenizer, "dpo", BETA, sizes["chunk_size"])
    loss_ours = code.OBJECTIVES["dpo"](scores, mask).mean()
    loss_ours.backward()
    grads_ours = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ours_policy = (scores.detach() / BETA + torch.tensor([e.ref_logps for e in examples],
                                                          device=scores.device)).flatten().tolist()

    n = len(rows)
    lengths = [len(ids) - p for pair in items for ids, p in pair]
    trl_policy_pairs = [v for i in range(n) for v in (trl_policy[i], trl_policy[n + i])]  # TRL: chosen, then rejected
    trl_reference_pairs = [v for i in range(n) for v in (trl_reference[i], trl_reference[n + i])]
    grad_scale = max(g.abs().max().item() for g in grads_trl.values())
    common = set(grads_trl) & set(grads_ours)
    grad_diff = max((grads_trl[k] - grads_ours[k]).abs().max().item() for k in common) if common else math.inf
    # Informational: whether our tokenize_example makes the same ids of these chats as TRL.
    same_tokens = all(
        code.tokenize_example(tokenizer, row["prompt"], row[key][0]["content"], 10**6)[0]
        == r["prompt_ids"] + r[f"{key}_ids"]
        for row, r in zip(rows, tokenized) for key in ("chosen", "rejected"))
    tol32 = code.LOGPROB_TOLERANCE[torch.float32]
    result = {
        "trl": ctx.trl_how, "pairs": n, "model_parameters": sum(p.numel() for p in model.parameters()),
        "loss_trl": loss_trl.item(), "loss_ours": loss_ours.item(),
        "loss_diff": abs(loss_trl.item() - loss_ours.item()),
        "policy_logp_gap_nats_per_token": per_token_gap(trl_policy_pairs, ours_policy, lengths),
        "reference_logp_gap_nats_per_token": per_token_gap(trl_reference_pairs, ours_reference, lengths),
        "grad_max_abs_diff": grad_diff, "grad_max_abs": grad_scale,
        "grad_params_compared": len(common), "grad_params_missing": sorted(set(grads_trl) ^ set(grads_ours)),
        "same_tokens_as_tokenize_example": same_tokens,
        "tolerance": {"logp_nats_per_token": tol32, "loss": 1e-5, "grad_relative": 1e-3},
    }
    ctx.partial = result
    failures = []
    if not result["policy_logp_gap_nats_per_token"] <= tol32:
        failures.append(f"policy log-probs differ by {result['policy_logp_gap_nats_per_token']:.3g} nats/token")
    if not result["reference_logp_gap_nats_per_token"] <= tol32:
        failures.append(f"reference log-probs differ by {result['reference_logp_gap_nats_per_token']:.3g} nats/token")
    if not result["loss_diff"] <= 1e-5 * max(1.0, abs(loss_trl.item())):
        failures.append(f"DPO loss {loss_ours.item():.6g} (ours) against {loss_trl.item():.6g} (TRL)")
    if result["grad_params_missing"] or not grad_diff <= 1e-3 * grad_scale:
        failures.append(f"gradients differ by up to {grad_diff:.3g} (largest {grad_scale:.3g}; "
                        f"parameters with a gradient on one side only: {result['grad_params_missing']})")
    require(not failures, "TRL DPOTrainer against ours: " + "; ".join(failures))
    return result


CHECKS = {"logprob_parity": check_logprob_parity, "train_step": check_train_step, "fsdp": check_fsdp,
          "reward_invariance": check_reward_invariance, "trl_dpo": check_trl_dpo}


# ---------------------------------------------------------------------------------------------------


def headline(name: str, result: dict) -> str:
    """The numbers of a passed part, in one line."""
    if name == "logprob_parity":
        worst = result["worst"]
        return (f"{len(result['families'])} families; worst nats/token: fp32 vs own logits "
                f"{worst['fp32_vs_model_own']:.2g}, bf16 autocast vs fp32 {worst['bf16_autocast_vs_fp32']:.2g}, "
                f"bf16 weights vs fp32 {worst['bf16_weights_vs_fp32']:.2g}")
    if name == "train_step":
        mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] is not None else ""
        memory = f", peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
        return (f"{result['parameters'] / 1e6:,.1f}M parameters: {result['seconds_per_step']:.3f} s/step, "
                f"{result['tokens_per_second']:.0f} tokens/s ({result['processed_tokens_per_second']:.0f} processed)"
                f", {result['model_tflops_per_second']:.1f} TFLOP/s{mfu}{memory}")
    if name == "fsdp":
        return "; ".join(f"{variant}: loss diff {row['loss_diff']:.2g}, "
                         f"log-prob gap {row['logp_gap_nats_per_token']:.2g}"
                         for variant, row in result["variants"].items())
    if name == "reward_invariance":
        return "; ".join(f"{dtype}: max diff {row['max_abs_diff_mixed_batches']:.2g} (tolerance {row['tolerance']:.2g})"
                         for dtype, row in result["dtypes"].items())
    if name == "trl_dpo":
        return (f"TRL {result['trl']}: loss {result['loss_trl']:.6f} vs ours {result['loss_ours']:.6f}, "
                f"grad diff {result['grad_max_abs_diff']:.2g} of {result['grad_max_abs']:.2g}")
    return ""


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "pyarrow", "trl", "datasets"):
        module = sys.modules.get(name)
        if module is None and name not in ("trl", "datasets"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                module = None
        found[name] = getattr(module, "__version__", None) if module else None
    import torch

    found["cuda"] = torch.version.cuda
    return found


def forbidden_imports() -> list[str]:
    """Ray's and vLLM's modules imported by now (a None entry blocks an import; it imported nothing)."""
    return sorted(m for m, module in list(sys.modules.items()) if m.split(".")[0] in FORBIDDEN and module is not None)


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if isinstance(exc, (CheckFailed, Skipped)) else f"{type(exc).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for CPU; a test runs it)")
    parser.add_argument("--out", default=None,
                        help=f"results JSON (default on cuda: {DEFAULT_OUT.relative_to(REPO_ROOT)}; on CPU: none)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--trl-wheel", default=None, help="a trl .whl, or a folder of wheels (trl and what it needs)")
    parser.add_argument("--require-trl", action="store_true", help="fail, not skip, when TRL cannot be imported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --quick on CPU, where the tiny matmuls gain nothing "
                             "from more and lose much when the cores are shared; else torch's default)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in CHECKS]:
        parser.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    out = Path(args.out) if args.out else (DEFAULT_OUT if device.type == "cuda" else None)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    results: dict = {"device": str(device), "device_name": peak_flops(device)[0], "quick": args.quick,
                     "torch_threads": torch.get_num_threads(),
                     "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts": {}}
    if device.type == "cuda":
        results["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        workdir = Path(scratch)
        sizes = SIZES["quick" if args.quick else "full"]
        ctx = types.SimpleNamespace(device=device, sizes=sizes, workdir=workdir, code=our_code(), partial=None,
                                    tokenizer_dir=synthetic_tokenizer(workdir / "tokenizer", sizes["vocab"]),
                                    trl=None, trl_how="not asked for")
        if "trl_dpo" in parts:
            ctx.trl, ctx.trl_how = import_trl(args.trl_wheel, workdir)
        for name in parts:
            ctx.partial = None
            part_start = time.perf_counter()
            try:
                result = CHECKS[name](ctx)
                status, reason = "passed", None
            except Skipped as exc:
                result, status, reason = {}, "failed" if args.require_trl else "skipped", one_line(exc)
            except Exception as exc:  # noqa: BLE001 - every part reports, the exit code carries the failure
                result, status, reason = ctx.partial or {}, "failed", one_line(exc)
                if not isinstance(exc, CheckFailed):
                    traceback.print_exc()
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            seconds = time.perf_counter() - part_start
            results["parts"][name] = {"status": status, "seconds": round(seconds, 2), "reason": reason, **result}
            print(f"{status.upper():7s} {name} ({seconds:.1f} s){': ' + reason if reason else ''}", flush=True)
            if status == "passed" and (line := headline(name, result)):
                print(f"        {line}", flush=True)
    imported = forbidden_imports()
    results["imports"] = {"ray": any(m.split(".")[0] == "ray" for m in imported),
                          "vllm": any(m.split(".")[0] == "vllm" for m in imported), "modules": imported[:20]}
    if imported:
        print(f"FAILED  imports: the check imported {', '.join(imported[:5])} (it must run without Ray and vLLM)")
    results["versions"] = versions()
    total = time.perf_counter() - started
    results["total_seconds"] = round(total, 2)
    results["under_8_minutes"] = total < 480
    ran = [part for part in results["parts"].values() if part["status"] != "skipped"]
    results["passed"] = bool(ran) and all(part["status"] == "passed" for part in ran) and not imported
    summary = ", ".join(f"{name} {part['status']}" for name, part in results["parts"].items())
    print(f"total {total:.1f} s on {results['device_name']} ({device}): {summary}", flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {out}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
