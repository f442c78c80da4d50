"""In-training checkpoints: a killed train stage resumes at its last saved step.

Every `train.checkpoint_every` steps rank 0 writes one file, `checkpoint.pt`,
inside the stage's `.partial` output directory: the full (unsharded) weights,
the optimizer and scheduler states, the random-number states and the metrics
of the steps done so far. The data position is the step count: the batches of
every step come from a seeded shuffle (`global_batches`), so the same steps
follow. The file is replaced atomically, and it is removed once the policy is
saved. A checkpoint written for other inputs (another train config, train
shard or starting policy) is ignored, not loaded.

Full state dicts (torch.distributed.checkpoint's `full_state_dict`) make the
file independent of the number of workers and of FSDP sharding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pipeline.config import TRAIN_FINGERPRINT_EXCLUDED

log = logging.getLogger(__name__)


def fingerprint(cfg: dict[str, Any], num_examples: int) -> str:
    """What a checkpoint must have been trained on to be resumed from."""
    shard = Path(cfg["train_shard"])
    # Train knobs that change neither the steps nor their results (fingerprint=False) are left out.
    identity = {
        "train": {k: v for k, v in cfg["train"].items() if k not in TRAIN_FINGERPRINT_EXCLUDED},
        "seed": cfg["seed"], "policy_in": cfg["policy_in"], "examples": num_examples,
        "train_shard_bytes": shard.stat().st_size,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class TrainingCheckpoint:
    def __init__(self, path: Path, fingerprint: str):
        self.path = path.with_suffix(".pt")
        self.fingerprint = fingerprint
        self.options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save(self, model, optimizer, scheduler, history: list[dict], rank: int) -> None:
        # Every worker takes part: under FSDP, gathering the full state is a collective.
        model_state, optimizer_state = get_state_dict(model, optimizer, options=self.options)
        if rank != 0:
            return
        state = {
            "fingerprint": self.fingerprint, "model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "history": history, "torch_rng": torch.get_rng_state(),
        }
        if isinstance(getattr(optimizer, "generator", None), torch.Generator):
            state["optimizer_rng"] = optimizer.generator.get_state()
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)
        log.info("train checkpoint at step %d: %s", len(history), self.path)

    def restore(self, model, optimizer, scheduler) -> list[dict]:
        """Load the checkpoint into the given objects; the metrics of the steps it covers ([] if none)."""
        if not self.path.is_file():
            return []
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(f"ignoring {self.path}: it was written for other training inputs", file=sys.stderr, flush=True)
            return []
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if "optimizer_rng" in state:
            optimizer.generator.set_state(state["optimizer_rng"])
        # print, not log: Ray forwards a worker's stderr to the driver, not its INFO records.
        print(f"resuming training after step {len(state['history'])} from {self.path}", file=sys.stderr, flush=True)
        return list(state["history"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
