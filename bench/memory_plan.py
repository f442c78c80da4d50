"""Per-GPU memory plan of the configs/paper recipes: computed from the models' published
architectures and each recipe's settings, not measured.

    .venv/bin/python bench/memory_plan.py            # print the tables, write docs/bench/gpu-memory-plan.md
    .venv/bin/python bench/memory_plan.py --stdout   # print only

Each stage of a round has its GPUs to itself (its actors are gone before the next starts), so
each stage's sum is compared with one 80 GB GPU on its own:

  generate   one vLLM engine a GPU: bf16 weights, vLLM's profiled activations and sampler
             logits, and the KV cache that gpu_memory_utilization leaves; how many tokens of
             KV that is, against what the engine's batch asks for
  reward     one reward model a GPU (bf16 weights) and one micro batch's forward
  reference  the policy's log-probs under the round's starting policy: the train workers
             score them with the fp32 model they load, before it is sharded
  train      fp32 master weights, gradients and AdamW state (divided by train.num_workers
             under FSDP2), FSDP2's gathered layers, autocast's bf16 weight copies, and the
             activations of one micro batch with gradient checkpointing

The formulas are the small functions below; their docstrings say what each counts. Where a
term depends on runtime behaviour the plan takes the larger case (named in the docstring), so
the sums are upper bounds of what the tensors need, plus a fixed allowance for the CUDA
context, communication buffers and the allocator's fragmentation. The architectures are the
published Hugging Face config.json numbers of each model.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PAPER_DIR = REPO_ROOT / "configs" / "paper"
PLAN_MD = REPO_ROOT / "docs" / "bench" / "gpu-memory-plan.md"

GB = 1e9
# What the plan calls an 80 GB GPU: 80e9 bytes, a little under what an 80 GB A100 or H100
# reports (79-80 GiB, 85e9 bytes).
GPU_BYTES = 80 * GB
# Allowance for what no tensor formula counts: the CUDA context, NCCL's buffers, the caching
# allocator's fragmentation. An assumption, not a measurement.
OVERHEAD_BYTES = 3 * GB
# vLLM (0.32) defaults on a GPU of 70 GiB or more, offline LLM class: sequences scheduled at
# once, and tokens per forward pass (its memory profiling runs one pass of this many tokens).
VLLM_MAX_NUM_SEQS = 1024
VLLM_MAX_NUM_BATCHED_TOKENS = 16384
# CUDA graphs captured by a vLLM engine run with enforce_eager false: an allowance.
VLLM_CUDA_GRAPH_BYTES = 1 * GB
# Bytes per attention-score element of a layer run with eager attention (Gemma-2: sdpa has no
# soft-cap), from transformers' op chain: bf16 scores, scaled, soft-capped (tanh kept for backward),
# fp32 mask added, fp32 softmax kept, bf16 probabilities kept; in backward their gradients.
EAGER_SCORE_BYTES_TRAIN = 20
EAGER_SCORE_BYTES_NO_GRAD = 10


@dataclass(frozen=True)
class Arch:
    """A decoder's shape, as its Hugging Face config.json gives it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_word_embeddings: bool
    norms_per_layer: int = 2  # RMSNorms a decoder layer applies (Gemma-2 has 4)
    eager_attention: bool = False  # attention soft-cap: the pipeline loads it with eager attention
    lm_head: bool = True  # False: a sequence classifier, with a hidden x 1 score head instead
    num_labels: int = 1


# mistralai/Mistral-7B-Instruct-v0.2, config.json: MistralForCausalLM.
MISTRAL_7B = Arch(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=32000,
                  tie_word_embeddings=False)
# google/gemma-2-2b-it, config.json: Gemma2ForCausalLM (attn_logit_softcapping 50, final soft-cap 30,
# sliding window 4096 on every other layer: wider than the recipes' 2048 tokens, so every layer's KV counts).
GEMMA_2_2B = Arch(hidden=2304, layers=26, heads=8, kv_heads=4, head_dim=256, intermediate=9216, vocab=256000,
                  tie_word_embeddings=True, norms_per_layer=4, eager_attention=True)
