"""Hosting a secure-aggregation process on a node (in process, SQLite): the config is
validated (400, nothing stored), ``get-protocol`` serves the descriptor, and a worker that
does not run the protocol (syft.js) is rejected with the reason, not left waiting."""

from __future__ import annotations

import json

import pytest

from gridfl import _messages
from tests.builders import host_payload
from tests.harness import Admin, HttpWorker

pytest.importorskip("starlette")

SECAGG = {"threshold": 3, "neighbours": 4, "clipping_range": 0.5, "stage_timeout": 20}
BASE = {"max_workers": 6, "max_diffs": 4}
POPULATION = {"population_size": 1000}


@pytest.fixture
def admin(in_process_node) -> Admin:
    return Admin(in_process_node.url)


@pytest.fixture
def worker(in_process_node):
    w = HttpWorker(in_process_node.url)
    yield w
    w.close()


def _authenticate(worker, name="mnist") -> str:
    st, auth = worker.call(_messages.AUTHENTICATE, {"model_name": name, "model_version": "1.0"})
    assert st == 200, auth
    return auth["worker_id"]


def test_get_protocol_serves_the_descriptor(admin, worker):
    r = admin.host(host_payload(server_config={**BASE, "secure_aggregation": SECAGG}))
    assert r.status_code == 201, r.text
    assert set(r.json()["protocols"]) == {"secure_aggregation"}
    wid = _authenticate(worker)
    req = {"worker_id": wid, "model": "mnist", "protocols": ["secure_aggregation"]}
    st, cyc = worker.call(_messages.CYCLE_REQUEST, req)
    assert st == 200 and cyc["status"] == "accepted", cyc
    r = worker.get(
        "get-protocol",
        worker_id=wid,
        request_key=cyc["request_key"],
        protocol_id=cyc["protocols"]["secure_aggregation"],
    )
    assert r.status_code == 200, r.text
    descriptor = json.loads(r.content)
    assert descriptor == {
        "name": "secure_aggregation",
        "version": 1,
        "threshold": 3,
        "neighbours": 4,
        "clipping_range": 0.5,
        "quantization_bits": 16,
        "field_bits": 64,
        "max_num_samples": 65536,
        "stage_timeout": 20.0,
        "min_survivors": 3,
    }
    assert admin.status()["server_config"]["secure_aggregation"]["threshold"] == 3


def test_a_worker_without_the_protocol_is_rejected_with_the_reason(admin, worker):
    assert admin.host(host_payload(server_config={**BASE, "secure_aggregation": SECAGG})).is_success
    wid = _authenticate(worker)
    st, cyc = worker.call(_messages.CYCLE_REQUEST, {"worker_id": wid, "model": "mnist"})
    assert st == 200, cyc
    assert cyc["status"] == "rejected" and "timeout" not in cyc  # retrying cannot help
    assert "secure_aggregation" in cyc["reason"] and "syft.js" in cyc["reason"]
    assert admin.status()["current"]["accepted"] == 0


def test_plain_processes_accept_workers_with_or_without_protocols(admin, worker):
    assert admin.host(host_payload(server_config=BASE)).is_success
    for extra in ({}, {"protocols": ["secure_aggregation"]}):
        wid = _authenticate(worker)
        st, cyc = worker.call(
            _messages.CYCLE_REQUEST, {"worker_id": wid, "model": "mnist", **extra}
        )
        assert st == 200 and cyc["status"] == "accepted", cyc
        assert cyc["protocols"] == {}


@pytest.mark.parametrize(
    "server_config, match",
    [
        ({"max_diffs": 2, "secure_aggregation": SECAGG}, "needs server_config.max_workers"),
        ({**BASE, "secure_aggregation": {**SECAGG, "threshold": 2}}, "more than half"),
        ({**BASE, "secure_aggregation": {**SECAGG, "threshold": 7}}, "integer in 2..6"),
        ({**BASE, "secure_aggregation": {**SECAGG, "neighbours": 1}}, "neighbours must be"),
        ({**BASE, "secure_aggregation": {**SECAGG, "clipping_range": -1}}, "clipping_range"),
        ({**BASE, "secure_aggregation": {**SECAGG, "field_bits": 65}}, "field_bits"),
        ({**BASE, "secure_aggregation": {**SECAGG, "field_bits": 20}}, "overflows"),
        ({**BASE, "secure_aggregation": {**SECAGG, "stage_timeout": 0}}, "stage_timeout"),
        ({**BASE, "secure_aggregation": {**SECAGG, "min_survivors": 2}}, "min_survivors"),
        ({**BASE, "secure_aggregation": {**SECAGG, "min_survivors": 7}}, "min_survivors"),
        ({**BASE, "secure_aggregation": {**SECAGG, "t": 3}}, "unknown keys"),
        ({**BASE, "secure_aggregation": []}, "must be an object"),
    ],
)
def test_bad_secure_aggregation_configs_are_refused_and_nothing_is_stored(
    admin, server_config, match
):
    r = admin.host(host_payload(server_config=server_config))
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404
    # nothing was stored: the same name hosts cleanly afterwards
    assert admin.host(host_payload(server_config=BASE)).status_code == 201


def test_secure_aggregation_is_refused_with_a_per_diff_rule(admin):
    payload = host_payload(
        server_config={**BASE, "iterative_plan": True, "secure_aggregation": SECAGG},
        avg_plan=True,
    )
    r = admin.host(payload)
    assert r.status_code == 400 and "iterative_plan" in r.json()["error"], r.text


@pytest.mark.parametrize(
    "extra",
    [
        {"strategy": {"name": "fedmedian"}},
        {"mode": "async", "max_workers": None, "cycle_length": None, "max_diffs": None},
        {"compression": {"kind": "int8"}},
        {"differential_privacy": {"noise_multiplier": 1.0, "clip_norm": 1.0, **POPULATION}},
    ],
)
def test_secure_aggregation_is_refused_with_rules_that_need_each_diff(admin, extra):
    r = admin.host(host_payload(server_config={**BASE, **extra, "secure_aggregation": SECAGG}))
    assert r.status_code == 400, r.text
    assert "secure" in r.json()["error"].lower(), r.text  # refused for this reason
    assert admin.http.get("/gridfl/v1/processes/mnist/1.0").status_code == 404


def test_the_protocol_name_is_reserved(admin):
    r = admin.host(host_payload(server_config=BASE, protocols={"secure_aggregation": b"x"}))
    assert r.status_code == 400 and "reserved" in r.json()["error"], r.text
