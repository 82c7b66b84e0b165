"""The demo's worker loop against a live node: a round whose cycle closes before the
report (a late device) is skipped, and the worker goes on to the next cycle."""

from __future__ import annotations

import logging
import time

import numpy as np


class LateOnce:
    """Compute slots whose first holder finishes after the cycle's deadline."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        if self.entered == 1:
            time.sleep(self.delay)
        return self

    def __exit__(self, *exc):
        return None


def test_late_report_skips_the_round_and_the_worker_goes_on(grid, caplog):
    from gridfl.demo import worker as demo_worker

    name = grid.host(server_config={"cycle_length": 2, "num_cycles": 1, "max_diffs": 1,
                                    "max_workers": 1})
    rng = np.random.default_rng(0)
    clients = [(rng.random((16, 3), dtype=np.float32), rng.random((16, 1), dtype=np.float32))]
    slots = LateOnce(delay=3)
    reported = demo_worker.run(grid.ws_url, name, "1.0", clients, seed=0, wait=5, slots=slots)
    assert reported == 1 and slots.entered == 2
    # training went on after the late round: that round is still told as a failure
    assert "cycle failed: cycle 1 is closed (expired)" in caplog.text
    cycles = sorted(grid.status(name)["cycles"], key=lambda c: c["sequence"])
    # the late round's cycle expired without its report; on a slow machine a later cycle
    # may expire too before the worker is back; the last one took its report
    assert [c["status"] for c in cycles[:-1]] == ["expired"] * (len(cycles) - 1)
    assert sum(c["reported"] for c in cycles[:-1]) == 0
    assert cycles[-1]["status"] == "completed" and cycles[-1]["reported"] == 1


class StopsTheProcess:
    """Compute slots whose first holder sees the process stopped while it trains, as
    the demo stops it once the target accuracy is reached."""

    def __init__(self, grid, name: str) -> None:
        self.grid, self.name = grid, name
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        assert self.grid.host_client.stop(self.name, "1.0")["status"] == "success"
        return self

    def __exit__(self, *exc):
        return None


def test_a_stopped_process_ends_the_worker_quietly(grid, caplog):
    """The report in flight when the process stops is refused ("cycle N is closed
    (stopped)"); that is the normal end of training, so the worker logs no failure."""
    from gridfl.demo import worker as demo_worker

    name = grid.host(server_config={"cycle_length": 60, "num_cycles": 5, "max_diffs": 1,
                                    "max_workers": 1})
    rng = np.random.default_rng(0)
    clients = [(rng.random((16, 3), dtype=np.float32), rng.random((16, 1), dtype=np.float32))]
    slots = StopsTheProcess(grid, name)
    with caplog.at_level(logging.INFO):
        reported = demo_worker.run(grid.ws_url, name, "1.0", clients, seed=0, wait=5,
                                   slots=slots)
    assert reported == 0 and slots.entered == 1
    assert [c["status"] for c in grid.status(name)["cycles"]] == ["stopped"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "cycle failed" not in caplog.text
