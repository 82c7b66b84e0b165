"""A worker's secure-aggregation message on the node (:mod:`gridfl.server.secagg`):
typed and checked (a malformed one, or unsigned keys where workers authenticate, is a 400
naming what is wrong), applied to the round, and answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gridfl import _messages
from gridfl._exceptions import ConflictError, InvalidRequestError, ProtocolError
from gridfl.secagg import NodeSession, SecAggParams, identity
from gridfl.secagg import messages as m
from gridfl.server.auth import decode_token, signs_tokens

#: seconds a worker is told to wait before asking again for a stage that has not opened
RETRY_AFTER = 0.2


def check_identity(keys: m.AdvertiseKeys, auth: dict | None, session: bytes, wid: str) -> None:
    """When the process checks signed auth tokens, a worker's keys must come signed by
    the identity key its credential certifies (docs/secure-aggregation.md, signed keys)."""
    if not signs_tokens(auth):
        return
    assert auth is not None
    if keys.signature is None or keys.credential is None:
        raise InvalidRequestError(
            "this process authenticates workers, so its secure aggregation needs signed "
            "keys: give the worker its identity (signing key and the credential the "
            "authority issued for it) and advertise again"
        )
    claims = decode_token(keys.credential, auth, audience=identity.AUDIENCE)
    if claims is None:
        raise InvalidRequestError(
            f"credential: not issued by this process's authority for audience "
            f"{identity.AUDIENCE!r} (or expired)"
        )
    try:
        identity.check_signature(
            identity.identity_key(claims), session, wid, keys.cipher_key, keys.mask_key,
            keys.signature,
        )
    except ProtocolError as e:
        raise InvalidRequestError(f"secure-aggregation {m.ADVERTISE} message: {e}") from None


def parse_message(req: _messages.SecAggRequest, length: int, params: SecAggParams) -> Any:
    """The stage message, typed; a malformed one is a 400 naming the field."""
    if req.message is None:
        return None
    try:
        if req.stage == m.ADVERTISE:
            return m.AdvertiseKeys.from_json(req.message)
        if req.stage == m.SHARE:
            return m.EncryptedShares.from_json(req.message)
        if req.stage == m.MASKED:
            return m.MaskedInput.from_json(req.message, length, params.field_bits)
        return m.UnmaskShares.from_json(req.message)
    except ProtocolError as e:
        raise InvalidRequestError(f"secure-aggregation {req.stage} message: {e}") from None


def submit_message(node: NodeSession, req: _messages.SecAggRequest, msg: Any) -> None:
    add: dict[str, Callable[[str, Any], None]] = {
        m.ADVERTISE: node.add_keys,
        m.SHARE: node.add_shares,
        m.MASKED: node.add_masked,
        m.UNMASK: node.add_unmask,
    }
    add[req.stage](req.worker_id, msg)


def reply_to(node: NodeSession, req: _messages.SecAggRequest) -> dict[str, Any]:
    """What the worker gets: the node's message for its stage, or "waiting"."""
    order = (*m.STAGES, "done")
    asked, now_at = order.index(req.stage), order.index(node.stage)
    base = {"stage": node.stage}
    if req.message is not None or asked > now_at or req.stage == m.ADVERTISE:
        status = "done" if node.stage == "done" else "waiting"
        return {**base, "status": status, "retry_after": RETRY_AFTER}
    if asked < now_at:
        raise ConflictError(
            f"secure aggregation has moved past stage {req.stage!r} (now {node.stage!r}): "
            "this worker was too late and dropped out of the cycle"
        )
    if req.worker_id not in node.participants(req.stage):
        raise ConflictError(
            f"this worker is not part of stage {req.stage!r}: it dropped out of an earlier one"
        )
    for_worker: dict[str, Callable[[str], Any]] = {
        m.SHARE: node.roster_for,
        m.MASKED: node.shares_for,
        m.UNMASK: node.requests.__getitem__,
    }
    message = for_worker[req.stage](req.worker_id)
    return {**base, "status": "ready", "message": message.to_json()}


__all__ = ["RETRY_AFTER", "check_identity", "parse_message", "reply_to", "submit_message"]
