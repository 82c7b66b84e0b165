"""The web dashboard at ``/dashboard``: its static page (shipped in the package's
``static/`` directory, uPlot vendored with its licence) and its JSON API under
``/dashboard/api/``, reached with a session cookie instead of the admin token.

Sign-in posts the admin token once (in the body, never a URL); the node answers with a
session cookie (HttpOnly, SameSite=Strict, expiring after :data:`SESSION_SECONDS`). The
cookie is signed with a key derived from the admin token, so every server process on the
same token accepts it and changing the token ends every session. Sign-out clears the
cookie and revokes it in this server process. State-changing requests must also carry an
``Origin`` header naming this node (a second guard beside SameSite).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

import gridfl
from gridfl import _messages, state
from gridfl._exceptions import AuthenticationError, InvalidRequestError, PermissionDeniedError
from gridfl.server import admin
from gridfl.server.bodies import read_body
from gridfl.server.config import MAX_INT
from gridfl.server.routes import (
    _checkpoint_ref,
    _int_param,
    _pv,
    _wait_param,
    bytes_response,
    held_status_request,
)

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "gridfl_session"
#: how long a session lasts (seconds); sign in again after
SESSION_SECONDS = 8 * 3600
#: config keys whose values the dashboard never shows
_SECRET_WORDS = ("secret", "password", "token", "private", "credential", "api_key")
_PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


# --- sessions -------------------------------------------------------------------------------
def _key(admin_token: str) -> bytes:
    return hashlib.sha256(b"gridfl dashboard session\x00" + admin_token.encode()).digest()


def new_session(admin_token: str, now: float | None = None) -> tuple[str, int]:
    """A signed session value and its expiry (unix seconds).

    >>> value, expires = new_session("t", now=0)
    >>> expires, check_session(value, "t", now=1) == expires, check_session(value, "u", now=1)
    (28800, True, None)
    """
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    body = f"{expires}.{secrets.token_urlsafe(18)}"
    mac = hmac.new(_key(admin_token), body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}", expires


def check_session(value: str | None, admin_token: str | None, now: float | None = None):
    """The session's expiry if ``value`` is a valid unexpired session, else None."""
    if not value or not admin_token or value.count(".") != 2:
        return None
    expires, nonce, mac = value.split(".")
    want = hmac.new(_key(admin_token), f"{expires}.{nonce}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode(), want.encode()) or not expires.isascii() \
            or not expires.isdigit():
        return None
    return int(expires) if int(expires) > (time.time() if now is None else now) else None


def _revoked(request: Request) -> dict[str, int]:
    app_state = request.app.state
    if not hasattr(app_state, "dashboard_revoked"):
        app_state.dashboard_revoked = {}
    return app_state.dashboard_revoked


def _session(request: Request) -> int:
    token = request.app.state.settings.admin_token
    value = request.cookies.get(COOKIE)
    expires = check_session(value, token)
    if expires is None or value in _revoked(request):
        raise AuthenticationError("sign in to the dashboard first (POST /dashboard/api/session)")
    return expires


def _same_origin(request: Request) -> None:
    """State-changing requests must come from a page of this node."""
    origin = request.headers.get("origin")
    if not origin or urlsplit(origin).netloc != request.headers.get("host"):
        raise PermissionDeniedError(
            "the dashboard accepts changes only from its own page (Origin must be this node)"
        )


def _signed_in(fn, *, changes: bool = False):
    async def endpoint(request: Request) -> Response:
        if changes:
            _same_origin(request)
        _session(request)
        return await fn(request)

    return endpoint


def _cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE, value, max_age=max_age, path="/dashboard", httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )


async def sign_in(request: Request) -> Response:
    _same_origin(request)
    token = request.app.state.settings.admin_token
    if not token:
        raise PermissionDeniedError("the dashboard is disabled: the node has no admin token")
    body = _messages.parse_json(await read_body(request, 16384))
    given = _messages.parse_dashboard_sign_in(body).token
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise AuthenticationError("wrong admin token")
    value, expires = new_session(token)
    response = JSONResponse({"signed_in": True, "expires_at": expires})
    _cookie(response, request, value, SESSION_SECONDS)
    return response


async def sign_out(request: Request) -> Response:
    _same_origin(request)
    value = request.cookies.get(COOKIE)
    expires = check_session(value, request.app.state.settings.admin_token)
    revoked = _revoked(request)
    if value and expires is not None:
        now = time.time()
        for old in [v for v, e in revoked.items() if e < now]:
            del revoked[old]
        revoked[value] = expires
    response = JSONResponse({"signed_in": False})
    _cookie(response, request, "", 0)
    return response


async def session_info(request: Request) -> Response:
    return JSONResponse({"signed_in": True, "expires_at": _session(request)})


