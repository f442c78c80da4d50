"""Each stage of a round with the function that runs it, `run_stage(plan, out_dir) -> stats`.

What each stage writes and reads is declared on the ground floor (core/layout.py, STAGE_REGISTRY),
where the layout, resume and `inspect` read it; which code runs it is declared here, by import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.layout import STAGES
from stages import evaluate, generate, rerank
from stages.reference import stage as reference
from stages.train import stage as train

STAGE_RUNNERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {
    "generate": generate.run_stage,
    "rerank": rerank.run_stage,
    "reference": reference.run_stage,
    "train": train.run_stage,
    "evaluate": evaluate.run_stage,
}
if tuple(STAGE_RUNNERS) != STAGES:
    raise ImportError(f"stages/registry.py runs {tuple(STAGE_RUNNERS)} but core/layout.py declares {STAGES}")
