"""The machine's memory in use while a stage runs, sampled in the driver."""

from __future__ import annotations

import threading


class MemoryMonitor:
    """Peak memory in use on this machine while a stage runs (Ray workers included)."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._psutil = psutil
        self._interval = interval
        self._stop = threading.Event()
        self.peak_bytes = 0

    def __enter__(self) -> "MemoryMonitor":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, self._psutil.virtual_memory().used)
            if self._stop.wait(self._interval):
                return

    @property
    def peak_gib(self) -> float:
        return round(self.peak_bytes / 2**30, 2)
