"""The protocol's message dataclasses (gridfl._messages): each round-trips through its
``to_json`` and its parser, sends the same bytes the hand-built dicts did, and the worker
reads the replies gridfl nodes and PyGrid send (docs/protocol.md) as it did with ``.get``."""

from __future__ import annotations

import json

import pytest

from gridfl import CycleStatusError, GridError, _messages
from gridfl._exceptions import InvalidRequestError
from gridfl.client._replies import unwrap_reply
from gridfl.server.openapi_schemas import message_schema

DIGEST = "ab" * 32

REQUESTS = [
    (_messages.AuthenticateRequest("mnist"), _messages.parse_authenticate),
    (_messages.AuthenticateRequest("mnist", "1.0", "jwt"), _messages.parse_authenticate),
    (_messages.CycleRequest("w", "mnist"), _messages.parse_cycle_request),
    (
        _messages.CycleRequest("w", "mnist", "1.0", ping=3.5, download=80.0, upload=20.0, wait=30),
        _messages.parse_cycle_request,
    ),
    (_messages.ReportRequest("w", "k", b"\x00diff"), _messages.parse_report),
    (
        _messages.ReportRequest("w", "k", b"diff", num_samples=64, metrics={"loss": 0.25}),
        _messages.parse_report,
    ),
]

RESPONSES = [
    (
        _messages.AuthenticateResponse("w", requires_speed_test=True),
        _messages.parse_authenticate_response,
    ),
    (_messages.AuthenticateResponse("w"), _messages.parse_authenticate_response),
    (
        _messages.CycleAccepted(
            "k",
            7,
            model="mnist",
            version="1.0",
            plans={"training_plan": 12},
            protocols={"p": 3},
            client_config={"lr": 0.1},
            plan_digests={"training_plan": DIGEST},
        ),
        _messages.parse_cycle_response,
    ),
    (_messages.CycleAccepted("k", 7, model="mnist", version="1.0"), _messages.parse_cycle_response),
    (
        _messages.CycleRejected(timeout=60, reason="the cycle is full"),
        _messages.parse_cycle_response,
    ),
    (_messages.CycleRejected(timeout=None, reason="finished"), _messages.parse_cycle_response),
    (_messages.ReportResponse(), _messages.parse_report_response),
]


@pytest.mark.parametrize(("message", "parse"), REQUESTS + RESPONSES, ids=repr)
def test_every_message_round_trips_through_json(message, parse):
    sent = json.dumps(message.to_json())  # what goes on the wire
    assert parse(json.loads(sent)) == message


@pytest.mark.parametrize(
    ("id_key", "variant"), [("model_id", None), ("plan_id", "onnx"), ("protocol_id", None)]
)
def test_asset_request_round_trips_as_a_query(id_key, variant):
    request = _messages.AssetRequest("w", "k", 12, variant)
    query = request.to_json(id_key)
    assert _messages.parse_asset_request(query, id_key, variant=variant is not None) == request
    # over HTTP every query value arrives as text
    as_text = {k: str(v) for k, v in query.items()}
    assert _messages.parse_asset_request(as_text, id_key, variant=variant is not None) == request


# What the worker sent before the messages were dataclasses (key order and all): the wire
# must not change.
@pytest.mark.parametrize(
    ("message", "sent"),
    [
        (_messages.AuthenticateRequest("mnist"), '{"model_name": "mnist"}'),
        (
            _messages.AuthenticateRequest("mnist", "1.0", "t"),
            '{"model_name": "mnist", "model_version": "1.0", "auth_token": "t"}',
        ),
        (_messages.CycleRequest("w", "mnist"), '{"worker_id": "w", "model": "mnist"}'),
        (
            _messages.CycleRequest("w", "m", "2", ping=1.5, download=9.0, upload=3.0, wait=5),
            '{"worker_id": "w", "model": "m", "version": "2", "ping": 1.5, "download": 9.0, '
            '"upload": 3.0, "wait": 5}',
        ),
        (
            _messages.ReportRequest("w", "k", b"ab", num_samples=3, metrics={"acc": 1.0}),
            '{"worker_id": "w", "request_key": "k", "diff": "YWI=", "num_samples": 3, '
            '"metrics": {"acc": 1.0}}',
        ),
        (_messages.AssetRequest("w", "k", 7, "onnx"), None),
    ],
    ids=repr,
)
def test_requests_send_the_bytes_they_always_did(message, sent):
    if isinstance(message, _messages.AssetRequest):
        assert list(message.to_json("plan_id")) == [
            "worker_id",
            "request_key",
            "plan_id",
            "receive_operations_as",
        ]
        return
    assert json.dumps(message.to_json()) == sent


