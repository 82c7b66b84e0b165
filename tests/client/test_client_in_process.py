"""Syft and AsyncSyft against a grid node in the same process: the real server app
(``create_app``, its lifespan run here) reached through ``httpx.ASGITransport``, with no
socket connected by anyone."""

from __future__ import annotations

import asyncio
import base64
import socket

import httpx
import numpy as np
import pytest

from gridfl import ConfigError, state
from gridfl.client import AsyncSyft, Syft
from tests.builders import linear_params, linear_sgd_plan

pytest.importorskip("starlette")

ADMIN = "in-process-admin"
URL = "http://localhost"  # only names the node: the transport never connects anywhere
NAME, VERSION = "in-process", "1.0"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


HOSTED = {
    "client_config": {
        "name": NAME,
        "version": VERSION,
        "batch_size": 8,
        "lr": 0.05,
        "max_updates": 4,
    },
    # one report completes a cycle, so one worker cycle moves the process on
    "server_config": {"cycle_length": 60, "num_cycles": 2, "max_diffs": 1},
    "model": _b64(state.dumps(linear_params())),
    "plans": {"training_plan": _b64(linear_sgd_plan())},
    "protocols": {},
}


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to connect a socket fails the test: the cycle must stay in-process."""

    def refuse(sock, address):
        raise AssertionError(f"a socket was connected to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def app(tmp_path):
    from gridfl.server import Settings, create_app

    return create_app(Settings(data_dir=tmp_path, admin_token=ADMIN))


def _examples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((16, 3), dtype=np.float32), rng.random((16, 1), dtype=np.float32)


async def _admin(app, method: str, path: str, **kw) -> httpx.Response:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app),
        base_url=URL,
        headers={"Authorization": f"Bearer {ADMIN}"},
    ) as admin:
        response = await admin.request(method, path, **kw)
    assert response.is_success, response.text
    return response


def _assert_one_cycle_completed(status: dict) -> None:
    cycles = sorted(status["cycles"], key=lambda c: c["sequence"])
    assert cycles[0]["status"] == "completed" and cycles[0]["reported"] == 1
    assert cycles[0]["result_checkpoint"]


def test_sync_worker_cycle_through_asgi_transport(app, no_connections):
    """Syft sends its requests from its own I/O thread; the lifespan runs on a portal's."""
    from anyio.from_thread import start_blocking_portal

    x, y = _examples()
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
    ):
        portal.call(lambda: _admin(app, "POST", "/gridfl/v1/processes", json=HOSTED))
        outcome = {}
        with Syft(URL, transport=httpx.ASGITransport(app)) as client:
            job = client.new_job(NAME, VERSION)

            @job.on("accepted")
            def on_accepted(model, client_config):
                result = job.train("training_plan", x, y)
                outcome["reply"] = job.report(
                    model.create_serialized_diff(result.params),
                    num_samples=result.num_samples,
                )

            job.start()
        assert outcome["reply"].get("status", "success") == "success"
        status = portal.call(lambda: _admin(app, "GET", f"/gridfl/v1/processes/{NAME}/{VERSION}"))
    _assert_one_cycle_completed(status.json())


def test_async_worker_cycle_through_asgi_transport(app, no_connections):
    """AsyncSyft on the loop that runs the app's lifespan: one loop for all of it."""
    x, y = _examples()

    async def main() -> dict:
        async with app.router.lifespan_context(app):
            await _admin(app, "POST", "/gridfl/v1/processes", json=HOSTED)
            async with AsyncSyft(URL, transport=httpx.ASGITransport(app)) as client:
                job = client.new_job(NAME, VERSION)
                outcome = {}

                @job.on("accepted")
                async def on_accepted(model, client_config):
                    result = await job.train("training_plan", x, y)
                    outcome["reply"] = await job.report(
                        model.create_serialized_diff(result.params),
                        num_samples=result.num_samples,
                    )

                @job.on("rejected")
                def on_rejected(timeout):
                    outcome["timeout"] = timeout

                await job.start()
                assert outcome["reply"].get("status", "success") == "success"
                # the next cycle is open: the same worker is accepted into it too
                outcome.clear()
                await job.start()
                assert "reply" in outcome
            status = await _admin(app, "GET", f"/gridfl/v1/processes/{NAME}/{VERSION}")
            return status.json()

    status = asyncio.run(main())
    _assert_one_cycle_completed(status)
    assert [c["status"] for c in status["cycles"]] == ["completed", "completed"]


@pytest.mark.parametrize("client_class", [Syft, AsyncSyft])
def test_websocket_url_with_a_transport_is_refused(app, client_class):
    with pytest.raises(ConfigError, match="use the node's http:// or https:// URL"):
        client_class("ws://localhost", transport=httpx.ASGITransport(app))


@pytest.mark.parametrize("client_class", [Syft, AsyncSyft])
def test_a_blocking_transport_is_refused(client_class):
    blocking = httpx.HTTPTransport()
    try:
        with pytest.raises(ConfigError, match=r"httpx\.AsyncBaseTransport"):
            client_class(URL, transport=blocking)
    finally:
        blocking.close()
