"""A bug in an endpoint is answered 500 as JSON, with CORS headers, and logged once."""

from __future__ import annotations

import logging

import httpx
import pytest

pytest.importorskip("starlette")

from starlette.routing import Route

from gridfl.server import create_app
from tests.harness import make_settings


async def _boom(request):
    raise RuntimeError("a bug")


@pytest.mark.anyio
async def test_a_bug_is_a_json_500_with_cors_logged_once(tmp_path, caplog, anyio_backend):
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'g.db'}", tmp_path))
    app.router.routes.append(Route("/boom", _boom))
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.DEBUG):
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            r = await client.get("/boom", headers={"Origin": "https://worker.example"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error (RuntimeError)"}
    assert r.headers["access-control-allow-origin"] == "*"
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(logged) == 1, [rec.getMessage() for rec in logged]
    assert logged[0].exc_info is not None and "a bug" in str(logged[0].exc_info[1])


@pytest.fixture
def anyio_backend():
    return "asyncio"
