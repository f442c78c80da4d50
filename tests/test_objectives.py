"""Objectives against brute-force references written independently with plain Python loops."""

import itertools
import math

import pytest
import torch

from core.config import LambdarankOptions, SimpoOptions, TrainConfig
from core.objectives import OBJECTIVES, mean_margin, objective_options, ranking_accuracy


def options(name: str, ndcg: bool = False) -> dict:
    """What the trainer hands objective `name` besides `rewards`: its own options, from a train config."""
    return objective_options(TrainConfig(objective=name, beta=0.5, simpo=SimpoOptions(gamma=0.5),
                                         lambdarank=LambdarankOptions(ndcg=ndcg)))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_listmle(s: list[float]) -> float:
    """-log of the Plackett-Luce probability of the order s[0], s[1], ..."""
    prob = 1.0
    for i in range(len(s)):
        prob *= math.exp(s[i]) / sum(math.exp(v) for v in s[i:])
    return -math.log(prob)


def ref_contrastive(s: list[float]) -> float:
    return -math.log(math.exp(s[0]) / sum(math.exp(v) for v in s))


def ref_lambdarank(s: list[float], weights=None) -> float:
    total = 0.0
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            w = 1.0 if weights is None else weights[i][j]
            total += -w * log_sigmoid(s[i] - s[j])
    return total


def ref_ndcg_weights(s: list[float], rewards: list[float]) -> list[list[float]]:
    """|G_i - G_j| * |1/log2(1 + rank_i) - 1/log2(1 + rank_j)|, ranks by the scores (1 = highest)."""
    by_score = sorted(range(len(s)), key=lambda i: -s[i])
    rank = {item: position + 1 for position, item in enumerate(by_score)}
    gain = [2.0**r - 1 for r in rewards]
    return [
        [abs(gain[i] - gain[j]) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j])) for j in range(len(s))]
        for i in range(len(s))
    ]


def row(values: list[float], width: int | None = None, pad: float = 0.0):
    """A [1, width] scores/mask pair with ``values`` real and the rest padding."""
    width = width or len(values)
    scores = torch.tensor([values + [pad] * (width - len(values))], dtype=torch.float64)
    mask = torch.tensor([[True] * len(values) + [False] * (width - len(values))])
    return scores, mask


def test_registry():
    assert {"dpo", "contrastive", "lambdarank", "listmle", "ipo", "simpo"} <= set(OBJECTIVES)


def test_listmle_is_plackett_luce():
    values = [0.3, -1.2, 2.0, 0.7]
    scores, mask = row(values)
    assert OBJECTIVES["listmle"](scores, mask).item() == pytest.approx(ref_listmle(values), rel=1e-10)
    # A likelihood over orders: the probabilities of all 24 orders sum to one.
    total = 0.0
    for order in itertools.permutations(values):
        assert OBJECTIVES["listmle"](*row(list(order))).item() == pytest.approx(ref_listmle(list(order)), rel=1e-10)
        total += math.exp(-OBJECTIVES["listmle"](*row(list(order))).item())
    assert total == pytest.approx(1.0, rel=1e-10)


def test_contrastive_and_lambdarank_match_references():
    values = [0.3, -1.2, 2.0, 0.7, -0.1]
    scores, mask = row(values)
    assert OBJECTIVES["contrastive"](scores, mask).item() == pytest.approx(ref_contrastive(values), rel=1e-10)
    assert OBJECTIVES["lambdarank"](scores, mask).item() == pytest.approx(ref_lambdarank(values), rel=1e-10)


def test_pairwise_baselines_match_formulas():
    values = [0.3, 2.0, -0.4]  # best 0.3, last real -0.4
    scores, mask = row(values, width=5, pad=7.0)
    assert OBJECTIVES["dpo"](scores, mask).item() == pytest.approx(-log_sigmoid(0.7), rel=1e-10)
    assert OBJECTIVES["simpo"](scores, mask, gamma=0.2).item() == pytest.approx(-log_sigmoid(0.5), rel=1e-10)
    beta = 0.5
    h = 0.7 / beta  # IPO works on the raw log-ratio difference
    assert OBJECTIVES["ipo"](scores, mask, beta=beta).item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-10)