# sfairXC/FsfairX-LLaMA3-RM-v0.1, config.json: LlamaForSequenceClassification on Llama-3-8B, one label.
LLAMA3_8B_RM = Arch(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                    tie_word_embeddings=False, lm_head=False)

ARCHS = {
    "mistralai/Mistral-7B-Instruct-v0.2": MISTRAL_7B,
    "google/gemma-2-2b-it": GEMMA_2_2B,
    "sfairXC/FsfairX-LLaMA3-RM-v0.1": LLAMA3_8B_RM,
}


# --- parameters ------------------------------------------------------------------------------

def layer_params(arch: Arch) -> int:
    """Weights of one decoder layer: q, k, v, o projections (no bias), gate, up and down
    projections of the MLP, and its RMSNorm scales."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    attention = arch.hidden * q + 2 * arch.hidden * kv + q * arch.hidden
    mlp = 3 * arch.hidden * arch.intermediate
    return attention + mlp + arch.norms_per_layer * arch.hidden


def outer_params(arch: Arch) -> int:
    """Weights outside the decoder layers: the embedding, the final norm, and the output head
    (vocab x hidden unless tied to the embedding; hidden x labels for a classifier)."""
    head = (0 if arch.tie_word_embeddings else arch.vocab * arch.hidden) if arch.lm_head \
        else arch.hidden * arch.num_labels
    return arch.vocab * arch.hidden + arch.hidden + head


def param_count(arch: Arch) -> int:
    """All weights: the layers and what is outside them."""
    return arch.layers * layer_params(arch) + outer_params(arch)


def largest_param(arch: Arch) -> int:
    """The largest single weight tensor (the embedding, for these models)."""
    q = arch.heads * arch.head_dim
    return max(arch.vocab * arch.hidden, arch.hidden * arch.intermediate, arch.hidden * q)


# --- activations ------------------------------------------------------------------------------

def kv_bytes_per_token(arch: Arch, dtype_bytes: int = 2) -> int:
    """KV cache of one token: a key and a value vector per layer and KV head."""
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * dtype_bytes


def layer_forward_bytes_per_token(arch: Arch, residual_bytes: int, matmul_bytes: int) -> int:
    """Tensors one decoder layer's forward makes, per token, all counted as if alive at once.

    residual_bytes: the residual stream and the norms' outputs (4 in fp32 weights under bf16
    autocast, where the stream stays fp32; 2 for bf16 weights). matmul_bytes: the projections'
    outputs (2 under autocast or in bf16). Counted: each norm's output and its cast for the
    matmul, q, k, v, the rotated q and k, k and v repeated to every query head (GQA), the
    attention output, o_proj's output and the residual sum; the MLP's gate, up, act(gate) and
    product, down's output and the residual sum.
    """
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    cast = matmul_bytes if residual_bytes != matmul_bytes else 0
    norms = arch.norms_per_layer * arch.hidden * (residual_bytes + cast)
    attention = matmul_bytes * (q + 2 * kv) + matmul_bytes * (q + kv) + matmul_bytes * 2 * q + matmul_bytes * q
    projections_out = 2 * arch.hidden * matmul_bytes  # o_proj and down_proj
    residual_sums = 2 * arch.hidden * residual_bytes
    mlp = 4 * arch.intermediate * matmul_bytes
    return norms + attention + projections_out + residual_sums + mlp


def attention_scores_bytes(arch: Arch, rows: int, row_len: int, bytes_per_element: int) -> int:
    """One layer's attention-score matrices, rows x heads x row_len^2, where attention is eager
    (sdpa's fused kernels never hold them: 0 then)."""
    return rows * arch.heads * row_len * row_len * bytes_per_element if arch.eager_attention else 0


def mask_bytes(arch: Arch, rows: int, row_len: int, packed: bool) -> int:
    """A packed list's 4-D attention mask, rows x row_len^2, held for the whole forward: the
    boolean mask, plus its additive float copy in fp32 for eager attention (the model's dtype)
    or in bf16 for sdpa's kernel. 0 for unpacked rows (a 2-D padding mask)."""
    if not packed:
        return 0
    return rows * row_len * row_len * (1 + (4 if arch.eager_attention else 2))


def logits_chunk_bytes(chunk: int, vocab: int, copies: int = 3) -> int:
    """The vocabulary projection of `chunk` positions in fp32: the logits, a same-size
    temporary (the soft-cap, logsumexp's exp) and, in backward, their gradient (copies=3;
    2 without backward)."""
    return copies * chunk * vocab * 4


# --- layouts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    list_size: int   # items a list trains on
    prompt: int      # longest prompt kept (tokens)
    answer: int      # longest answer the trainer keeps (tokens)
    rows: int        # rows of one forward pass
    row_len: int     # tokens of the longest row
    tokens: int      # tokens the hidden states are counted for (the unpacked bound)


def list_size(config) -> int:
    """Items in one training list: positives and negatives (every eligible candidate for
    top_rest), at most train.max_list_size. With lists.memory, earlier rounds' answers join
    the pool, not the list, except for top_rest."""
    lists, k = config.lists, config.generate.num_samples
    pool = k * (1 if lists.memory == "none" else 3)  # top_rest over 3 rounds of memory, at most
    size = pool if lists.strategy == "top_rest" else lists.num_positives + lists.num_negatives
    return min(size, config.train.max_list_size)


def train_layout(config, items_per_pass: int | None = None) -> Layout:
    """What one forward pass of training (or, with `items_per_pass`, of reference scoring)
    holds. The prompt keeps up to model.max_model_len - generate.max_tokens tokens; each item
    up to train.max_length. With train.share_prompt a row is one list: its prompt once, then
    every answer (the attention matrices and masks are counted for these rows). The hidden
    states are counted for the unpacked bound, micro_batch_size x list size x max_length
    tokens, which packing only lowers."""
    train, k = config.train, list_size(config)
    prompt = min(config.model.max_model_len - config.generate.max_tokens, train.max_length - 1)
    answer = min(config.generate.max_tokens, train.max_length - prompt)
    lists = train.micro_batch_size if items_per_pass is None else max(1, items_per_pass // k)
    if train.share_prompt:
        rows, row_len = lists, prompt + k * answer
    else:
        rows, row_len = lists * k, prompt + answer
    return Layout(k, prompt, answer, rows, row_len, lists * k * train.max_length)


# --- stages -----------------------------------------------------------------------------------

Lines = list[tuple[str, float]]


def generate_plan(config, arch: Arch) -> tuple[Lines, dict]:
    """One vLLM engine on its GPU (tensor_parallel_size 1): bf16 weights; vLLM's profiled peak
    (one forward pass of max_num_batched_tokens tokens, one layer at a time, and the sampler's
    fp32 logits for max_num_seqs sequences with two temporaries); CUDA graphs; and the KV cache,
    which takes what gpu_memory_utilization x GPU leaves. The engine's batch asks for
    max_num_seqs sequences of up to max_model_len tokens; a prompt's K samples share its KV
    blocks (prefix caching), so a prompt at its longest takes prompt + K x answer tokens."""
    tp = config.generate.tensor_parallel_size
    weights = 2 * param_count(arch) / tp
    activations = VLLM_MAX_NUM_BATCHED_TOKENS * layer_forward_bytes_per_token(arch, 2, 2) / tp
    sampler = 3 * VLLM_MAX_NUM_SEQS * arch.vocab * 4
    graphs = 0 if config.generate.enforce_eager else VLLM_CUDA_GRAPH_BYTES
    budget = config.generate.gpu_memory_utilization * GPU_BYTES
    kv = budget - weights - activations - sampler - graphs - OVERHEAD_BYTES
    per_token = kv_bytes_per_token(arch) / tp
    kv_tokens = int(kv // per_token) if kv > 0 else 0
    max_len, k = config.model.max_model_len, config.generate.num_samples
    answer = config.generate.max_tokens
    group = (max_len - answer) + k * answer
    lines = [("weights, bf16", weights), ("vLLM profiled activations (one pass of "
                                          f"{VLLM_MAX_NUM_BATCHED_TOKENS} tokens)", activations),
             (f"sampler logits, fp32 ({VLLM_MAX_NUM_SEQS} sequences x vocab, x3)", sampler),
             ("CUDA graphs", graphs), ("CUDA context, allocator (allowance)", OVERHEAD_BYTES),
             (f"KV cache ({kv_bytes_per_token(arch) / 1024:.0f} KiB a token)", max(kv, 0))]
    facts = {"kv_tokens": kv_tokens, "full_sequences": kv_tokens // max_len, "prompts_at_once": kv_tokens // group,
             "batch_tokens": VLLM_MAX_NUM_SEQS * max_len, "fits": kv_tokens >= max_len,
             "total": weights + activations + sampler + graphs + OVERHEAD_BYTES + max(kv, 0)}
    return lines, facts


def reward_plan(config, arch: Arch) -> tuple[Lines, dict]:
    """One reward model on its GPU: bf16 weights; one micro batch (reward.micro_batch_size chats
    of up to reward.max_length tokens), one layer at a time, no gradient; the last hidden states
    the score head reads; the 4-D causal mask sdpa is given for padded rows (bf16)."""
    rew = config.reward
    weights = 2 * param_count(arch)
    tokens = rew.micro_batch_size * rew.max_length
    layer = tokens * layer_forward_bytes_per_token(arch, 2, 2)
    hidden = 2 * tokens * arch.hidden * 2
    mask = rew.micro_batch_size * rew.max_length * rew.max_length * 2
    lines = [("weights, bf16", weights),
             (f"one layer's forward ({rew.micro_batch_size} x {rew.max_length} tokens)", layer),
             ("residual stream and last hidden states", hidden), ("causal mask, bf16", mask),
             ("CUDA context, allocator (allowance)", OVERHEAD_BYTES)]
    return lines, {"total": sum(b for _, b in lines)}


def reference_plan(config, arch: Arch) -> tuple[Lines, dict]:
    """The reference log-probs: the policy in train.dtype on one GPU, whole with autocast's bf16
    copies of its weights (the reference scorer's own task, or unsharded train workers), or
    sharded with its layers gathered in bf16 (train workers under FSDP2, which score after
    sharding), no gradient, reference.batch_size list items a forward pass, one
    layer at a time; the vocabulary projection chunk (no backward)."""
    train = config.train
    wbytes = 4 if train.dtype == "float32" else 2
    autocasting = train.autocast != "off" and wbytes == 4
    if train.sharding == "fsdp" and config.reference.in_train_workers:
        # Scored by the train workers after sharding: 1/W of the weights, layers gathered in bf16
        # under autocast (FSDP2's mixed-precision policy), so no autocast copies.
        weights = wbytes * param_count(arch) / train.num_workers + \
            (2 * layer_params(arch) + outer_params(arch)) * (2 if autocasting else wbytes)
        cache = 0
    else:
        weights = wbytes * param_count(arch)
        cache = 2 * param_count(arch) if autocasting else 0
    layout = train_layout(config, items_per_pass=config.reference.batch_size)
    residual = 4 if wbytes == 4 else 2
    tokens = layout.rows * layout.row_len
    layer = tokens * layer_forward_bytes_per_token(arch, residual, 2)
    hidden = 2 * tokens * arch.hidden * residual
    scores = attention_scores_bytes(arch, layout.rows, layout.row_len, EAGER_SCORE_BYTES_NO_GRAD)
    mask = mask_bytes(arch, layout.rows, layout.row_len, train.share_prompt)
    logits = logits_chunk_bytes(train.logprob_chunk_size, arch.vocab, copies=2)
    lines = [(f"weights, {train.dtype}", weights), ("autocast's bf16 weight copies", cache),
             (f"one layer's forward ({layout.rows} rows x {layout.row_len} tokens)", layer),
             ("residual stream and last hidden states", hidden), ("attention scores (eager)", scores),
             ("attention mask", mask), (f"logits chunk ({train.logprob_chunk_size} x vocab, fp32)", logits),
             ("CUDA context, allocator (allowance)", OVERHEAD_BYTES)]
    return lines, {"total": sum(b for _, b in lines)}


def train_state_bytes(config, arch: Arch) -> dict[str, float]:
    """Weights, gradients and optimizer state a GPU holds: fp32 (or bf16) master weights and
    gradients, AdamW's two moments in fp32 (bf16 with adamw_bf16); divided by the workers
    under FSDP2, whole on every worker without sharding."""
    train = config.train
    wbytes = 4 if train.dtype == "float32" else 2
    moments = 2 * (2 if train.optimizer == "adamw_bf16" else 4)
    shards = train.num_workers if train.sharding == "fsdp" else 1
    params = param_count(arch)
    return {"weights": wbytes * params / shards, "gradients": wbytes * params / shards,
            "moments": moments * params / shards}


def train_plan(config, arch: Arch) -> tuple[Lines, dict]:
    """One train worker's GPU at its peak, which is the end of a micro batch's forward or its
    backward (then the optimizer step, with the activations gone, is lower; its peak is
    returned too).

    Counted: the states (train_state_bytes); under FSDP2, the layers it gathers (bf16 under
    autocast, the mixed-precision policy: the one running and the one prefetched, and one
    layer's unsharded gradient before reduce-scatter) and the root group (embedding, head),
    gathered for the whole pass with its gradient, and the unsharded fp32 gradients accumulated
    between a step's micro-batches (reduced once, after the last); without FSDP2, autocast's
    bf16 copies of every weight (torch caches the casts of fp32 leaf weights until the autocast
    region ends: the whole model); with gradient checkpointing, every
    layer's input (the residual stream, fp32), the final hidden states, and one layer's recompute
    working set doubled for its gradients; eager attention's score matrices; the packed mask;
    the logits chunk with its gradient; the allowance.
    """
    train = config.train
    wbytes = 4 if train.dtype == "float32" else 2
    autocasting = train.autocast != "off" and wbytes == 4
    residual = 4 if wbytes == 4 else 2
    states = train_state_bytes(config, arch)
    layout = train_layout(config)
    fsdp = train.sharding == "fsdp"
    # FSDP2's mixed-precision policy gathers bf16 weights under autocast (stages/train/loop.py).
    gather_bytes = 2 if autocasting else wbytes
    gathered = (3 * layer_params(arch) + 2 * outer_params(arch)) * gather_bytes if fsdp else 0
    # Gathered bf16 weights need no autocast copies; unsharded fp32 weights get them, whole.
    cache = 2 * param_count(arch) if autocasting and not fsdp else 0
    # Gradients are reduced once a step: until its last micro-batch each worker accumulates the
    # unsharded gradients, in fp32 (the policy's reduce dtype).
    per_worker = math.ceil(train.batch_size / train.num_workers)
    accumulating = fsdp and math.ceil(per_worker / train.micro_batch_size) > 1
    unsharded_grads = 4 * param_count(arch) if accumulating else 0
    if train.gradient_checkpointing:
        saved = arch.layers * layout.tokens * arch.hidden * residual
        working = 2 * layout.tokens * layer_forward_bytes_per_token(arch, residual, 2)
    else:
        saved = arch.layers * layout.tokens * layer_forward_bytes_per_token(arch, residual, 2)
        working = layout.tokens * layer_forward_bytes_per_token(arch, residual, 2)
    final = layout.tokens * arch.hidden * (residual + 2)
    scores = attention_scores_bytes(arch, layout.rows, layout.row_len, EAGER_SCORE_BYTES_TRAIN)
    mask = mask_bytes(arch, layout.rows, layout.row_len, train.share_prompt)
    logits = logits_chunk_bytes(train.logprob_chunk_size, arch.vocab, copies=3)
    sharded = f" (1/{train.num_workers}, FSDP2)" if fsdp else " (whole: no sharding)"
    lines = [(f"master weights, {train.dtype}{sharded}", states["weights"]),
             (f"gradients, {train.dtype}{sharded}", states["gradients"]),
             (f"{train.optimizer} moments{sharded}", states["moments"]),
             ("FSDP2 gathered layers (2 layers + 1 layer's gradient, root group + its gradient)", gathered),
             ("unsharded fp32 gradients accumulated until the step's last micro-batch", unsharded_grads),
             ("autocast's bf16 weight copies (whole model)", cache),
             (f"layer inputs kept by checkpointing ({layout.tokens} tokens x {arch.layers} layers)", saved),
             ("one layer's recompute working set, with its gradients", working),
             ("final hidden states", final),
             (f"attention scores (eager; {layout.rows} rows x {layout.row_len} tokens)", scores),
             ("packed attention mask", mask),
             (f"logits chunk ({train.logprob_chunk_size} x vocab, fp32, with gradient)", logits),
             ("CUDA context, NCCL, allocator (allowance)", OVERHEAD_BYTES)]
    shard = largest_param(arch) / (train.num_workers if fsdp else 1)
    step = states["weights"] + states["gradients"] + states["moments"] + 2 * 4 * shard + OVERHEAD_BYTES
    total = sum(b for _, b in lines)
    return lines, {"total": total, "step": step, "layout": layout}


# --- the report -------------------------------------------------------------------------------

def gb(value: float) -> str:
    return f"{value / GB:.1f}"


def plan_recipe(path: Path) -> dict:
    """Every stage's lines and totals for one recipe file."""
    from pipeline.settings import load_config

    config = load_config(path)
    policy, reward = ARCHS[config.model.name], ARCHS[config.reward.model]
    stages = {"generate": generate_plan(config, policy), "reward": reward_plan(config, reward),
              "reference": reference_plan(config, policy), "train": train_plan(config, policy)}
    peaks = {name: facts["total"] for name, (_, facts) in stages.items()}
    return {"path": path, "config": config, "stages": stages, "peaks": peaks,
            "fits": all(p <= GPU_BYTES for p in peaks.values()) and stages["generate"][1]["fits"]}


def recipe_section(plan: dict) -> str:
    config, stages = plan["config"], plan["stages"]
    layout = stages["train"][1]["layout"]
    gen = stages["generate"][1]
    out = [f"## {plan['path'].stem}", "",
           f"`{config.model.name}`, {config.train.objective}, K={config.generate.num_samples}, lists of "
           f"{layout.list_size}, max_model_len {config.model.max_model_len} (prompt <= {layout.prompt}, answer <= "
           f"{config.generate.max_tokens}), train.max_length {config.train.max_length}, micro_batch_size "
           f"{config.train.micro_batch_size}, {config.train.num_workers} workers, sharding "
           f"{config.train.sharding}.", "",
           "| stage | what | GB per GPU |", "|---|---|---:|"]
    for name, (lines, facts) in stages.items():
        for label, value in lines:
            if value:  # a term this recipe does not have (no FSDP2, no eager attention) is left out
                out.append(f"| {name} | {label} | {gb(value)} |")
        verdict = "fits" if facts["total"] <= GPU_BYTES else "**does not fit**"
        out.append(f"| **{name}** | **total** ({verdict} 80 GB) | **{gb(facts['total'])}** |")
    step = stages["train"][1]["step"]
    out += ["", f"- generate: {gen['kv_tokens']:,} tokens of KV cache a GPU: {gen['full_sequences']} sequences "
            f"of {config.model.max_model_len} tokens at once, or {gen['prompts_at_once']} prompts with all "
            f"{config.generate.num_samples} answers at their longest; vLLM's batch of {VLLM_MAX_NUM_SEQS} sequences "
            f"at full length would need {gen['batch_tokens']:,} ({gen['kv_tokens'] / gen['batch_tokens']:.0%} of it "
            "fits: vLLM runs fewer at once, most answers being shorter)"
            + ("" if gen["fits"] else "; **not even one full-length sequence fits: vLLM refuses to start**") + ".",
            f"- train: the optimizer step peaks at {gb(step)} GB (activations freed).", ""]
    return "\n".join(out)


def summary_table(plans: list[dict]) -> str:
    out = ["| recipe | generate | reward | reference | train | fits 80 GB a GPU |", "|---|---:|---:|---:|---:|---|"]
    for plan in plans:
        p = plan["peaks"]
        out.append(f"| {plan['path'].stem} | {gb(p['generate'])} | {gb(p['reward'])} | {gb(p['reference'])} | "
                   f"{gb(p['train'])} | {'yes' if plan['fits'] else '**NO**'} |")
    return "\n".join(out)


def architecture_table() -> str:
    out = ["| model | hidden | layers | heads | KV heads | head dim | MLP | vocab | tied | parameters | KV a token |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, a in ARCHS.items():
        kv = f"{kv_bytes_per_token(a) / 1024:.0f} KiB" if a.lm_head else "-"
        out.append(f"| {name} | {a.hidden} | {a.layers} | {a.heads} | {a.kv_heads} | {a.head_dim} | {a.intermediate} | "
                   f"{a.vocab} | {'yes' if a.tie_word_embeddings else 'no'} | {param_count(a) / 1e9:.2f}e9 | {kv} |")
    return "\n".join(out)


def render(plans: list[dict]) -> str:
    header = f"""# GPU memory plan of the paper recipes (computed, not measured)

Generated by `bench/memory_plan.py` from `configs/paper/*.yaml` and the models' published
Hugging Face configs; do not edit by hand. Nothing here was measured on a GPU: each number is a
formula of the architecture and the recipe's settings (the functions and their docstrings in
`bench/memory_plan.py`), taking the larger case where runtime behaviour could go either way, plus
a fixed allowance of {gb(OVERHEAD_BYTES)} GB a GPU for the CUDA context, NCCL and fragmentation.
"80 GB" is {gb(GPU_BYTES)}e9 bytes. Each stage has its GPUs to itself (its actors are gone before the
next stage starts), so each stage is compared with one GPU on its own.

Formulas, per GPU (P = parameters, L = layers, h = hidden size, V = vocabulary, W = train.num_workers):

- generate (one vLLM engine a GPU): weights 2P; KV cache per token 2 x L x KV heads x head dim x 2 B,
  in what gpu_memory_utilization x 80 GB leaves after the weights, vLLM's profiled forward pass of
  {VLLM_MAX_NUM_BATCHED_TOKENS} tokens, the sampler's fp32 logits ({VLLM_MAX_NUM_SEQS} sequences x V x 4 B x 3),
  {gb(VLLM_CUDA_GRAPH_BYTES)} GB of CUDA graphs and the allowance.
- reward: the reward model's weights 2P, one micro batch's forward one layer at a time, its causal mask.
- reference: the policy whole in train.dtype (4P) and autocast's bf16 copies (2P), or under FSDP2 in
  the train workers 4P / W and bf16 gathered layers; reference.batch_size items a pass, no gradient.
- train: 4P + 4P + 8P (fp32 weights, gradients, AdamW moments), / W under FSDP2; FSDP2's gathered
  layers in bf16 and the unsharded fp32 gradients accumulated until a step's last micro-batch (4P);
  without FSDP2, autocast's bf16 copies (2P, the whole model); gradient checkpointing's layer
  inputs (micro_batch_size x list size x max_length tokens x L x h x 4 B); one layer's recompute
  working set x 2; eager attention's scores (Gemma-2); the packed mask; the logits chunk
  (logprob_chunk_size x V x 4 B x 3).

{architecture_table()}

## Summary: peak GB per GPU, stage by stage

{summary_table(plans)}

"""
    verdict = ("Every recipe fits 80 GB a GPU in every stage." if all(p["fits"] for p in plans) else
               "**Not every recipe fits 80 GB a GPU: see the rows marked NO.**")
    return header + verdict + "\n\n" + "\n".join(recipe_section(p) for p in plans)


def plans() -> list[dict]:
    # Table 3's recipes. Table 2's (ranked by PairRM, "-pairrm-" in their name) differ from their
    # Table 3 twins only in the reranker, a 0.4B DeBERTa whose memory this plan does not model.
    return [plan_recipe(path) for path in sorted(PAPER_DIR.glob("*.yaml")) if "-pairrm-" not in path.name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print only; leave the markdown file as it is")
    args = parser.parse_args(argv)
    all_plans = plans()
    text = render(all_plans)
    print(text)
    if not args.stdout:
        PLAN_MD.write_text(text)
        print(f"wrote {PLAN_MD.relative_to(REPO_ROOT)}", file=sys.stderr)
    if not all(p["fits"] for p in all_plans):
        print("warning: not every recipe fits 80 GB a GPU", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
