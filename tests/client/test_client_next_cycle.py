"""A started job started again joins the next cycle as the same worker, and with
``wait`` the node answers the moment that cycle opens."""

from __future__ import annotations

import threading
import time

from gridfl.client import JobState, Syft
from tests.builders import linear_data


def test_restart_joins_next_cycle_without_authenticating_again(grid, transport):
    """(The job flow is shared by Syft and AsyncSyft; threads make this one sync.)"""
    name = grid.host(server_config={"max_workers": 2, "max_diffs": 2, "num_cycles": 3})
    client = Syft(grid.url_for(transport))
    first, second = client.new_job(name, "1.0"), client.new_job(name, "1.0")
    first.start()
    second.start()
    assert first.state is JobState.ACCEPTED and second.state is JobState.ACCEPTED
    worker_id = first.worker_id
    x, y = linear_data(n=32)

    def train_and_report(job):
        result = job.train("training_plan", x, y)
        job.report(job.model.create_serialized_diff(result.params))

    train_and_report(first)
    # first asks for cycle 2 while cycle 1 still waits for second's report: held by the node
    done = threading.Event()

    def restart():
        first.start(wait=20)
        done.set()

    t = threading.Thread(target=restart)
    t.start()
    time.sleep(0.5)
    assert not done.is_set(), "the node answered before the next cycle opened"
    reported = time.monotonic()
    train_and_report(second)
    t.join(timeout=15)
    assert done.is_set() and time.monotonic() - reported < 3
    assert first.state is JobState.ACCEPTED
    assert first.worker_id == worker_id  # no new authentication
    assert grid.status(name)["current"]["sequence"] == 2
    statuses = grid.status(name)["cycles"]
    assert statuses[1]["accepted"] == 1
    client.close()
