"""A GridNode's real replies, read back by the worker's parsers (gridfl._messages): the messages
the worker builds are what the node parses, and what the node sends is what the worker reads.
"""

from __future__ import annotations

import json

import pytest

from gridfl import _messages, state
from gridfl.server import GridNode
from tests.builders import diff_of, host_payload
from tests.harness import make_settings


@pytest.fixture
def node(sqlite_url, tmp_path):
    n = GridNode(make_settings(sqlite_url, tmp_path))
    n.host(host_payload(server_config={"max_diffs": 1, "num_cycles": 2}))
    yield n
    n.close()


def _over_the_wire(value):
    """``value`` as the other side sees it: encoded to JSON text and decoded again."""
    return json.loads(json.dumps(value))


def test_one_cycle_in_typed_messages(node):
    auth_request = _over_the_wire(_messages.AuthenticateRequest("mnist", "1.0").to_json())
    auth_reply = node.authenticate(_messages.parse_authenticate(auth_request))
    identity = _messages.parse_authenticate_response(_over_the_wire(auth_reply))
    assert identity.to_json() == auth_reply

    cycle_request = _over_the_wire(_messages.CycleRequest(identity.worker_id, "mnist").to_json())
    reply = node.cycle_request(_messages.parse_cycle_request(cycle_request))
    accepted = _messages.parse_cycle_response(_over_the_wire(reply))
    assert isinstance(accepted, _messages.CycleAccepted)
    assert accepted.to_json() == reply  # nothing the node sent is lost
    assert accepted.model == "mnist" and accepted.version == "1.0"
    assert set(accepted.plans) == set(accepted.plan_digests or {}) == {"training_plan"}

    query = _messages.AssetRequest(identity.worker_id, accepted.request_key, accepted.model_id)
    model = node.get_model(_messages.parse_asset_request(query.to_json("model_id"), "model_id"))
    assert len(state.loads(model)) == len(diff_of(0))

    again = node.cycle_request(_messages.parse_cycle_request(cycle_request))
    rejected = _messages.parse_cycle_response(_over_the_wire(again))
    assert isinstance(rejected, _messages.CycleRejected) and rejected.timeout is not None
    assert rejected.to_json() == again

    report = _messages.ReportRequest(
        identity.worker_id, accepted.request_key, state.dumps(diff_of(0)), num_samples=8
    )
    report_reply = node.report(_messages.parse_report(_over_the_wire(report.to_json())))
    assert (
        _messages.parse_report_response(_over_the_wire(report_reply)) == _messages.ReportResponse()
    )
