"""The blocking and the asyncio worker SDK behind one interface, so that every client
scenario runs through both :class:`gridfl.Syft` and :class:`gridfl.AsyncSyft`."""

from __future__ import annotations

import asyncio
import threading


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
            except Exception as e:  # noqa: BLE001  # pragma: no cover - reported below
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
