"""Ranking objectives of LarPO (arXiv 2502.03699) and two pairwise baselines.

Every objective is called the same way::

    loss = OBJECTIVES[name](scores, mask, rewards=rewards, **objective_options(train))   # [B, K] -> [B]

- ``scores[b, i]`` is the retriever score of list item i, s_i = beta * (log pi_theta(y_i|x) -
  log pi_ref(y_i|x)) (``simpo`` reads a different score, see there).
- Items are in reward order, best first; ``mask`` is True for real items, padding sits at the end.
- ``rewards`` [B, K] (the items' rewards) is accepted by every objective, and handed on only to
  those that read it (``lambdarank``); it may be left out.
- The other keyword options are exactly the keyword-only parameters of the objective's function
  (``OPTIONS[name]``); ``objective_options`` reads them from the train config. Any other option is
  a TypeError, so a misspelt option fails instead of training with its default.
- The result is the per-example loss; the trainer reduces it.

Padding never reaches the arithmetic: it is replaced by a constant before any operation, so
neither its value (huge, inf, nan) nor its gradient can leak into the real items.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES: dict[str, Callable[..., Tensor]] = {}
# The keyword options each objective takes, besides `rewards`.
OPTIONS: dict[str, tuple[str, ...]] = {}
# The train config key each option is read from, dotted below `train.`: an objective's own options
# sit in a section named after it (core/config.py). `rewards` is none: the trainer passes the lists' own.
OPTION_FIELDS = {"beta": "beta", "ndcg_weights": "lambdarank.ndcg", "gamma": "simpo.gamma"}
# Train config keys that only the objectives taking them read (config loading refuses one set for
# another objective). Not beta: it scales every objective's scores, not only IPO's option.
OBJECTIVE_SPECIFIC_FIELDS = ("lambdarank.ndcg", "simpo.gamma")


def _check(scores: Tensor, mask: Tensor) -> Tensor:
    """Validate a batch and return the mask as bool."""
    if scores.dim() != 2 or scores.shape != mask.shape:
        raise ValueError(f"scores and mask must both be [B, K], got {tuple(scores.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if (mask.sum(-1) < 2).any():
        raise ValueError("every row needs at least 2 real items (mask True)")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("padding must sit at the end of each row (mask must be non-increasing)")
    return mask


def objective(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` under ``name``; the registered function validates its inputs first.

    ``fn``'s keyword-only parameters are its options; ``rewards`` among them means it reads the rewards.
    """

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = inspect.signature(fn).parameters.values()
        keywords = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        reads_rewards = "rewards" in keywords
        takes = tuple(k for k in keywords if k != "rewards")
        if unmapped := set(takes) - set(OPTION_FIELDS):
            raise TypeError(f"objective {name!r}: option(s) {sorted(unmapped)} have no entry in OPTION_FIELDS")

        @functools.wraps(fn)
        def checked(scores: Tensor, mask: Tensor, *, rewards: Tensor | None = None, **options) -> Tensor:
            if reads_rewards:
                options["rewards"] = rewards
            return fn(scores, _check(scores, mask), **options)  # an option fn does not take: TypeError

        OBJECTIVES[name] = checked
        OPTIONS[name] = takes
        return checked

    return register


def objective_options(train: Any) -> dict[str, Any]:
    """The options the train config's objective takes, from its fields (a TrainConfig or its dict)."""
    return {option: train_value(train, OPTION_FIELDS[option]) for option in OPTIONS[train_value(train, "objective")]}


def train_value(train: Any, dotted: str) -> Any:
    """Train config key ``dotted`` (``simpo.gamma``) of a TrainConfig or of its dict."""
    value = train
    for part in dotted.split("."):
        value = value[part] if isinstance(value, Mapping) else getattr(value, part)
    return value


def readers(field: str) -> list[str]:
    """The objectives that take an option read from train config key ``field``."""
    return sorted(name for name, options in OPTIONS.items() if any(OPTION_FIELDS[o] == field for o in options))


def _fill(scores: Tensor, mask: Tensor, value: float) -> Tensor:
    """Scores with padding replaced by ``value``; `where` routes no gradient to padding."""
    return torch.where(mask, scores, torch.full_like(scores, value))


