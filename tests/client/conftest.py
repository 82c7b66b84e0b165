"""Fixtures of the worker SDK tests: a real grid node (uvicorn on loopback, SQLite file),
hosting helpers, and an adapter that runs the same scenario through Syft or AsyncSyft."""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from gridfl import state
from tests._live import LiveNode

from .plans import linear_params, linear_sgd_plan

ADMIN = "client-tests-admin"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class GridNode(LiveNode):
    """A real gridfl node served by uvicorn in a thread on 127.0.0.1, with hosting helpers."""

    def __init__(self, data_dir: Path, **settings):
        pytest.importorskip("starlette")
        import httpx

        from gridfl.server import Settings

        self.db_url = f"sqlite:///{data_dir / 'grid.db'}"
        settings.setdefault("speed_test_bytes", 1 << 20)
        super().__init__(
            Settings(data_dir=data_dir, database_url=self.db_url, admin_token=ADMIN, **settings)
        )
        self.admin = httpx.Client(
            base_url=self.http_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60
        )

    def url(self, transport: str) -> str:
        return self.ws_url if transport == "ws" else self.http_url

    def host(self, name: str | None = None, *, server_config=None, client_config=None,
             params=None, plan: bytes | None = None, plans=None, protocols=None) -> str:
        """Host an FL process (version "1.0"); return its name."""
        name = name or f"m{uuid.uuid4().hex[:10]}"
        sc = {"cycle_length": 60, "num_cycles": 0, "max_diffs": 100}
        sc.update(server_config or {})
        cc = {"name": name, "version": "1.0", "batch_size": 8, "lr": 0.05, "max_updates": 4}
        cc.update(client_config or {})
        payload = {
            "client_config": cc,
            "server_config": sc,
            "model": b64(state.dumps(params if params is not None else linear_params())),
            "plans": plans if plans is not None
            else {"training_plan": b64(plan or linear_sgd_plan())},
            "protocols": {k: b64(v) for k, v in (protocols or {}).items()},
        }
        r = self.admin.post("/gridfl/v1/processes", json=payload)
        assert r.status_code in (200, 201), r.text
        return name

    def status(self, name: str, version: str = "1.0") -> dict:
        r = self.admin.get(f"/gridfl/v1/processes/{name}/{version}")
        assert r.status_code == 200, r.text
        return r.json()

    def checkpoint(self, name: str, ref="latest", version: str = "1.0") -> list[np.ndarray]:
        r = self.admin.get(f"/gridfl/v1/processes/{name}/{version}/checkpoints/{ref}")
        assert r.status_code == 200, r.text
        return state.loads(r.content)

    def corrupt(self, name: str, *, plan: bytes | None = None, model: bytes | None = None):
        """Overwrite a hosted plan's ONNX bytes or the model checkpoint in the node's DB."""
        import sqlalchemy as sa

        from gridfl.server.tables import checkpoints, plans, processes

        eng = sa.create_engine(self.db_url)
        with eng.begin() as conn:
            pid = conn.execute(
                sa.select(processes.c.id).where(processes.c.name == name)
            ).scalar_one()
            if plan is not None:
                conn.execute(plans.update().where(plans.c.process_id == pid).values(onnx=plan))
            if model is not None:
                conn.execute(
                    checkpoints.update().where(checkpoints.c.process_id == pid).values(data=model)
                )
        eng.dispose()

    def stop(self) -> None:
        self.admin.close()
        super().stop()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    node = GridNode(tmp_path_factory.mktemp("grid"))
    yield node
    node.stop()


@pytest.fixture(params=["ws", "http"])
def transport(request) -> str:
    return request.param


# --------------------------------------------------------------------------- sync / async
class SyncApi:
    """Runs scenarios through the blocking :class:`gridfl.Syft`."""

    name = "sync"

    def __init__(self):
        self.clients = []

    def client(self, url, **kw):
        from gridfl.client import Syft

        c = Syft(url, **kw)
        self.clients.append(c)
        return c

    def start(self, job):
        job.start()

    def start_all(self, jobs):
        errors = []

        def run(job):
            try:
                job.start()
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors

    def train(self, job, *args, **kw):
        return job.train(*args, **kw)

    def report(self, job, diff, **kw):
        return job.report(diff, **kw)

    def drop_socket(self, client):
        client._io.run(client._net.ws._conn.close())

    def add_request_hook(self, client, hook):
        async def ahook(request):
            hook(request)

        client._net.http.client.event_hooks["request"].append(ahook)

    def close(self):
        for c in self.clients:
            c.close()


class AsyncApi(SyncApi):
    """Runs the same scenarios through :class:`gridfl.AsyncSyft` on an event loop."""

    name = "async"

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()

    def client(self, url, **kw):
        from gridfl.client import AsyncSyft

        c = AsyncSyft(url, **kw)
        self.clients.append(c)
        return c

    def start(self, job):
        self.loop.run_until_complete(job.start())

    def start_all(self, jobs):
        async def go():
            await asyncio.gather(*(j.start() for j in jobs))

        self.loop.run_until_complete(go())

    def train(self, job, *args, **kw):
        return self.loop.run_until_complete(job.train(*args, **kw))

    def report(self, job, diff, **kw):
        return self.loop.run_until_complete(job.report(diff, **kw))

    def drop_socket(self, client):
        self.loop.run_until_complete(client._net.ws._conn.close())

    def close(self):
        for c in self.clients:
            self.loop.run_until_complete(c.aclose())
        self.loop.close()


@pytest.fixture(params=["sync", "async"])
def api(request):
    a = SyncApi() if request.param == "sync" else AsyncApi()
    yield a
    a.close()
