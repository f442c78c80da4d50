"""Optimizers the trainer can use, by config name (`train.optimizer`).

`adamw` is torch's AdamW. `adamw_bf16` keeps AdamW's two moments in bfloat16,
which halves the optimizer state (for a 135M model: 0.54 GiB instead of
1.08 GiB), the largest single block of training memory after the weights.

Plain bf16 storage would break the second moment: with beta2 = 0.999 a step
changes v by 0.1%, less than half a bf16 ulp (0.4%), so round-to-nearest
writes back the old value and v freezes. The moments are therefore written
back with stochastic rounding, which is unbiased: v follows its fp32
trajectory on average. The update itself is computed in fp32, a slice of each
parameter at a time, so the step adds no parameter-sized fp32 temporaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def round_to_bf16_stochastic(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down with probability proportional to the distance.

    bf16 is the top 16 bits of fp32; adding uniform noise below them (``noise``: int32 in
    [0, 2**16), one per value) before truncating is stochastic rounding of the magnitude
    (float bits are sign-magnitude).
    """
    bits = values.contiguous().view(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def uniform_noise(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1 << 16, (count,), dtype=torch.int32, generator=generator)


class AdamWBf16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with bf16 moments; see the module docstring."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, chunk_size: int = 1 << 20, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.chunk_size = chunk_size
        # Its own generator, seeded alike on every data-parallel worker: all workers
        # apply the same reduced gradient and must round the same way to stay identical.
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        # One pool of noise per step for each moment, each chunk reading it from a random
        # offset: every value still gets uniform noise independent of itself, which is all
        # unbiased rounding needs, and drawing fresh values for every one slowed the whole step
        # (docs/benchmarks.md).
        width = min(self.chunk_size, max((_local(p).numel() for group in self.param_groups
                                          for p in group["params"] if p.grad is not None), default=0))
        pools = uniform_noise(4 * width, self.generator).view(2, 2 * width)
        pools_on: dict[torch.device, torch.Tensor] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                bias2 = 1 - beta2 ** state["step"]
                decay = 1 - group["lr"] * group["weight_decay"]
                flat = [_local(t).view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
                if flat[0].device not in pools_on:
                    pools_on[flat[0].device] = pools.to(flat[0].device)
                noise_m, noise_v = pools_on[flat[0].device]
                for begin in range(0, flat[0].numel(), self.chunk_size):
                    p, g, m, v = (t[begin:begin + self.chunk_size] for t in flat)
                    offset = int(torch.randint(0, width + 1, (), generator=self.generator))
                    noise = slice(offset, offset + p.numel())
                    g = g.float()
                    m32 = m.float().mul_(beta1).add_(g, alpha=1 - beta1)
                    v32 = v.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    if decay != 1:
                        p.mul_(decay)
                    p.addcdiv_(m32, v32.div(bias2).sqrt_().add_(group["eps"]), value=-step_size)
                    m.copy_(round_to_bf16_stochastic(m32, noise_m[noise]))
                    v.copy_(round_to_bf16_stochastic(v32, noise_v[noise]))
        return loss


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's shard of an FSDP (DTensor) parameter; the tensor itself otherwise.
    AdamW is elementwise, so each worker updates its shard alone."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def adamw(params, lr: float, weight_decay: float, seed: int) -> torch.optim.Optimizer:
    # foreach=False: the multi-tensor step's temporaries cost memory and bought no speed here.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def adamw_bf16(params, lr: float, weight_decay: float, seed: int) -> torch.optim.Optimizer:
    return AdamWBf16(params, lr=lr, weight_decay=weight_decay, seed=seed)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": adamw, "adamw_bf16": adamw_bf16}


def build_optimizer(name: str, params, lr: float, weight_decay: float, seed: int = 0) -> torch.optim.Optimizer:
    return OPTIMIZERS[name](list(params), lr=lr, weight_decay=weight_decay, seed=seed)