# --- pages' data ----------------------------------------------------------------------------
def mask_secrets(value: Any) -> Any:
    """A copy of a config with the values of secret-looking keys replaced by ``***``.

    >>> mask_secrets({"authentication": {"secret": "s", "endpoint": "e"}, "lr": 0.1})
    {'authentication': {'secret': '***', 'endpoint': 'e'}, 'lr': 0.1}
    """
    if isinstance(value, dict):
        return {
            k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v else mask_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


async def processes(request: Request) -> Response:
    """Every process with its list figures; ``wait`` holds the answer until a cycle opens
    or closes anywhere on the node after the reply that said ``generation`` ``after``
    (one request per change, not a polling loop)."""
    wait = _wait_param(request)
    signal = request.app.state.cycle_signal
    seen = signal.generation
    if "after" in request.query_params:
        seen = _int_param(request, "after", 0, 0, MAX_INT)
    if wait > 0:
        await signal.wait_after(seen, wait)
    generation = signal.generation  # before the read: a change during it is not missed
    engine = request.app.state.node.engine
    listed = await anyio.to_thread.run_sync(admin.overview, engine)
    return JSONResponse({"processes": listed, "generation": generation})


async def process(request: Request) -> Response:
    """The process's status, as the admin API's (held the same way with ``wait`` and
    ``after``), its configs masked, plus the workers seen unless ``workers=0`` (a live
    page asks for them now and then, not with every cycle: they are most of a reply)."""
    name, version, last = await held_status_request(request)
    with_workers = _int_param(request, "workers", 1, 0, 1) == 1
    node = request.app.state.node

    def read() -> dict[str, Any]:
        status = node.status(name, version, last=last)
        status["server_config"] = mask_secrets(status["server_config"])
        status["client_config"] = mask_secrets(status["client_config"])
        if with_workers:
            status["workers"] = admin.workers_seen(node.engine, name, version)
        return status

    return JSONResponse(await anyio.to_thread.run_sync(read))


def to_npz(data: bytes) -> bytes:
    """State bytes as an ``.npz`` archive: ``param_0``, ``param_1``, ... in State order.

    >>> arrays = np.load(io.BytesIO(to_npz(state.dumps([np.ones(2, np.float32)]))))
    >>> arrays["param_0"].tolist()
    [1.0, 1.0]
    """
    buf = io.BytesIO()
    arrays: dict[str, Any] = {f"param_{i}": a for i, a in enumerate(state.loads(data))}
    np.savez(buf, **arrays)
    return buf.getvalue()


async def checkpoint(request: Request) -> Response:
    """A checkpoint as a download: State bytes, or ``.npz`` with ``format=npz``."""
    name, version = _pv(request)
    ref = _checkpoint_ref(request.path_params["ref"])
    fmt = request.query_params.get("format", "state")
    if fmt not in ("state", "npz"):
        raise InvalidRequestError(f"format must be 'state' or 'npz', got {fmt!r:.40}")
    node = request.app.state.node
    data = await anyio.to_thread.run_sync(node.checkpoint, name, version, ref)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}-{version}-{ref}")
    if fmt == "npz":
        data = await anyio.to_thread.run_sync(to_npz, data)
    response = bytes_response(data)
    ext = "npz" if fmt == "npz" else "state"
    response.headers["content-disposition"] = f'attachment; filename="{stem}.{ext}"'
    return response


async def stop(request: Request) -> Response:
    name, version = _pv(request)
    return JSONResponse(await anyio.to_thread.run_sync(request.app.state.node.stop, name, version))


async def delete(request: Request) -> Response:
    name, version = _pv(request)
    node = request.app.state.node
    return JSONResponse(await anyio.to_thread.run_sync(node.delete, name, version))


def memory() -> dict[str, float | None]:
    """This server process's resident memory and its peak, in MiB (Linux: /proc)."""
    out: dict[str, float | None] = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(rest.split()[0]) / 1024
    except OSError:  # not Linux: the peak only
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = peak / (1 << 20 if sys.platform == "darwin" else 1024)
    return out


async def node_info(request: Request) -> Response:
    engine = request.app.state.node.engine
    return JSONResponse(
        {
            "version": gridfl.__version__,
            "python": sys.version.split()[0],
            "pid": os.getpid(),
            "database": await anyio.to_thread.run_sync(admin.database_info, engine),
            "memory": memory(),
        }
    )


async def page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers=_PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    """The dashboard's page, static files and API."""
    api = "/dashboard/api"
    pv = f"{api}/processes/{{name}}/{{version}}"
    return [
        Route("/dashboard", lambda r: RedirectResponse("/dashboard/", 308), methods=["GET"]),
        Route("/dashboard/", page, methods=["GET"]),
        Mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static"),
        Route(f"{api}/session", sign_in, methods=["POST"]),
        Route(f"{api}/session", sign_out, methods=["DELETE"]),
        Route(f"{api}/session", _signed_in(session_info), methods=["GET"]),
        Route(f"{api}/node", _signed_in(node_info), methods=["GET"]),
        Route(f"{api}/processes", _signed_in(processes), methods=["GET"]),
        Route(pv, _signed_in(process), methods=["GET"]),
        Route(pv, _signed_in(delete, changes=True), methods=["DELETE"]),
        Route(f"{pv}/stop", _signed_in(stop, changes=True), methods=["POST"]),
        Route(f"{pv}/checkpoints/{{ref}}", _signed_in(checkpoint), methods=["GET"]),
    ]
