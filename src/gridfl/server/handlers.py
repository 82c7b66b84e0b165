"""The worker handlers, written once and called by both transports (HTTP routes and the
WebSocket): the three worker messages, the downloads, and the cycle request that waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio

from gridfl import _messages
from gridfl._exceptions import GridError
from gridfl.secagg import messages as m
from gridfl.server.held import CycleSignal
from gridfl.server.secagg import HOLD_WAITING
from gridfl.server.service import GridNode

HANDLERS: dict[str, Callable[[GridNode, Any], dict[str, Any]]] = {
    _messages.AUTHENTICATE: lambda node, data: node.authenticate(
        _messages.parse_authenticate(data)
    ),
    _messages.CYCLE_REQUEST: lambda node, data: node.cycle_request(
        _messages.parse_cycle_request(data)
    ),
    _messages.REPORT: lambda node, data: node.report(_messages.parse_report(data)),
    _messages.EVALUATION_REPORT: lambda node, data: node.evaluation_report(
        _messages.parse_evaluation_report(data)
    ),
    _messages.SECURE_AGGREGATION: lambda node, data: node.secure_aggregation(
        _messages.parse_secagg(data)
    ),
}


#: the downloads, written once for both transports: (GridNode method, id parameter, whether
#: ``receive_operations_as`` picks a variant); HTTP ``GET /<type>?...``, and on a socket
#: that negotiated the gridfl.binary.2 subprotocol a request frame ``{"type", "data"}``
ASSETS: dict[str, tuple[str, str, bool]] = {
    _messages.GET_MODEL: ("get_model", "model_id", False),
    _messages.GET_PLAN: ("get_plan", "plan_id", True),
    _messages.GET_PROTOCOL: ("get_protocol", "protocol_id", False),
}


async def fetch_asset(app, kind: str, query: Any) -> bytes:
    """Validate a download request (query parameters or a WS frame's ``data``) and read the
    bytes off the event loop."""
    method, id_key, variant = ASSETS[kind]
    req = _messages.parse_asset_request(query, id_key, variant=variant)
    return await anyio.to_thread.run_sync(getattr(app.state.node, method), req)


def error_extra(kind: str | None) -> dict[str, Any]:
    # PyGrid answers a failed cycle-request with a rejection that carries the error
    return {"status": "rejected"} if kind == _messages.CYCLE_REQUEST else {}


async def dispatch(app, kind: str, data: Any) -> dict[str, Any]:
    """Run one worker handler off the event loop; a cycle request with ``wait`` is held
    while it would be rejected with a timeout, until a cycle opens or ``wait`` runs out."""
    node: GridNode = app.state.node
    if kind == _messages.SECURE_AGGREGATION:
        return await _secure_aggregation(app, _messages.parse_secagg(data))
    if kind != _messages.CYCLE_REQUEST:
        return await anyio.to_thread.run_sync(HANDLERS[kind], node, data)
    req = _messages.parse_cycle_request(data)
    signal: CycleSignal = app.state.cycle_signal
    # The signal fires when a cycle opens or closes in this process, and when another
    # server process on the same database opens one (PostgreSQL: cycle_listener, at once;
    # otherwise cycle_watcher, within long_poll_recheck seconds): waiters do not poll
    # the database themselves.
    # Once held, the request is asked again together with the others it waited with.
    deadline = time.monotonic() + req.wait
    held = False
    while True:
        generation = signal.generation
        if held:
            reply = await app.state.held_admissions.admit(req)
        else:
            reply = await anyio.to_thread.run_sync(node.cycle_request, req)
        remaining = deadline - time.monotonic()
        if reply.get("status") != "rejected" or reply.get("timeout") is None or remaining <= 0:
            return reply
        held = True
        await signal.wait_after(generation, remaining)
        if signal.closed:  # shutting down: the rejection stands, the worker asks again later
            return reply


#: the stage whose opening the reply to a stage's message waits for, so that it brings
#: what the node has for the worker there (``next``) and saves it a request. Only for
#: small messages: a held masked input would keep its body (5-8 bytes per parameter).
_AHEAD = {m.ADVERTISE: m.SHARE, m.SHARE: m.MASKED}


async def _secure_aggregation(app, req: _messages.SecAggRequest) -> dict[str, Any]:
    """A secure-aggregation request. Messages go to the node in batches (one write
    transaction for the ones that arrived together). Asked to (``wait_for_next``), the
    reply to an advertisement or a share message then waits, as a poll, for the next
    stage, and carries the node's message for it as ``next`` when it opened in time."""
    if req.message is None:
        return await _held_poll(app, req)
    reply = await app.state.secagg_batches.submit(req)
    ahead = _AHEAD.get(req.stage)
    if not req.wait_for_next or ahead is None or reply.get("status") != "waiting":
        return reply
    try:
        after = await _held_poll(app, _messages.SecAggRequest(req.worker_id, req.request_key,
                                                              ahead))
    except GridError:  # the worker asks for that stage itself and learns why
        return reply
    return {**reply, "next": after} if after.get("status") == "ready" else reply


async def _held_poll(app, req: _messages.SecAggRequest) -> dict[str, Any]:
    """A request for a stage that has not opened is held until a stage closes here (the
    node's cycle signal; PostgreSQL: also in another server process) or ``HOLD_WAITING``
    seconds pass, so that n waiting workers do not poll the node every ``retry_after``
    seconds and each learns of the new stage at once. Asked in batches with the others
    the same signal woke. Held to the end, "waiting" says to ask again at once."""
    signal: CycleSignal = app.state.cycle_signal
    deadline = time.monotonic() + HOLD_WAITING
    while True:
        generation = signal.generation
        reply = await app.state.secagg_batches.submit(req)
        remaining = deadline - time.monotonic()
        if reply.get("status") != "waiting" or signal.closed:
            return reply
        if remaining <= 0:
            return {**reply, "retry_after": 0.0}
        await signal.wait_after(generation, remaining)