def test_report_keeps_raw_diff_bytes_for_a_binary_frame():
    data = _messages.ReportRequest("w", "k", b"\x01\x02").to_json(raw_diff=True)
    assert data == {"worker_id": "w", "request_key": "k", "diff": b"\x01\x02"}
    header, payload = _messages.split_binary_frame(_messages.encode_binary_report(data))
    assert payload == b"\x01\x02" and b"diff" not in header


@pytest.mark.parametrize("worker_id", ["w", "w1", "worker-12345", "x" * 37])
@pytest.mark.parametrize("request_id", [None, 7, "abc"])
def test_a_binary_frame_payload_starts_eight_byte_aligned(worker_id, request_id):
    """Whatever the header holds, the payload starts at a multiple of 8 bytes from the
    frame's start (the header ends in JSON whitespace), and the header still reads."""
    data = {"worker_id": worker_id, "request_key": "k", "diff": b"\x01" * 9, "num_samples": 600}
    frame = _messages.encode_binary_report(data, request_id)
    header, payload = _messages.split_binary_report(frame)
    assert (len(frame) - len(payload)) % 8 == 0 and bytes(payload) == b"\x01" * 9
    parsed = json.loads(header)
    assert parsed["data"] == {"worker_id": worker_id, "request_key": "k", "num_samples": 600}
    assert parsed.get("request_id") == request_id
    assert header.rstrip(b" ") == header.strip()  # only trailing spaces were added


# Replies as a gridfl node sends them (recorded from GridNode) and PyGrid's documented shapes.
GRIDFL_ACCEPTED = {
    "status": "accepted",
    "request_key": "f" * 64,
    "version": "1.0",
    "model": "mnist",
    "plans": {"training_plan": 1},
    "protocols": {},
    "client_config": {"lr": 0.1},
    "model_id": 1,
    "plan_digests": {"training_plan": DIGEST},
}
PYGRID_ACCEPTED = {
    "status": "accepted",
    "request_key": "k",
    "version": "1.0",
    "model": "mnist",
    "plans": {"training_plan": 3},
    "protocols": {"secagg": 1},
    "client_config": {"batch_size": 64, "lr": 0.005},
    "model_id": 1,
}


def test_worker_reads_gridfl_replies():
    auth = {"status": "success", "worker_id": "c0ffee", "requires_speed_test": False}
    assert _messages.parse_authenticate_response(auth) == _messages.AuthenticateResponse("c0ffee")
    accepted = _messages.parse_cycle_response(GRIDFL_ACCEPTED)
    assert isinstance(accepted, _messages.CycleAccepted)
    assert accepted.plan_digests == {"training_plan": DIGEST} and accepted.model_id == 1
    assert accepted.to_json() == GRIDFL_ACCEPTED
    rejected = {"status": "rejected", "reason": "the cycle is full", "timeout": 42}
    assert _messages.parse_cycle_response(rejected) == _messages.CycleRejected(
        42, "the cycle is full"
    )
    done = _messages.parse_cycle_response({"status": "rejected", "reason": "finished"})
    assert done == _messages.CycleRejected(None, "finished")


def test_worker_reads_pygrid_replies():
    # PyGrid's authenticate may carry no status; a worker id may be a number
    assert _messages.parse_authenticate_response({"worker_id": 5}).worker_id == "5"
    accepted = _messages.parse_cycle_response(PYGRID_ACCEPTED)
    assert isinstance(accepted, _messages.CycleAccepted)
    assert accepted.plan_digests is None and accepted.protocols == {"secagg": 1}
    # PyGrid's timeout is str(timedelta), negative after the deadline
    for timeout, seconds in (("7:59:41.123456", 28782), ("-1 day, 23:59:50", 0), (None, None)):
        reply = {"status": "rejected", "timeout": timeout}
        assert _messages.parse_cycle_response(reply) == _messages.CycleRejected(seconds)
    # PyGrid dev wraps replies in the WebSocket envelope, over HTTP too
    wrapped = {"type": _messages.CYCLE_REQUEST, "data": PYGRID_ACCEPTED}
    assert _messages.parse_cycle_response(unwrap_reply(wrapped, call="c")) == accepted
    assert _messages.parse_report_response({}) == _messages.ReportResponse()


