"""Bad secure-aggregation messages on a node (in process, SQLite): each gets a clear 4xx
and changes nothing, and the cycle then completes with the honest workers. Three workers
are driven by hand, stage by stage, interleaved with the bad messages."""

from __future__ import annotations

import time

import numpy as np
import pytest
import sqlalchemy as sa

from gridfl import _messages, state
from gridfl._exceptions import InvalidRequestError
from gridfl.secagg import SecAggParams
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import encode
from gridfl.server import tables
from tests.builders import b64, diff_of, host_payload
from tests.harness import Admin, HttpWorker
from tests.secagg._drive import Driver, assert_weighted_mean_step

pytest.importorskip("starlette")

SA = _messages.SECURE_AGGREGATION
CONFIG = {
    "max_workers": 3,
    "max_diffs": 3,
    "secure_aggregation": {"threshold": 2, "field_bits": 36, "clipping_range": 0.5},
}


def _rounds(node):
    with node.node.engine.connect() as conn:
        return conn.execute(sa.select(tables.secagg_rounds)).all()


def _totals(node):
    with node.node.engine.connect() as conn:
        return conn.execute(sa.select(tables.secagg_totals)).all()


def _refused(driver, node, status, match, stage, message=None, **override):
    before = [tuple(r) for r in _rounds(node)], [tuple(r) for r in _totals(node)]
    st, reply = driver.send(stage, message, **override)
    assert st == status, reply
    assert match in reply["error"], reply
    after = [tuple(r) for r in _rounds(node)], [tuple(r) for r in _totals(node)]
    assert after == before  # nothing stored


def test_bad_messages_are_refused_and_the_honest_workers_finish(in_process_node):
    node = in_process_node
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(node.url, params) for _ in range(3)]
    a, b, c = workers
    length = sum(int(np.prod(s.shape)) for s in diff_of(0)) + 1

    # the plain report path is closed: a diff is never sent in the clear
    st, reply = a.http.call(
        _messages.REPORT,
        {"worker_id": a.wid, "request_key": a.key, "diff": b64(state.dumps(diff_of(0)))},
    )
    assert st == 400 and "secure aggregation" in reply["error"], reply
    _refused(a, node, 400, "'stage' must be one of", "consistency_check")
    _refused(a, node, 400, "'message' must be an object", m.ADVERTISE, [1, 2])
    _refused(a, node, 400, "cipher_key", m.ADVERTISE, {"cipher_key": "AAAA", "mask_key": "AAAA"})
    _refused(a, node, 401, "Invalid request key", m.ADVERTISE, None, request_key="x" * 64)

    a.ok(m.ADVERTISE, a.session.advertise().to_json())
    other_keys = m.AdvertiseKeys(b"\x09" * 32, b"\x0a" * 32).to_json()
    _refused(a, node, 409, "already sent", m.ADVERTISE, other_keys)
    b.ok(m.ADVERTISE, b.session.advertise().to_json())
    c.ok(m.ADVERTISE, c.session.advertise().to_json())  # the third closes the stage

    rosters = {w: m.Roster.from_json(w.ok(m.SHARE)["message"]) for w in workers}
    shares = {w: w.session.share_keys(rosters[w]) for w in workers}
    _refused(a, node, 400, "exactly the worker's neighbours", m.SHARE, {"shares": {}})
    _refused(a, node, 400, "stage 'share_keys'", m.MASKED, {"vector": b64(bytes(5 * length))})
    for w in workers:
        w.ok(m.SHARE, shares[w].to_json())

    diffs = [diff_of(i) for i in range(3)]
    masked = {}
    for i, w in enumerate(workers):
        forwarded = m.EncryptedShares.from_json(w.ok(m.MASKED)["message"])
        masked[w] = w.session.masked_vector(forwarded, encode(diffs[i], 5 + i, params))
    too_big = masked[a].vector.copy()
    too_big[0] = 1 << 36  # 36 bits travel in 5 bytes, which hold it
    _refused(a, node, 400, "not below 2^36", m.MASKED, m.MaskedInput(too_big, 36).to_json())
    _refused(a, node, 400, f"expected {5 * length} bytes", m.MASKED, {"vector": b64(bytes(8))})
    for w in workers:
        w.ok(m.MASKED, masked[w].to_json())
    _refused(a, node, 400, "late, early or replayed", m.MASKED, masked[a].to_json())

    requests = {w: m.UnmaskRequest.from_json(w.ok(m.UNMASK)["message"]) for w in workers}
    answers = {w: w.session.unmask(requests[w]) for w in workers}
    _refused(
        a,
        node,
        400,
        "exactly the workers asked for",
        m.UNMASK,
        m.UnmaskShares({}, {}).to_json(),
    )
    for w in workers[:2]:
        assert w.ok(m.UNMASK, answers[w].to_json())["status"] == "waiting"
    assert c.ok(m.UNMASK, answers[c].to_json())["status"] == "done"
    _refused(a, node, 409, "closed", m.UNMASK, answers[a].to_json())

    status = admin.status()
    assert status["cycles"][0]["status"] == "completed", status
    # numpy reference: the num_samples-weighted mean of the clipped diffs, within the
    # quantization bound
    original, new = admin.checkpoint(ref=1), admin.checkpoint()
    assert_weighted_mean_step(original, new, diffs, [5, 6, 7], params)