def test_two_items_reduce_to_dpo():
    scores = torch.tensor([[0.4, -0.3], [-2.0, 1.5], [3.0, 3.0]], dtype=torch.float64)
    mask = torch.ones_like(scores, dtype=torch.bool)
    dpo = OBJECTIVES["dpo"](scores, mask)
    for name in ("contrastive", "lambdarank", "listmle"):
        torch.testing.assert_close(OBJECTIVES[name](scores, mask), dpo)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("pad", [0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")])
def test_padding_changes_nothing(name, pad):
    rows = [[0.5, -0.2, 1.3, 0.1], [2.0, -1.0], [0.0, 0.3, -0.7]]
    rewards_rows = [[0.9, 0.6, 0.4, 0.1], [0.8, 0.2], [0.7, 0.5, 0.3]]
    width = 6
    scores = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    rewards = torch.tensor([r + [pad] * (width - len(r)) for r in rewards_rows], dtype=torch.float64)
    given = {**options(name, ndcg=True), "rewards": rewards}
    loss = OBJECTIVES[name](scores, mask, **given)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(scores.grad).all()
    assert (scores.grad[~mask] == 0).all()
    for b, values in enumerate(rows):
        alone = torch.tensor([values], dtype=torch.float64, requires_grad=True)
        alone_options = {**given, "rewards": torch.tensor([rewards_rows[b]], dtype=torch.float64)}
        alone_loss = OBJECTIVES[name](alone, torch.ones_like(alone, dtype=torch.bool), **alone_options)
        alone_loss.sum().backward()
        torch.testing.assert_close(loss[b], alone_loss[0])
        torch.testing.assert_close(scores.grad[b, : len(values)], alone.grad[0])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_scores_stay_finite(name, dtype):
    scores = torch.tensor(
        [[1e4, -1e4, 1e4, -1e4], [-1e4, 1e4, 0.0, 0.0], [1e4, -1e4, 0.0, 0.0], [-1e4, -1e4, 1e4, 0.0]],
        dtype=dtype,
        requires_grad=True,
    )
    mask = torch.tensor([[True] * 4, [True] * 3 + [False], [True, True, False, False], [True, True, True, False]])
    rewards = torch.tensor([[1.0, 0.5, 0.2, 0.0]] * 4, dtype=dtype)
    for ndcg in (False, True):
        scores.grad = None
        loss = OBJECTIVES[name](scores, mask, rewards=rewards, **options(name, ndcg))
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_reward_order_beats_reverse_and_descent_learns_it(name):
    ordered = torch.tensor([[1.5, 0.5, -0.5, -1.5]], dtype=torch.float64)
    mask = torch.ones_like(ordered, dtype=torch.bool)
    objective, opts = OBJECTIVES[name], options(name)
    assert objective(ordered, mask, **opts) < objective(ordered.flip(-1), mask, **opts)

    scores = ordered.flip(-1).clone().requires_grad_(True)
    losses, accuracies = [], []
    optimizer = torch.optim.SGD([scores], lr=0.05)
    for _ in range(30):
        loss = objective(scores, mask, **opts).sum()
        losses.append(loss.item())
        accuracies.append(ranking_accuracy(scores.detach(), mask).item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]
    assert accuracies[-1] > accuracies[0]


def test_ndcg_weights_match_brute_force_and_change_the_loss():
    values = [0.2, 1.1, -0.3, 0.6]  # current scores disagree with the reward order
    rewards = [1.0, 0.7, 0.4, 0.0]
    scores, mask = row(values, width=6, pad=5.0)
    reward_tensor = torch.tensor([rewards + [3.0, 3.0]], dtype=torch.float64)
    weighted = OBJECTIVES["lambdarank"](scores, mask, ndcg_weights=True, rewards=reward_tensor).item()
    assert weighted == pytest.approx(ref_lambdarank(values, ref_ndcg_weights(values, rewards)), rel=1e-10)
    assert weighted != pytest.approx(OBJECTIVES["lambdarank"](scores, mask).item())


def test_ndcg_weights_need_rewards():
    with pytest.raises(ValueError, match="rewards"):
        OBJECTIVES["lambdarank"](*row([1.0, 0.0]), ndcg_weights=True)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_invalid_rows_raise(name):
    with pytest.raises(ValueError):
        OBJECTIVES[name](*row([1.0], width=3), **options(name))
    with pytest.raises(ValueError):  # padding in the middle
        OBJECTIVES[name](torch.zeros(1, 3), torch.tensor([[True, False, True]]), **options(name))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_unknown_option_raises(name):
    scores, mask = row([1.0, 0.0, -1.0])
    with pytest.raises(TypeError, match="not_an_option"):
        OBJECTIVES[name](scores, mask, not_an_option=3, **options(name))
    # An option of another objective is unknown too: it would silently do nothing.
    foreign = {"ipo": "gamma"}.get(name, "beta")
    with pytest.raises(TypeError, match=foreign):
        OBJECTIVES[name](scores, mask, **{foreign: 0.5})


def test_misspelt_option_raises():
    with pytest.raises(TypeError, match="ndcg_weight"):
        OBJECTIVES["lambdarank"](*row([1.0, 0.0]), ndcg_weight=True, rewards=torch.tensor([[1.0, 0.0]]))


def test_objective_options_are_exactly_what_each_objective_takes():
    import dataclasses

    train = TrainConfig(beta=0.3, lambdarank=LambdarankOptions(ndcg=True), simpo=SimpoOptions(gamma=0.7))
    expected = {"dpo": {}, "contrastive": {}, "listmle": {}, "lambdarank": {"ndcg_weights": True},
                "ipo": {"beta": 0.3}, "simpo": {"gamma": 0.7}}
    assert set(OBJECTIVES) == set(expected)
    scores, mask = row([1.0, 0.0, -1.0])
    rewards = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    for name, want in expected.items():
        config = dataclasses.replace(train, objective=name)
        assert objective_options(config) == want
        assert objective_options(dataclasses.asdict(config)) == want  # the trainer's dict of the section
        # The trainer's call: rewards for every objective, whether it reads them or not.
        assert torch.isfinite(OBJECTIVES[name](scores, mask, rewards=rewards, **want)).all()


def test_metrics():
    scores = torch.tensor([[3.0, 1.0, 2.0, 9.0], [0.0, 1.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # Row 0 pairs (0,1) (0,2) right, (1,2) wrong; row 1 its only pair wrong.
    torch.testing.assert_close(ranking_accuracy(scores, mask), torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(mean_margin(scores, mask), torch.tensor([3.0 - 1.5, -1.0]))
