"""In-training checkpoints: a killed train stage resumes at its last saved step.

Every `train.checkpoint_every` steps the workers save, inside the stage's
`.partial` output directory, the weights, the optimizer and scheduler states,
every worker's random-number states and the metrics of the steps done so far.
The data position is the step count: the batches of every step come from a
seeded shuffle (`global_batches`), so the same steps follow. A checkpoint is
replaced only by a complete one, and it is removed once the policy is saved. A
checkpoint written for other inputs (another train config, train shard or
starting policy) is ignored, not loaded.

How it is stored follows how the workers hold the model:

- Under FSDP (`train.sharding: fsdp`, more than one worker), nothing is
  gathered to one worker: `checkpoint/` is a torch.distributed.checkpoint
  (DCP) directory in which every worker writes the shards of the weights and
  of the optimizer state it holds (`__<rank>_0.distcp`; rank 0 adds DCP's
  `.metadata`), beside `train_state.pt`, rank 0's small file of the
  fingerprint, scheduler, metrics and random-number states. On resume every
  worker reads only the shards it holds (and the few scalars, such as AdamW's
  step counts, that DCP stores once for all). The workers write into
  `checkpoint.tmp/`; once DCP has written every shard and the `.metadata`,
  rank 0 adds `train_state.pt` and swaps the directory in (`checkpoint/` to
  `checkpoint.old/`, `checkpoint.tmp/` to `checkpoint/`, then removes
  `checkpoint.old/`); a kill between the two renames leaves
  `checkpoint.old/` (or a complete `checkpoint.tmp/`), which resume then reads.
- Otherwise every worker holds the whole model, and rank 0 writes it alone to
  one file, `checkpoint.pt` (its own full state dicts), replaced atomically.

The number of workers and the sharding are not part of the fingerprint, so
either format resumes either way: DCP reshards `checkpoint/` to whatever the
workers hold (another number of shards, or the whole model on unsharded
workers), and a `checkpoint.pt` is read whole by every FSDP worker, which keeps
its own shards (the old way, once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from core.config import TRAIN_FINGERPRINT_EXCLUDED

log = logging.getLogger(__name__)

# rank 0's file beside the DCP shards: fingerprint, scheduler, metrics, random-number states.
TRAIN_STATE = "train_state.pt"


def fingerprint(cfg: dict[str, Any], num_examples: int) -> str:
    """What a checkpoint must have been trained on to be resumed from."""
    shard = Path(cfg["train_shard"])
    identity = {
        "train": fingerprinted(cfg["train"]),
        "seed": cfg["seed"], "policy_in": cfg["policy_in"], "examples": num_examples,
        "train_shard_bytes": shard.stat().st_size,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def fingerprinted(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A train config dict without the knobs that change neither the steps nor their results
    (fingerprint=False), in an objective's section too; a flat dict hashes as it always did."""
    return {key: fingerprinted(value, f"{prefix}{key}.") if isinstance(value, dict) else value
            for key, value in section.items() if f"{prefix}{key}" not in TRAIN_FINGERPRINT_EXCLUDED}


def first_non_finite(named_tensors) -> tuple[str, int] | None:
    """The name of the first tensor holding a NaN or an infinity, and how many it holds; None when all
    are finite. An FSDP (DTensor) tensor is checked in this worker's shard."""
    for name, tensor in named_tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        # One reduction and one read a tensor; the count is taken only for the bad one.
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return name, int((~torch.isfinite(local)).sum())
    return None


def _rng_state(optimizer) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if isinstance(getattr(optimizer, "generator", None), torch.Generator):
        state["optimizer"] = optimizer.generator.get_state()
    return state