def test_a_secure_aggregation_message_to_a_plain_process_is_refused(in_process_node):
    admin = Admin(in_process_node.url)
    assert admin.host(host_payload(server_config={"max_workers": 3})).status_code == 201
    http = HttpWorker(in_process_node.url)
    st, auth = http.call(_messages.AUTHENTICATE, {"model_name": "mnist"})
    st, cyc = http.call(_messages.CYCLE_REQUEST, {"worker_id": auth["worker_id"], "model": "mnist"})
    body = {"worker_id": auth["worker_id"], "request_key": cyc["request_key"], "stage": m.ADVERTISE}
    st, reply = http.call(SA, body)
    assert st == 400 and "does not run secure aggregation" in reply["error"], reply


def test_too_few_survivors_expire_the_cycle_and_reveal_nothing(in_process_node):
    """min_survivors 3 of 3: one worker goes silent after advertising, the share stage
    times out with two, and the cycle expires: no checkpoint, the workers told why."""
    admin = Admin(in_process_node.url)
    config = {**CONFIG, "secure_aggregation": {"threshold": 2, "min_survivors": 3}}
    config["secure_aggregation"]["stage_timeout"] = 0.5
    assert admin.host(host_payload(server_config=config)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(in_process_node.url, params) for _ in range(3)]
    for w in workers:
        w.ok(m.ADVERTISE, w.session.advertise().to_json())
    for w in workers[:2]:
        roster = m.Roster.from_json(w.ok(m.SHARE)["message"])
        w.ok(m.SHARE, w.session.share_keys(roster).to_json())
    time.sleep(0.6)  # the share stage's timeout passes
    reply = workers[0].ok(m.MASKED)
    assert reply["status"] == "aborted" and "it needs 3" in reply["reason"], reply
    status = admin.status()
    assert [(c["sequence"], c["status"]) for c in status["cycles"]] == [
        (1, "expired"),
        (2, "open"),
    ], status
    assert [c["number"] for c in status["checkpoints"]] == [1]
    # the keys and shares are gone; what is left is why
    [row] = _rounds(in_process_node)
    assert row.stage == "aborted" and set(row.state) == {"reason", "session"}
    assert not _totals(in_process_node)
    st, reply = workers[1].send(m.MASKED)
    assert st == 200 and reply["status"] == "aborted" and "it needs 3" in reply["reason"]


def test_a_batch_of_messages_refuses_only_its_bad_one(in_process_node):
    """Messages that arrive together are taken in one transaction: a bad one gets its own
    error, stores nothing, and the others are taken; the cycle then completes with the
    weighted mean of the clipped diffs (numpy)."""
    node = in_process_node
    admin = Admin(node.url)
    assert admin.host(host_payload(server_config=CONFIG)).status_code == 201
    params = SecAggParams(**admin.status()["server_config"]["secure_aggregation"])
    workers = [Driver(node.url, params) for _ in range(3)]
    diffs = [diff_of(i) for i in range(3)]
    for w in workers:
        w.ok(m.ADVERTISE, w.session.advertise().to_json())
    shares = [
        w.session.share_keys(m.Roster.from_json(w.ok(m.SHARE)["message"])).to_json()
        for w in workers
    ]
    wrong = {"shares": dict(list(shares[1]["shares"].items())[:1])}  # a neighbour left out

    def req(w, message):
        return _messages.SecAggRequest(w.wid, w.key, m.SHARE, message)

    a, b, c = workers
    out = node.node.secure_aggregation_batch([req(a, shares[0]), req(b, wrong), req(c, shares[2])])
    assert out[0]["status"] == out[2]["status"] == "waiting", out
    assert isinstance(out[1], InvalidRequestError) and "neighbours" in str(out[1]), out
    with node.node.engine.connect() as conn:
        sent = conn.execute(
            sa.select(tables.secagg_messages.c.worker_id).where(
                tables.secagg_messages.c.stage == m.SHARE
            )
        ).scalars().all()
    assert sorted(sent) == sorted([a.wid, c.wid])
    b.ok(m.SHARE, shares[1])  # its good message is still welcome

    for i, w in enumerate(workers):
        forwarded = m.EncryptedShares.from_json(w.ok(m.MASKED)["message"])
        vec = encode(diffs[i], 5 + i, params)
        w.ok(m.MASKED, w.session.masked_vector(forwarded, vec).to_json())
    for w in workers:
        request = m.UnmaskRequest.from_json(w.ok(m.UNMASK)["message"])
        w.ok(m.UNMASK, w.session.unmask(request).to_json())
    assert admin.status()["cycles"][0]["status"] == "completed"
    original, new = admin.checkpoint(1), admin.checkpoint(2)
    weights = np.array([5, 6, 7], np.float64)
    for t, cur in enumerate(original):
        stacked = np.stack([np.clip(d[t], -0.5, 0.5) for d in diffs]).astype(np.float64)
        mean = np.tensordot(weights, stacked, axes=1) / weights.sum()
        np.testing.assert_allclose(new[t], cur - mean, rtol=0, atol=1 / params.scale + 1e-6)
