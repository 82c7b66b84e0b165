"""Peak memory of the demo's node and workers, sampled while it runs."""

from __future__ import annotations

import time

from gridfl._resources import memory_kb

__all__ = ["PeakMemory"]


class PeakMemory:
    """Peaks of the node + workers' summed RSS and summed PSS (over samples), and of each
    process's own RSS and PSS."""

    def __init__(self, node, workers) -> None:
        self.node, self.workers = node, list(workers)
        self.rss_sum = self.pss_sum = 0  # kB
        self.node_kb = [0, 0]
        self.worker_kb = [0, 0]  # the largest worker's
        self._last = -float("inf")

    def sample(self, *, every: float = 0.0) -> None:
        """Read every process's memory, unless the last reading is under ``every``
        seconds old: reading PSS walks each process's page tables (about 40 ms of CPU for
        a 2NN demo's eleven processes, more for the CNN's), too much for every status poll."""
        now = time.monotonic()
        if now - self._last < every:
            return
        self._last = now
        node = memory_kb(self.node.pid)
        workers = [memory_kb(w.pid) for w in self.workers]
        self.rss_sum = max(self.rss_sum, node[0] + sum(w[0] for w in workers))
        self.pss_sum = max(self.pss_sum, node[1] + sum(w[1] for w in workers))
        self.node_kb = [max(a, b) for a, b in zip(self.node_kb, node, strict=True)]
        for w in workers:
            self.worker_kb = [max(a, b) for a, b in zip(self.worker_kb, w, strict=True)]

    @property
    def peak_rss_mb(self) -> float:
        return round(self.rss_sum / 1024, 1)

    @property
    def peak_pss_mb(self) -> float:
        return round(self.pss_sum / 1024, 1)

    def breakdown(self) -> dict[str, float]:
        mb = [round(kb / 1024, 1) for kb in (*self.node_kb, *self.worker_kb)]
        return dict(zip(("node_rss", "node_pss", "worker_rss", "worker_pss"), mb, strict=True))
