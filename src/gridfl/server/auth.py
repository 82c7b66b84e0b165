"""Worker authentication (PyGrid's rules, algorithms pinned) and the admin token check."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import jwt

from gridfl import _messages
from gridfl._exceptions import AuthenticationError

log = logging.getLogger("gridfl.server")


def _auth_error(message: str) -> AuthenticationError:
    err = AuthenticationError(message)
    err.http_status = 400  # PyGrid answers verification failures with 400
    return err


def verify_worker_token(
    token: str | None, auth: dict[str, Any] | None, *, endpoint_timeout: float = 10.0
) -> dict[str, Any] | None:
    """Check ``token`` against a process's ``authentication`` config.

    Returns the JWT claims (``{}`` when only a third-party endpoint vouched for an opaque
    token, None when authentication is off). ``secret`` verifies HS256 only, ``pub_key``
    RS256 only: ``alg: none``, other algorithms and HS256 signed with the public key fail.
    Expiry (``exp``), ``nbf`` and ``iat`` are checked when present.
    """
    if not auth:
        return None
    if not token:
        raise _auth_error(_messages.MSG_AUTH_REQUIRED)
    claims: dict[str, Any] | None = None
    if signs_tokens(auth):
        claims = decode_token(token, auth)
        if claims is None:
            raise _auth_error(_messages.MSG_AUTH_INVALID)
    endpoint = auth.get("endpoint")
    if endpoint:
        import httpx

        try:
            r = httpx.post(endpoint, json={"auth_token": token}, timeout=endpoint_timeout)
            ok = r.status_code == 200
        except httpx.HTTPError as e:
            log.warning("auth: third-party endpoint %s failed: %s", endpoint, e)
            ok = False
        if not ok:
            raise _auth_error(_messages.MSG_AUTH_THIRD_PARTY)
    return claims if claims is not None else {}


def signs_tokens(auth: dict[str, Any] | None) -> bool:
    """Whether an ``authentication`` config checks signed tokens (JWTs) itself."""
    return bool(auth and (auth.get("secret") or auth.get("pub_key")))


def decode_token(
    token: str, auth: dict[str, Any], audience: str | None = None
) -> dict[str, Any] | None:
    """The claims of a JWT signed with the config's ``secret`` (HS256) or ``pub_key``
    (RS256), for ``audience`` (None: a token naming an audience is refused); None when
    neither verifies it."""
    for key, alg in ((auth.get("secret"), "HS256"), (auth.get("pub_key"), "RS256")):
        if not key:
            continue
        try:
            return jwt.decode(token, key, algorithms=[alg], audience=audience)
        except jwt.PyJWTError as e:
            log.info("auth: token refused (%s): %s", alg, e)
    return None


def check_admin(header: str | None, admin_token: str | None) -> None:
    """``Authorization: Bearer <admin token>``, compared in constant time."""
    from gridfl._exceptions import PermissionDeniedError

    if not admin_token:
        raise PermissionDeniedError("the admin API is disabled: the node has no admin token")
    if not header or not header.startswith("Bearer "):
        raise AuthenticationError("admin token required: send 'Authorization: Bearer <token>'")
    given = header[len("Bearer ") :].strip().encode()
    if not hmac.compare_digest(given, admin_token.encode()):
        raise AuthenticationError("invalid admin token")
