"""A stage message sent with ``wait_for_next`` (a live node, uvicorn on loopback, SQLite):
the reply to an advertisement or a share message waits for the next stage and brings the
node's message for it, so a worker needs no request to ask for it; a masked input's reply
comes at once, and the cycle completes with the weighted mean (numpy reference)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gridfl.secagg import SecAggParams
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import encode
from gridfl.server.secagg import HOLD_WAITING
from tests.builders import diff_of, host_payload
from tests.harness import Admin
from tests.secagg._drive import Driver, assert_weighted_mean_step

pytest.importorskip("starlette")

CONFIG = {
    "max_workers": 3,
    "max_diffs": 3,
    "cycle_length": 120,
    "secure_aggregation": {"threshold": 2, "clipping_range": 0.5, "stage_timeout": 60},
}


def _all(workers, send):
    """Every worker's ``send`` at once (each reply may wait for the others' messages)."""
    with ThreadPoolExecutor(len(workers)) as ex:
        return list(ex.map(send, workers))


def _came_with(reply: dict, stage: str) -> dict:
    assert reply["status"] == "waiting", reply
    ahead = reply["next"]
    assert ahead["stage"] == stage and ahead["status"] == "ready", ahead
    assert ahead["session"] == reply["session"]
    return ahead["message"]


def test_advertise_and_share_replies_bring_the_next_stage(server_factory):
    node = server_factory(None)
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(node.url, params) for _ in range(3)]

    def advertise(w):
        st, reply = w.send(m.ADVERTISE, w.session.advertise().to_json(), wait_for_next=True)
        assert st == 200, reply
        w.session.bind(reply["session"].encode())
        return m.Roster.from_json(_came_with(reply, m.SHARE))

    rosters = dict(zip(workers, _all(workers, advertise), strict=True))
    assert all(len(r.neighbours) >= 2 for r in rosters.values())  # its neighbours

    def share(w):
        st, reply = w.send(m.SHARE, w.session.share_keys(rosters[w]).to_json(),
                           wait_for_next=True)
        assert st == 200, reply
        return m.EncryptedShares.from_json(_came_with(reply, m.MASKED))

    shares = dict(zip(workers, _all(workers, share), strict=True))
    assert all(len(s.shares) == 2 for s in shares.values())  # from both neighbours

    # a masked input is not held: its reply comes at once, with nothing ahead
    diffs = [diff_of(i) for i in range(3)]
    for i, w in enumerate(workers):
        vec = encode(diffs[i], 2 + i, params)
        started = time.monotonic()
        st, reply = w.send(m.MASKED, w.session.masked_vector(shares[w], vec).to_json(),
                           wait_for_next=True)
        assert st == 200 and "next" not in reply, reply
        assert time.monotonic() - started < HOLD_WAITING
    for w in workers:
        w.answer_unmask()

    cycles = admin.status()["cycles"]
    assert [c["status"] for c in cycles].count("completed") == 1, cycles
    original, new = admin.checkpoint(ref=1), admin.checkpoint()
    assert_weighted_mean_step(original, new, diffs, [2, 3, 4], params)


def test_without_wait_for_next_a_reply_comes_at_once(server_factory):
    node = server_factory(None)
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    w = Driver(node.url, params)
    started = time.monotonic()
    reply = w.ok(m.ADVERTISE, w.session.advertise().to_json())
    assert reply["status"] == "waiting" and "next" not in reply
    assert time.monotonic() - started < HOLD_WAITING  # the stage waits for two more


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_wait_for_next_must_be_a_boolean(server_factory, value):
    node = server_factory(None)
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    w = Driver(node.url, params)
    st, reply = w.send(m.ADVERTISE, w.session.advertise().to_json(), wait_for_next=value)
    assert st == 400 and "'wait_for_next' must be true or false" in reply["error"], reply
