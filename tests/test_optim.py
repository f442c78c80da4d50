"""stages/train/optim.py: AdamW with bf16 moments follows fp32 AdamW."""

import pytest
import torch

from stages.train.optim import AdamWBf16, build_optimizer, round_to_bf16_stochastic, uniform_noise


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    generator = torch.Generator().manual_seed(0)
    # 1 + 0.3 ulp of bf16 (ulp at 1.0 is 2**-7), and its negative.
    for value in (1 + 0.3 * 2 ** -7, -(1 + 0.3 * 2 ** -7)):
        x = torch.full((200_000,), value)
        rounded = round_to_bf16_stochastic(x, uniform_noise(x.numel(), generator)).float()
        neighbours = {abs(value) - 0.3 * 2 ** -7, abs(value) + 0.7 * 2 ** -7}
        assert set(rounded.abs().unique().tolist()) == neighbours
        assert rounded.mean().item() == pytest.approx(value, abs=2e-5)
        # Round-to-nearest would always pick the lower neighbour: a bias of 0.3 ulp.
        assert x.to(torch.bfloat16).float().mean().item() != pytest.approx(value, abs=2e-5)


def test_exactly_representable_values_are_unchanged():
    x = torch.tensor([0.0, 1.0, -2.5, 3.0e-5]).to(torch.bfloat16).float()
    assert torch.equal(round_to_bf16_stochastic(x, uniform_noise(4, torch.Generator().manual_seed(1))).float(), x)


def test_second_moment_does_not_freeze():
    # Constant gradient 1: v_t = 1 - 0.999**t. With round-to-nearest bf16, v stops
    # near 0.25 because each step's change is under half an ulp.
    param = torch.nn.Parameter(torch.zeros(4096))
    optimizer = AdamWBf16([param], lr=1e-9)
    for _ in range(1500):
        param.grad = torch.ones_like(param)
        optimizer.step()
    v = optimizer.state[param]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16
    assert v.float().mean().item() == pytest.approx(1 - 0.999 ** 1500, rel=0.02)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_follows_torch_adamw_on_a_regression(weight_decay):
    torch.manual_seed(0)
    data, target = torch.randn(256, 32), torch.randn(256, 4)
    start = torch.nn.Linear(32, 4)
    models = {name: torch.nn.Linear(32, 4) for name in ("adamw", "adamw_bf16")}
    optimizers = {}
    for name, model in models.items():
        model.load_state_dict(start.state_dict())
        optimizers[name] = build_optimizer(name, model.parameters(), lr=1e-2, weight_decay=weight_decay)
    losses = {}
    for name, model in models.items():
        for step in range(200):
            batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
            loss = torch.nn.functional.mse_loss(model(data[batch]), target[batch])
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
        losses[name] = torch.nn.functional.mse_loss(model(data), target).item()
    initial = torch.nn.functional.mse_loss(start(data), target).item()
    assert losses["adamw_bf16"] < 0.8 * initial
    assert losses["adamw_bf16"] == pytest.approx(losses["adamw"], rel=0.02)
    for a, b in zip(models["adamw"].parameters(), models["adamw_bf16"].parameters()):
        assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


def test_chunked_update_matches_torch_adamw_for_any_chunk_size():
    torch.manual_seed(0)
    initial = torch.randn(1000)
    params = [torch.nn.Parameter(initial.clone()) for _ in range(3)]
    optimizers = [torch.optim.AdamW([params[0]], lr=1e-3, weight_decay=0.01),
                  AdamWBf16([params[1]], lr=1e-3, weight_decay=0.01, chunk_size=1 << 20),
                  AdamWBf16([params[2]], lr=1e-3, weight_decay=0.01, chunk_size=7)]
    for _ in range(5):
        grad = torch.randn(1000)
        for param, optimizer in zip(params, optimizers):
            param.grad = grad.clone()
            optimizer.step()
    moved = (params[0] - initial).abs().mean().item()
    assert moved > 1e-3
    for param in params[1:]:
        # bf16 moments carry 0.4% relative error: far below the 1e-3 a step moves.
        assert (param - params[0]).abs().max().item() < 1e-4


def test_moments_take_half_the_memory_of_adamw():
    sizes = {}
    for name in ("adamw", "adamw_bf16"):
        param = torch.nn.Parameter(torch.zeros(10_000))
        optimizer = build_optimizer(name, [param], lr=1e-3, weight_decay=0.0)
        param.grad = torch.ones_like(param)
        optimizer.step()
        sizes[name] = sum(t.numel() * t.element_size() for t in optimizer.state[param].values()
                          if torch.is_tensor(t) and t.numel() > 1)
    assert sizes["adamw_bf16"] * 2 == sizes["adamw"]
