"""The worker's run of secure aggregation inside ``job.report`` (pure flow, no I/O).

When the accepted cycle's process carries the ``secure_aggregation`` protocol, the report
is not sent: the diff goes through the four stages of :mod:`gridfl.secagg` instead,
quantized, weighted by ``num_samples`` and masked, so that the node learns only the sum.
User code is the same as without it; metrics are not sent (they would travel in the clear).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator
from typing import Any

import numpy as np

from gridfl import _messages
from gridfl._exceptions import AggregationAbortedError, ConflictError, GridError
from gridfl.secagg import NAME, SecAggParams, WorkerSession
from gridfl.secagg import messages as m
from gridfl.secagg.quantize import check_finite

logger = logging.getLogger("gridfl.client")

#: longest pause between two polls, whatever the node says
MAX_RETRY_AFTER = 5.0


def secure_report_flow(
    job: Any, diff: list[np.ndarray], num_samples: int | None
) -> Generator[Any, Any, dict[str, Any]]:
    """Run the four stages for ``job``'s accepted cycle; returns the node's last reply."""
    from gridfl.client._flow import Call, Sleep

    check_finite(diff)  # before any stage: a worker that cannot mask does not take part
    params = SecAggParams.from_descriptor(job.protocols[NAME])
    me, key = str(job.worker_id), str(job.request_key)
    client = job._client
    worker = WorkerSession(
        params,
        me,
        identity=getattr(client, "secagg_identity", None),
        verifier=getattr(client, "secagg_verifier", None),
    )

    def stage(name: str, message: dict | None = None) -> Generator[Any, Any, dict[str, Any]]:
        # the node holds the reply to a small message until the next stage opens and
        # brings that stage's message with it: a request less per stage
        body = _messages.SecAggRequest(me, key, name, message, message is not None).to_json()
        while True:
            try:
                # retried on network failures and 503s (a burst of masked inputs can fill
                # the node's body budget): the node keeps one message per stage, so a
                # repeat changes nothing
                reply = yield Call(_messages.SECURE_AGGREGATION, body, idempotent=True)
            except ConflictError as e:
                if message is None or "already sent" not in str(e):
                    raise
                # the first attempt landed and its reply was lost: the node has it
                reply = {"status": "waiting", "session": worker.session.decode()}
            if isinstance(reply, dict) and reply.get("status") == "aborted":
                raise AggregationAbortedError(str(reply.get("reason")))
            if not isinstance(reply, dict) or not isinstance(reply.get("session"), str):
                raise GridError(f"secure-aggregation: malformed reply from the node: {reply!r}")
            worker.bind(reply["session"].encode())
            if message is not None or reply.get("status") != "waiting":
                return reply
            pause = reply.get("retry_after")
            if (
                not isinstance(pause, (int, float))
                or isinstance(pause, bool)
                or not math.isfinite(pause)
            ):
                pause = 1.0
            yield Sleep(min(max(float(pause), 0.0), MAX_RETRY_AFTER))

    def came_with(reply: dict[str, Any], name: str) -> dict[str, Any] | None:
        """The node's reply for stage ``name`` that came with the previous message's
        reply (it held that reply until the stage opened), or None: then ask for it."""
        ahead = reply.get("next")
        if not isinstance(ahead, dict) or ahead.get("stage") != name:
            return None
        if ahead.get("session") != reply.get("session"):
            raise GridError(f"secure-aggregation: malformed reply from the node: {reply!r}")
        return ahead

    def node_message(reply: dict[str, Any]) -> Any:
        if reply.get("status") != "ready" or not isinstance(reply.get("message"), dict):
            raise GridError(f"secure-aggregation: expected the node's message, got {reply!r}")
        return reply["message"]

    if worker.identity is not None:
        yield from stage(m.ADVERTISE)  # learn the session first: the signature names it
    sent = yield from stage(m.ADVERTISE, worker.advertise().to_json())
    ready = came_with(sent, m.SHARE) or (yield from stage(m.SHARE))
    roster = m.Roster.from_json(node_message(ready))
    sent = yield from stage(m.SHARE, worker.share_keys(roster).to_json())
    ready = came_with(sent, m.MASKED) or (yield from stage(m.MASKED))
    shares = m.EncryptedShares.from_json(node_message(ready))
    # its packed bytes: base64 in JSON, or raw after a binary frame's header on a socket
    masked = worker.masked_input(shares, diff, num_samples)
    yield from stage(m.MASKED, {"vector": masked.packed()})
    request = m.UnmaskRequest.from_json(node_message((yield from stage(m.UNMASK))))
    reply = yield from stage(m.UNMASK, worker.unmask(request).to_json())
    logger.info("%s: secure aggregation done", job.model_name)
    return reply
