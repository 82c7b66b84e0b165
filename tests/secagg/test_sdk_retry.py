"""The worker SDK's stage messages survive a lost reply: they are sent as retryable
calls, and a repeat that the node refuses as "already sent" counts as delivered (the
node keeps one message per worker and stage). The flow is driven with a scripted node."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gridfl import AggregationAbortedError, ConflictError
from gridfl.client._flow import Call, drive_sync
from gridfl.client._secagg import secure_report_flow
from gridfl.secagg import NAME, SecAggParams
from gridfl.secagg import messages as m


def _job():
    p = SecAggParams.from_config({"threshold": 2}, max_workers=3)
    return SimpleNamespace(
        protocols={NAME: p.descriptor_bytes()},
        worker_id="w1",
        request_key="k",
        model_name="mnist",
        _client=SimpleNamespace(),
    )


@pytest.mark.parametrize("first_landed", [True, False])
def test_a_stage_message_whose_reply_was_lost_is_delivered_once(first_landed):
    calls: list[Call] = []

    def node(op):
        calls.append(op)
        if op.data["stage"] == m.ADVERTISE:
            if first_landed:  # what the node says to the transport's retry
                raise ConflictError("worker already sent its 'advertise_keys' message")
            return {"status": "waiting", "stage": m.ADVERTISE, "session": "s", "retry_after": 0}
        return {"status": "aborted", "stage": "aborted", "reason": "test over", "session": "s"}

    flow = secure_report_flow(_job(), [np.zeros(3, np.float32)], 1)
    with pytest.raises(AggregationAbortedError, match="test over"):
        drive_sync(flow, node)
    stages = [c.data["stage"] for c in calls]
    assert stages == [m.ADVERTISE, m.SHARE]  # moved on after one advertisement
    assert all(c.idempotent for c in calls)  # the transport may retry each


def test_another_conflict_is_not_taken_for_delivery():
    def node(op):
        raise ConflictError("secure aggregation has moved past stage 'advertise_keys'")

    flow = secure_report_flow(_job(), [np.zeros(3, np.float32)], 1)
    with pytest.raises(ConflictError, match="moved past"):
        drive_sync(flow, node)
