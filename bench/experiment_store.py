"""The experiment's methods and its store of finished runs (docs/experiments/<method>/seed-<s>/).

What bench/experiment.py runs and bench/experiment_tables.py, bench/replay_summary.py and
bench/experiment_summary.py read back. It imports only bench/common.py of bench/
(tests/test_bench_imports.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT

STORE = REPO_ROOT / "docs" / "experiments"


@dataclass(frozen=True)
class Method:
    label: str            # for tables
    short: str            # for sentences
    overrides: tuple[str, ...]
    # (method, round) pairs, longest first: up to that round this method computes exactly what that one
    # does, so its run starts from the first such run (same seed) whose rounds up to it have finished.
    same_as: tuple[tuple[str, int], ...] = ()


# The lists keys are written out even where they equal configs/default.yaml, so that
# another --config gets the same lists. Only `dpo` changes the number of samples.
CONTRASTIVE = ("train.objective=contrastive", "lists.strategy=top_bottom", "lists.num_positives=1",
               "lists.num_negatives=3")
NO_REPLAY_YET = (("replay-none", 1), ("contrastive", 1))
METHODS: dict[str, Method] = {
    "dpo": Method("iterative DPO (K=2, best vs worst)", "iterative DPO",
                  ("train.objective=dpo", "generate.num_samples=2",
                   "lists.strategy=top_bottom", "lists.num_positives=1", "lists.num_negatives=1")),
    "dpo-k": Method("pairwise DPO (same K, best vs worst)", "DPO on K",
                    ("train.objective=dpo", "lists.strategy=top_bottom",
                     "lists.num_positives=1", "lists.num_negatives=1")),
    "contrastive": Method("LarPO contrastive (top-1 vs bottom-3)", "contrastive", CONTRASTIVE),
    "lambdarank": Method("LarPO LambdaRank (top-2 vs bottom-2)", "LambdaRank",
                         ("train.objective=lambdarank", "lists.strategy=top_bottom",
                          "lists.num_positives=2", "lists.num_negatives=2")),
    "listmle": Method("LarPO ListMLE (top-2 vs bottom-2)", "ListMLE",
                      ("train.objective=listmle", "lists.strategy=top_bottom",
                       "lists.num_positives=2", "lists.num_negatives=2")),
    # The paper's Table 4, small: the default config with earlier rounds' lists replayed in training.
    # `replay-none` is the default again, for a seed whose `contrastive` run ran on another kind of
    # machine: runs are compared only within one machine kind (bench/replay_summary.py says why).
    "replay-none": Method("LarPO contrastive, no replay, beside the replays", "no replay",
                          (*CONTRASTIVE, "train.replay=none")),
    # Round 1 has no earlier round to replay: it is the default's round 1.
    "replay-previous": Method("LarPO contrastive + round N-1's lists", "replay previous",
                              (*CONTRASTIVE, "train.replay=previous"), same_as=NO_REPLAY_YET),
    # Rounds 1 and 2 have at most one earlier round: `all` replays what `previous` does.
    "replay-all": Method("LarPO contrastive + rounds 1..N-1's lists", "replay all", (*CONTRASTIVE, "train.replay=all"),
                         same_as=(("replay-previous", 2), *NO_REPLAY_YET)),
}
LARPO = ("contrastive", "lambdarank", "listmle")
# The methods `make experiment` runs unless --methods says otherwise; `make experiment-replay` the ablation.
MAIN_METHODS = ("dpo", "dpo-k", *LARPO)
REPLAY_METHODS = ("contrastive", "replay-none", "replay-previous", "replay-all")
# Its overrides are configs/default.yaml's own lists and objective: its runs are default runs.
DEFAULT_METHOD = "contrastive"
DEFAULT_SEEDS = (0, 1, 2)


# --- the store ---------------------------------------------------------------------

def seed_dir(store: Path, method: str, seed: int) -> Path:
    return store / method / f"seed-{seed}"


def stored_rounds(store: Path, method: str, seed: int) -> set[int]:
    """Round numbers of a (method, seed) that the store holds whole: metrics.json and eval shards."""
    found = set()
    for round_dir in seed_dir(store, method, seed).glob("round_[0-9][0-9][0-9]"):
        if (round_dir / "metrics.json").is_file() and any((round_dir / "eval").glob("part-*.parquet")):
            found.add(int(round_dir.name[len("round_"):]))
    return found


def stored_machine(store: Path, method: str, seed: int) -> dict | None:
    """The machine.json a stored (method, seed) ran on; None if not recorded."""
    path = seed_dir(store, method, seed) / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else None


def machine_kind(found: dict | None) -> tuple | None:
    """What two runs must share to be compared answer by answer: the CPU, its SIMD and its cores.
    Across kinds the numerics differ (bf16 with AMX or AVX512_BF16, float32 on AVX2), and so do the answers."""
    if found is None:
        return None
    return found.get("cpu"), tuple(found.get("simd") or ()), found.get("cores")
