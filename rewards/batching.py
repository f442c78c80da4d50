"""Forward passes of a reward model in length-sorted batches that halve on out-of-memory.

Shared by the rewards that run a model over many rows (hf_classifier's chats, pairrm's pairs):
the batch size a reward was built with shrinks when a batch does not fit, and stays shrunk.
"""

from __future__ import annotations

import logging
from typing import Any

from core.errors import PipelineError
from core.models import resolve_model

log = logging.getLogger("pipeline")


def locate(model: str, device: str | None) -> tuple[str, Any]:
    """The reward model's checkpoint directory (`reward.model`) and the torch device it runs on."""
    import torch

    try:
        path = resolve_model(model)
    except PipelineError as exc:
        raise PipelineError(f"config key 'reward.model': {exc}") from None
    return path, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    # Some backends (and older torch) raise a plain RuntimeError with this text.
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc)


class HalvingBatches:
    """For a reward with `batch_size`, `device`, `path` and `forward(batch) -> list[float]`.

    `UNIT` names a row in messages ("sequence", "pair"); `TOO_BIG` says what to lower when a
    single row does not fit."""

    UNIT = "sequence"
    TOO_BIG = "lower reward.max_length"
    batch_size: int
    device: Any
    path: Any

    def forward(self, batch: list[list[int]]) -> list[float]:
        raise NotImplementedError

    def in_batches(self, rows: list[list[int]], order: list[int]) -> list[float]:
        """`forward` of every row, in `order`'s batches; one value per row, in the rows' order.

        Longest first is the order to give: the batch most likely to run out of memory comes
        first, and a halved batch size then holds for the rest."""
        values = [0.0] * len(rows)
        start = 0
        while start < len(order):
            chunk = order[start:start + self.batch_size]
            out = self._forward_or_none([rows[i] for i in chunk])
            if out is None:
                self._halve_batch(len(rows[chunk[0]]))
                continue
            for i, value in zip(chunk, out, strict=True):
                values[i] = value
            self.batch_done(len(chunk))
            start += len(chunk)
        return values

    def batch_done(self, rows: int) -> None:
        """Called after each batch that ran (a reward that counts its work overrides it)."""

    def _forward_or_none(self, batch: list[list[int]]) -> list[float] | None:
        """`forward`, or None when the batch ran out of memory."""
        try:
            return self.forward(batch)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(exc):
                raise
            if self.batch_size == 1:
                raise PipelineError(f"reward model {self.path} ran out of memory on a single {self.UNIT} of "
                                    f"{len(batch[0])} tokens; {self.TOO_BIG}") from exc
            return None  # outside this block the exception's frames, and their tensors, are freed

    def _halve_batch(self, longest: int) -> None:
        import torch

        self.batch_size = max(1, self.batch_size // 2)
        if getattr(self.device, "type", None) == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory on %ss of up to %d tokens; batch size now %d", self.UNIT, longest,
                    self.batch_size)