def test_worker_tolerates_what_an_accepted_reply_may_leave_out():
    bare = _messages.parse_cycle_response({"status": "accepted", "request_key": "k", "model_id": 2})
    assert bare == _messages.CycleAccepted("k", 2)
    assert (bare.plans, bare.protocols, bare.client_config, bare.version) == ({}, {}, {}, None)
    nulls = {
        "status": "accepted",
        "request_key": "k",
        "model_id": 2,
        "plans": None,
        "protocols": None,
        "client_config": None,
        "plan_digests": "garbled",
    }
    assert _messages.parse_cycle_response(nulls) == bare


@pytest.mark.parametrize(
    ("parse", "reply", "error", "match"),
    [
        (_messages.parse_authenticate_response, {"status": "error"}, GridError, "authentication"),
        (_messages.parse_authenticate_response, {"status": "success"}, GridError, "no 'worker_id'"),
        (_messages.parse_authenticate_response, ["w"], GridError, "expected a JSON object"),
        (_messages.parse_cycle_response, {"status": "maybe"}, CycleStatusError, "'maybe'"),
        (_messages.parse_cycle_response, {}, CycleStatusError, "None"),
        (
            _messages.parse_cycle_response,
            {"status": "accepted", "model_id": 1},
            GridError,
            "no 'request_key'",
        ),
        (
            _messages.parse_cycle_response,
            {"status": "accepted", "request_key": "k"},
            GridError,
            "no 'model_id'",
        ),
        (
            _messages.parse_cycle_response,
            {**PYGRID_ACCEPTED, "plans": [1]},
            GridError,
            "plans/protocols",
        ),
        (
            _messages.parse_cycle_response,
            {**PYGRID_ACCEPTED, "client_config": "x"},
            GridError,
            "client_config",
        ),
        (_messages.parse_report_response, {"status": "failed"}, GridError, "report failed"),
    ],
)
def test_worker_refuses_replies_it_cannot_use(parse, reply, error, match):
    with pytest.raises(error, match=match):
        parse(reply)


def test_node_replies_match_their_generated_schemas():
    for message, _ in RESPONSES:
        schema = message_schema(type(message))
        sent = message.to_json()
        assert set(schema["required"]) <= set(sent), message
        assert set(sent) <= set(schema["properties"]), message


def test_a_masked_input_as_a_binary_frame_round_trips():
    """The packed vector follows the header; the node puts it back as message.vector."""
    from gridfl._messages import (
        SECURE_AGGREGATION,
        binary_report_data,
        encode_binary_report,
        split_binary_report,
    )

    data = {"worker_id": "w", "request_key": "k", "stage": "masked_input",
            "message": {"vector": b"\x01\x02\x03"}}
    head, payload = split_binary_report(encode_binary_report(data, "r", SECURE_AGGREGATION))
    header = json.loads(head)
    assert header == {"type": SECURE_AGGREGATION, "request_id": "r",
                      "data": {**data, "message": {}}}
    assert data["message"]["vector"] == b"\x01\x02\x03"  # the caller's data is untouched
    back = binary_report_data(SECURE_AGGREGATION, header["data"], payload)
    assert bytes(back["message"]["vector"]) == b"\x01\x02\x03"
    assert header["data"]["message"] == {}


@pytest.mark.parametrize(("data", "error"), [
    ({"message": {"vector": "AAAA"}}, "the header must not carry 'vector'"),
    ({"message": None}, "must carry 'message' as an object"),
    ({}, "must carry 'message' as an object"),
])
def test_a_bad_binary_masked_input_header_is_refused(data, error):
    from gridfl._messages import SECURE_AGGREGATION, binary_report_data

    with pytest.raises(InvalidRequestError, match=error):
        binary_report_data(SECURE_AGGREGATION, data, b"xyz")