class TrainingCheckpoint:
    """`directory` names the sharded checkpoint (`<output_dir>/checkpoint`); the single file is beside
    it, with the suffix `.pt`. `sharded`: the workers hold FSDP shards (see the module docstring)."""

    def __init__(self, directory: Path, fingerprint: str, sharded: bool = False, rank: int = 0, world: int = 1):
        self.directory = directory
        self.path = directory.with_suffix(".pt")
        self.temporary = directory.with_name(directory.name + ".tmp")
        self.previous = directory.with_name(directory.name + ".old")
        self.fingerprint = fingerprint
        self.sharded, self.rank, self.world = sharded, rank, world

    def _distributed(self) -> bool:
        return self.world > 1 and dist.is_initialized()

    def _rng_states(self, optimizer) -> list[dict[str, torch.Tensor]] | None:
        """Every worker's random-number states, on rank 0 (None elsewhere): a collective."""
        mine = _rng_state(optimizer)
        if not self._distributed():
            return [mine]
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, states, dst=0)
        return states

    def save(self, model, optimizer, scheduler, history: list[dict]) -> None:
        """Every worker calls it: the states are collectives (see the module docstring)."""
        if self.sharded:
            self._save_sharded(model, optimizer, scheduler, history)
        else:
            self._save_file(model, optimizer, scheduler, history)
        if self.rank == 0:
            log.info("train checkpoint at step %d: %s", len(history), self.directory if self.sharded else self.path)

    def _train_state(self, scheduler, history: list[dict], rng: list[dict]) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "scheduler": scheduler.state_dict(), "history": history,
                "rng": rng, "world": self.world}

    def _save_file(self, model, optimizer, scheduler, history: list[dict]) -> None:
        model_state, optimizer_state = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rng = self._rng_states(optimizer)
        if self.rank != 0:
            return
        state = {**self._train_state(scheduler, history, rng), "model": model_state, "optimizer": optimizer_state}
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.path)
        for stale in (self.directory, self.previous, self.temporary):  # a sharded run's, now older
            shutil.rmtree(stale, ignore_errors=True)

    def _save_sharded(self, model, optimizer, scheduler, history: list[dict]) -> None:
        import torch.distributed.checkpoint as dcp

        if self.rank == 0:
            shutil.rmtree(self.temporary, ignore_errors=True)  # a save that was cut short
        dist.barrier()
        # Sharded state dicts (DTensors): every worker writes the shards it holds, and no more.
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # Returns on every worker once all shards and rank 0's .metadata are written.
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=self.temporary)
        rng = self._rng_states(optimizer)
        if self.rank == 0:
            state_file = self.temporary / TRAIN_STATE
            torch.save(self._train_state(scheduler, history, rng), state_file.with_suffix(".tmp"))
            os.replace(state_file.with_suffix(".tmp"), state_file)
            shutil.rmtree(self.previous, ignore_errors=True)
            if self.directory.exists():
                os.replace(self.directory, self.previous)
            os.replace(self.temporary, self.directory)
            shutil.rmtree(self.previous, ignore_errors=True)
            self.path.unlink(missing_ok=True)  # an unsharded run's, now older
        dist.barrier()  # a worker leaves the save with the checkpoint complete

    def _found(self) -> Path | None:
        """The complete checkpoint to resume from: the current setting's format first."""
        # train_state.pt is written last: a directory that has it is complete.
        sharded = [d / TRAIN_STATE for d in (self.directory, self.previous, self.temporary)
                   if (d / TRAIN_STATE).is_file()][:1]
        single = [self.path] if self.path.is_file() else []
        found = sharded + single if self.sharded else single + sharded
        return found[0] if found else None

    def restore(self, model, optimizer, scheduler) -> list[dict]:
        """Load the checkpoint into the given objects; the metrics of the steps it covers ([] if none).
        Every worker calls it: loading is a collective."""
        found = self._found()
        if found is None:
            return []
        # The small file only (a sharded checkpoint's train_state.pt), or the whole single file.
        state = torch.load(found, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            print(f"ignoring {found}: it was written for other training inputs", file=sys.stderr, flush=True)
            return []
        if found.name == TRAIN_STATE:
            import torch.distributed.checkpoint as dcp

            # This worker's (sharded) state dicts, filled by DCP from the shard files it needs.
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=found.parent)
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        # Each worker's own states where the worker count is the same; rank 0's otherwise
        # (and in a file written before every worker's were kept).
        rng = state.get("rng") or [{"torch": state["torch_rng"], "optimizer": state.get("optimizer_rng")}]
        mine = rng[self.rank] if len(rng) == self.world else rng[0]
        torch.set_rng_state(mine["torch"])
        if mine.get("optimizer") is not None and isinstance(getattr(optimizer, "generator", None), torch.Generator):
            optimizer.generator.set_state(mine["optimizer"])
        # print, not log: Ray forwards a worker's stderr to the driver, not its INFO records.
        where = found.parent if found.name == TRAIN_STATE else found
        print(f"resuming training after step {len(state['history'])} from {where}", file=sys.stderr, flush=True)
        return list(state["history"])

    def remove(self) -> None:
        """Rank 0's, once the policy is saved."""
        self.path.unlink(missing_ok=True)
        for directory in (self.directory, self.temporary, self.previous):
            shutil.rmtree(directory, ignore_errors=True)
