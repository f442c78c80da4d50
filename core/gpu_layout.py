"""Where every process of a round runs on a GPU cluster, decided once before any stage starts.

Ray gives a fractional GPU request to the GPU that fits it most tightly (best fit): two
requests for half a GPU land on the same GPU, not on two. So shares are chosen such that
the processes that must not meet cannot fit on one GPU together:

- Engines not kept (`generate.keep_engines` off, the GPU default): each stage has the GPUs
  to itself, because a stage's actors are gone before the next stage starts. An engine asks
  for `generate.tensor_parallel_size` whole GPUs, a train worker and the reference scorer for
  one whole GPU each, a reward actor for `reward.num_gpus_per_actor` (auto: one).
- Engines kept on GPUs: an engine lives on through reference and train, asleep. Every GPU of
  the cluster holds one engine (so `generate.num_actors` must be the cluster's GPU count),
  which asks for `KEPT_ENGINE_SHARE` of its GPU, more than half: two engines never fit on one
  GPU. The other processes ask for at most what an engine leaves; every GPU has an engine,
  so each of them can only go beside one, and two train workers never fit on one GPU.

A process Ray gives no GPU must use none: `hide_unassigned_gpus` empties its
CUDA_VISIBLE_DEVICES, because Ray leaves that variable unset (every GPU visible) for an
actor or task that asked for no GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.errors import PipelineError

# A kept engine's share of its GPU in Ray's accounting: more than half, so that no two engines
# share a GPU, and what is left (REST_BESIDE_ENGINE) fits exactly one train worker.
KEPT_ENGINE_SHARE = 0.51
REST_BESIDE_ENGINE = round(1 - KEPT_ENGINE_SHARE, 2)


@dataclass(frozen=True)
class GpuLayout:
    """GPUs each kind of process asks Ray for (0: it runs on CPU and sees no GPU)."""

    cluster_gpus: int
    kept_engines: bool
    engine: float
    train_worker: float
    reference: float
    reward_actor: float

    def describe(self) -> list[str]:
        """One line per kind of process, for `round --dry-run` and the pipeline log."""
        if not self.cluster_gpus:
            return ["no GPUs in the cluster: every stage runs on CPUs"]
        beside = " beside a kept engine" if self.kept_engines else ""
        share = lambda gpus: "no GPU (CPU)" if gpus == 0 else f"{gpus:g} GPU"  # noqa: E731
        return [
            f"vLLM engine: {share(self.engine)} each" + (", one engine on every GPU, kept across stages"
                                                           if self.kept_engines else ""),
            f"train worker: {share(self.train_worker)} each{beside if self.train_worker else ''}",
            f"reference scorer: {share(self.reference)}{beside if self.reference else ''}",
            f"reward actor: {share(self.reward_actor)} each{beside if self.reward_actor else ''}",
        ]


def plan_gpu_layout(config, cluster_gpus: float, keep_engines: bool) -> GpuLayout:
    """The layout of `config` on a cluster with `cluster_gpus` GPUs; a layout that cannot be
    met is refused with one line naming the key to change."""
    gpus = int(cluster_gpus)
    reward = config.reward.num_gpus_per_actor
    if not gpus:
        return GpuLayout(0, False, 0.0, 0.0, 0.0, 0.0 if reward == "auto" else reward)
    if not keep_engines:
        return GpuLayout(gpus, False, float(config.generate.tensor_parallel_size), 1.0, 1.0,
                         1.0 if reward == "auto" else reward)
    gen = config.generate
    if gen.tensor_parallel_size > 1:
        raise PipelineError("generate.keep_engines=on on GPUs needs generate.tensor_parallel_size 1 (a kept engine "
                            "holds one GPU); set generate.keep_engines=off")
    if gen.num_actors != gpus:
        raise PipelineError(f"generate.keep_engines=on on GPUs puts one kept engine on every GPU, so that nothing "
                            f"else can pack two processes onto one: generate.num_actors is {gen.num_actors} but the "
                            f"cluster has {gpus} GPUs; set it to {gpus}, or set generate.keep_engines=off")
    if reward != "auto" and reward > REST_BESIDE_ENGINE:
        raise PipelineError(f"reward.num_gpus_per_actor is {reward:g}, but kept engines (generate.keep_engines) hold "
                            f"{KEPT_ENGINE_SHARE} of every GPU: at most {REST_BESIDE_ENGINE}, or auto, or set "
                            "generate.keep_engines=off")
    return GpuLayout(gpus, True, KEPT_ENGINE_SHARE, REST_BESIDE_ENGINE, REST_BESIDE_ENGINE,
                     REST_BESIDE_ENGINE if reward == "auto" else reward)


def hide_unassigned_gpus() -> list[str]:
    """In a Ray worker, leave visible only the GPUs Ray assigned to it; the ids it may use.

    Call before torch touches CUDA: CUDA reads CUDA_VISIBLE_DEVICES once, when it starts.
    Outside a Ray worker nothing changes.
    """
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return ids


def where_this_runs() -> str:
    """`node <ip>, GPU <ids>` or `node <ip>, CPU`: for the stage logs and `inspect`."""
    import ray

    node = ray.util.get_node_ip_address() if ray.is_initialized() else "local"
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return f"node {node}, GPU {','.join(str(i) for i in ids)}" if ids else f"node {node}, CPU"


def cluster_gpu_count() -> int:
    """GPUs of the Ray cluster this driver is connected to; 0 when it is connected to none (a stage
    run on its own, whose work is all in-process)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def layout_of(plan) -> GpuLayout:
    """A round plan's layout: the one the driver decided at the round's start, else decided now
    (a stage run on its own, as the tests do)."""
    if getattr(plan, "gpus", None) is not None:
        return plan.gpus
    keep = plan.engines.keep if getattr(plan, "engines", None) is not None else False
    return plan_gpu_layout(plan.config, cluster_gpu_count(), keep)