def _first_last(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(s_0, s_last real) per row."""
    last = (mask.sum(-1) - 1).unsqueeze(-1)
    return scores[:, 0], _fill(scores, mask, 0.0).gather(-1, last).squeeze(-1)


def _pair_mask(mask: Tensor) -> Tensor:
    """[B, K, K] True where i < j and both items are real."""
    k = mask.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=mask.device).triu(1)
    return upper & mask.unsqueeze(-1) & mask.unsqueeze(-2)


def _pair_diffs(scores: Tensor, mask: Tensor) -> Tensor:
    """[B, K, K] s_i - s_j, zero wherever padding is involved."""
    s = _fill(scores, mask, 0.0)
    return s.unsqueeze(-1) - s.unsqueeze(-2)


@objective("dpo")
def dpo(scores: Tensor, mask: Tensor) -> Tensor:
    """Pairwise (DPO) on the best and the worst real item: -log sigmoid(s_0 - s_last)."""
    best, worst = _first_last(scores, mask)
    return -F.logsigmoid(best - worst)


@objective("contrastive")
def contrastive(scores: Tensor, mask: Tensor) -> Tensor:
    """InfoNCE of item 0 against every other real item.

    loss = -log( exp s_0 / sum_{i real} exp s_i ) = logsumexp_{i real} s_i - s_0
    """
    return torch.logsumexp(_fill(scores, mask, float("-inf")), dim=-1) - scores[:, 0]


def _ndcg_pair_weights(scores: Tensor, mask: Tensor, rewards: Tensor) -> Tensor:
    """LiPO-lambda pair weights, [B, K, K], constant (no gradient).

    w_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, with gain G = 2^reward - 1,
    discount D(tau) = log2(1 + tau), tau_i the 1-based rank of item i when the real items are
    sorted by the current scores (descending).

    This is |delta DCG| of swapping i and j. NDCG divides it by the row's ideal DCG, a constant
    per row; like LiPO (TF-Ranking's NDCGLambdaWeight, normalized=False) we leave it out, which
    keeps rows with negative or all-equal rewards (ideal DCG <= 0) well defined.
    """
    with torch.no_grad():
        s = _fill(scores.detach(), mask, float("-inf"))
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
        positions = torch.arange(1, s.shape[-1] + 1, device=s.device, dtype=s.dtype).expand_as(s)
        rank = torch.empty_like(s).scatter_(-1, order, positions)
        gain = torch.exp2(_fill(rewards.to(s.dtype), mask, 0.0)) - 1
        inv_discount = 1.0 / torch.log2(1.0 + rank)
        return (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (
            inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)
        ).abs()


@objective("lambdarank")
def lambdarank(scores: Tensor, mask: Tensor, *, ndcg_weights: bool = False, rewards: Tensor | None = None) -> Tensor:
    """Pairwise logistic loss over all ordered pairs of real items (the paper's LambdaRank).

    loss = sum_{i<j real} w_ij * -log sigmoid(s_i - s_j)

    w_ij = 1 by default. With ``ndcg_weights=True`` it is the LiPO-lambda weight |delta DCG_ij|
    (see ``_ndcg_pair_weights``) computed from ``rewards`` [B, K]; gains grow as 2^reward, so pass
    rewards on a small scale (e.g. in [0, 1]). Pairs with equal rewards then get weight 0.
    """
    pairs = _pair_mask(mask)
    losses = -F.logsigmoid(_pair_diffs(scores, mask))
    if ndcg_weights:
        if rewards is None:
            raise ValueError("lambdarank with ndcg_weights=True needs the `rewards` option [B, K]")
        losses = losses * _ndcg_pair_weights(scores, mask, rewards)
    return torch.where(pairs, losses, torch.zeros_like(losses)).sum(dim=(-2, -1))


@objective("listmle")
def listmle(scores: Tensor, mask: Tensor) -> Tensor:
    """Exact Plackett-Luce negative log-likelihood of the given (reward) order of real items.

    loss = -sum_{i real} log( exp s_i / sum_{j >= i, j real} exp s_j )
         =  sum_{i real} ( logsumexp_{j >= i, j real} s_j - s_i )

    The suffix logsumexp is a reversed logcumsumexp. Padding is filled with the dtype's most
    negative finite number rather than -inf: a suffix of padding alone then stays finite, so its
    backward has no inf - inf.
    """
    s = _fill(scores, mask, torch.finfo(scores.dtype).min)
    suffix = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    terms = torch.where(mask, suffix - s, torch.zeros_like(s))
    return terms.sum(-1)


@objective("ipo")
def ipo(scores: Tensor, mask: Tensor, *, beta: float = 0.1) -> Tensor:
    """IPO (Azar et al. 2023) on the best and the worst real item, as in TRL.

    IPO's regression target is on the raw log-ratio difference
        h = (log pi/pi_ref)(y_0) - (log pi/pi_ref)(y_last),   loss = (h - 1/(2 tau))^2.
    Our scores already carry beta (s = beta * log-ratio), so h = (s_0 - s_last) / beta and beta
    plays IPO's tau. ``beta`` must therefore be the beta the scores were built with.
    """
    best, worst = _first_last(scores, mask)
    h = (best - worst) / beta
    return (h - 1.0 / (2.0 * beta)) ** 2


@objective("simpo")
def simpo(scores: Tensor, mask: Tensor, *, gamma: float = 0.5) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised pairwise loss.

    Here ``scores`` are NOT log-ratios: s_i = beta * (1/|y_i|) * log pi_theta(y_i|x), beta times
    the policy's mean per-token log-prob, no reference model (``sequence_logprobs(average=True)``).
    loss = -log sigmoid(s_0 - s_last - gamma), gamma the target reward margin in score units.
    """
    best, worst = _first_last(scores, mask)
    return -F.logsigmoid(best - worst - gamma)


def ranking_accuracy(scores: Tensor, mask: Tensor) -> Tensor:
    """Share of real ordered pairs i < j that the scores rank correctly (s_i > s_j), [B]."""
    mask = _check(scores, mask)
    pairs = _pair_mask(mask)
    correct = (_pair_diffs(scores, mask) > 0) & pairs
    return correct.sum(dim=(-2, -1)).to(scores.dtype) / pairs.sum(dim=(-2, -1)).to(scores.dtype)


def mean_margin(scores: Tensor, mask: Tensor) -> Tensor:
    """s_0 minus the mean score of the other real items, [B]."""
    mask = _check(scores, mask)
    others = mask.clone()
    others[:, 0] = False
    total = torch.where(others, scores, torch.zeros_like(scores)).sum(-1)
    return scores[:, 0] - total / others.sum(-1).to(scores.dtype)


# Objectives whose scores are beta * mean token log-prob of the policy alone
# (no reference): the trainer scores their items with `average=True` and no ref_logp.
REFERENCE_FREE = frozenset({"simpo"})
