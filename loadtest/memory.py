"""Peak resident memory of a server's model-holding processes over one run, sampled in a background thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil

SAMPLE_INTERVAL_S = 0.5


class PeakRss:
    def __init__(self, processes: Callable[[], list[psutil.Process]]):
        self._processes = processes
        self._peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for process in self._processes():
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            self._peaks[process.pid] = max(rss, self._peaks.get(process.pid, 0))

    def as_dict(self) -> dict:
        """Peak RSS in MiB per process and summed (None when no process was watched)."""
        if not self._peaks:
            return {"peak_rss_mib": None}
        per_process = {str(pid): round(rss / 2**20, 1) for pid, rss in self._peaks.items()}
        return {"peak_rss_mib": round(sum(self._peaks.values()) / 2**20, 1), "per_process_mib": per_process}
