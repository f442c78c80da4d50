"""Every seed a round uses, derived from the run's `seed` in one place."""

from __future__ import annotations

from collections.abc import Callable

# (run seed, round number) -> the seed of one use.
SEEDS: dict[str, Callable[[int, int], int]] = {
    # A different engine seed each round, so rounds do not repeat each other's samples;
    # engine i of a stage adds i (pools/vllm_engines.py).
    "generate": lambda seed, number: seed + 1000 * number,
    # lists.strategy=random, with each prompt_id (stages/rerank.py).
    "lists": lambda seed, number: seed + 1000 * number,
    # The trainer's torch seed, its data order and the optimizer's rounding.
    "train": lambda seed, number: seed + number,
    # The same engine seed every round: only the policy differs between rounds' answers.
    "evaluate": lambda seed, number: seed,
}


def derive_seed(seed: int, use: str, number: int) -> int:
    """The seed of `use` (a key of SEEDS) in round `number` of a run seeded `seed`."""
    return SEEDS[use](seed, number)
