"""The syft.js integration cases (pygrid-protocol.md §7.4), driven through the SDK against a
real grid node on loopback, over WebSocket and HTTP, with the sync and the async API."""

from __future__ import annotations

import asyncio

import jwt
import numpy as np
import pytest

from gridfl import (
    AuthenticationError,
    GridError,
    ModelLoadFailedError,
    NotFoundError,
    PlanLoadFailedError,
    _messages,
)
from gridfl.client import JobState
from gridfl.model import SyftModel
from gridfl.plan import Plan
from tests.builders import linear_data, linear_params

SECRET = "a-test-secret-that-is-32-bytes-long!"


def recorder(job):
    """Register handlers that record every event of ``job``."""
    events = []
    job.on("accepted", lambda model, cfg: events.append(("accepted", model, cfg)))
    job.on("rejected", lambda timeout: events.append(("rejected", timeout)))
    job.on("error", lambda exc: events.append(("error", exc)))
    return events


def only(events, kind):
    assert [e[0] for e in events] == [kind], events
    return events[0]


class TestAuth:
    def test_per_job_auth(self, grid, transport, api):
        """Each job authenticates with its own token: a bad second token fails that job only."""
        name = grid.host(server_config={"authentication": {"secret": SECRET}})
        client = api.client(grid.url_for(transport))
        token = jwt.encode({}, SECRET, algorithm="HS256")
        forged = jwt.encode({}, SECRET[::-1], algorithm="HS256")
        good = client.new_job(name, "1.0", auth_token=token)
        bad = client.new_job(name, "1.0", auth_token=forged)
        ev_good, ev_bad = recorder(good), recorder(bad)
        api.start(good)
        api.start(bad)
        only(ev_good, "accepted")
        _, exc = only(ev_bad, "error")
        assert isinstance(exc, AuthenticationError)
        assert "The 'auth_token' you sent is invalid." in str(exc)

    def test_bad_token_error_text(self, grid, transport, api):
        name = grid.host(server_config={"authentication": {"secret": SECRET}})
        client = api.client(grid.url_for(transport), auth_token="not-a-jwt")
        job = client.new_job(name, "1.0")
        with pytest.raises(AuthenticationError, match=r"The 'auth_token' you sent is invalid\."):
            api.start(job)  # no error handler: start() raises
        assert job.state is JobState.FAILED

    def test_missing_token(self, grid, transport, api):
        name = grid.host(server_config={"authentication": {"secret": SECRET}})
        job = api.client(grid.url_for(transport)).new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, AuthenticationError) and "auth_token" in str(exc)


class TestCycle:
    def test_accepted_without_auth(self, grid, transport, api):
        """Acceptance: request key, worker id, a SyftModel equal to the hosted one, config."""
        params = [np.full((3, 1), 0.25, np.float32), np.array([0.5], np.float32)]
        name = grid.host(params=params, client_config={"extra": "x"})
        job = api.client(grid.url_for(transport)).new_job(name)  # no version: latest
        events = recorder(job)
        api.start(job)
        _, model, cfg = only(events, "accepted")
        assert isinstance(model, SyftModel) and model is job.model
        for a, b in zip(model.params, params, strict=True):
            np.testing.assert_array_equal(a, b)
        assert cfg == {"name": name, "version": "1.0", "batch_size": 8, "lr": 0.05,
                       "max_updates": 4, "extra": "x"}
        assert len(job.request_key) >= 32 and job.worker_id
        assert isinstance(job.plans["training_plan"], Plan)
        assert job.state is JobState.ACCEPTED

    def test_rejected_with_timeout(self, grid, transport, api):
        """A full cycle rejects with an integer timeout (seconds to the cycle's deadline)."""
        name = grid.host(server_config={"max_workers": 1, "cycle_length": 100})
        client = api.client(grid.url_for(transport))
        first, second = client.new_job(name, "1.0"), client.new_job(name, "1.0")
        ev1, ev2 = recorder(first), recorder(second)
        api.start(first)
        api.start(second)
        only(ev1, "accepted")
        _, timeout = only(ev2, "rejected")
        assert isinstance(timeout, int) and 90 <= timeout <= 100
        assert second.state is JobState.REJECTED and second.timeout == timeout

    def test_rejected_without_timeout_when_done(self, grid, transport, api):
        name = grid.host(server_config={"num_cycles": 1, "max_diffs": 1})
        client = api.client(grid.url_for(transport))
        job = client.new_job(name, "1.0")
        api.start(job)
        api.report(job, job.model.create_serialized_diff(job.model.params))
        late = client.new_job(name, "1.0")
        events = recorder(late)
        api.start(late)
        assert only(events, "rejected") == ("rejected", None)

    def test_full_flow_with_diff_report(self, grid, transport, api):
        """Train the downloaded plan, report the diff: the node's next checkpoint is
        params - diff, and it recorded the sample count."""
        name = grid.host(server_config={"max_diffs": 1, "num_cycles": 2})
        client = api.client(grid.url_for(transport))
        job = client.new_job(name, "1.0")
        api.start(job)
        x, y = linear_data(n=64)
        losses = []
        result = api.train(job, "training_plan", x, y,
                           events={"batch_end": lambda e, b, loss, m: losses.append(loss)})
        assert result.steps == 4 and len(losses) == 4

        def mse(params):
            return float(np.mean((x @ params[0] + params[1] - y) ** 2))

        assert mse(result.params) < mse(job.model.params)
        diff = job.model.create_serialized_diff(result.params)
        reply = api.report(job, diff, num_samples=result.num_samples,
                           metrics={"loss": result.loss})
        assert reply["status"] == "success" and job.state is JobState.REPORTED
        # over ws the gridfl node selected gridfl.binary.2: the diff went as raw bytes in
        # a binary frame (the node's checkpoint below shows it arrived intact)
        ws = client._net.ws
        assert (ws is not None and ws._conn.subprotocol == _messages.BINARY_SUBPROTOCOL) == (
            transport == "ws")
        new = grid.checkpoint(name)
        for a, b in zip(new, result.params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        status = grid.status(name)
        assert [c["number"] for c in status["checkpoints"]] == [1, 2]
        first = status["cycles"][0]
        assert first["reported"] == 1 and first["num_samples"] == result.num_samples == 32
        assert first["metrics"]["loss"] == pytest.approx(result.loss)

    def test_report_inside_accepted_handler(self, grid, transport, api):
        """The seed's usage: train and report from the accepted handler."""
        name = grid.host(server_config={"max_diffs": 1, "num_cycles": 2})
        job = api.client(grid.url_for(transport)).new_job(name, "1.0")
        x, y = linear_data(n=64)
        if api.name == "sync":
            @job.on("accepted")
            def on_accepted(model, cfg):
                result = job.train("training_plan", x, y)
                job.report(model.create_serialized_diff(result.params))
        else:
            @job.on("accepted")
            async def on_accepted(model, cfg):
                result = await job.train("training_plan", x, y)
                await job.report(model.create_serialized_diff(result.params))
        api.start(job)
        assert job.state is JobState.REPORTED
        assert not np.array_equal(grid.checkpoint(name)[0], linear_params()[0])

    def test_several_jobs_at_once_on_one_client(self, grid, transport, api):
        """Concurrent jobs of one client share its one WebSocket; each gets its own cycle."""
        names = [grid.host(), grid.host()]
        client = api.client(grid.url_for(transport))
        jobs = [client.new_job(n, "1.0") for n in names for _ in range(2)]
        events = [recorder(j) for j in jobs]
        api.start_all(jobs)
        for ev in events:
            only(ev, "accepted")
        assert len({j.worker_id for j in jobs}) == 4
        assert len({j.request_key for j in jobs}) == 4
        if transport == "ws":
            assert client._net.ws.connects == 1

    def test_speed_test_when_required(self, grid, transport, api):
        name = grid.host(server_config={"minimum_download_speed": 0,
                                        "minimum_upload_speed": 0})
        job = api.client(grid.url_for(transport)).new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        only(events, "accepted")
        assert set(job.speed) == {"ping", "download", "upload"}
        assert job.speed["download"] > 0 and job.speed["upload"] > 0 and job.speed["ping"] >= 0

    def test_reconnects_after_socket_drop(self, grid, api):
        name = grid.host()
        client = api.client(grid.url_for("ws"))
        first = client.new_job(name, "1.0")
        api.start(first)
        api.drop_socket(client)
        second = client.new_job(name, "1.0")
        events = recorder(second)
        api.start(second)
        only(events, "accepted")
        assert client._net.ws.connects == 2


class TestFailures:
    def test_missing_fl_model(self, grid, transport, api):
        job = api.client(grid.url_for(transport)).new_job("no-such-model", "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, GridError) and "no-such-model" in str(exc)

    def _tamper(self, api, client, key):
        """Ask for id 999999 in the downloads, whichever transport carries them (HTTP GET,
        or a WebSocket request frame with gridfl.binary.2): the node answers the error."""
        from gridfl.client._flow import Fetch

        perform = client._net.perform

        async def tampered(op):
            if isinstance(op, Fetch) and key in op.params:
                op = Fetch(op.path, {**op.params, key: "999999"})
            return await perform(op)

        client._net.perform = tampered

    def test_missing_model(self, grid, transport, api):
        """get-model answers 'Model ID not found!': error event, 'Failed to load Model'."""
        name = grid.host()
        client = api.client(grid.url_for(transport))
        self._tamper(api, client, "model_id")
        job = client.new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, ModelLoadFailedError)
        assert str(exc) == "Failed to load Model: Model ID not found!"
        assert isinstance(exc.__cause__, NotFoundError)

    def test_missing_plan(self, grid, transport, api):
        name = grid.host()
        client = api.client(grid.url_for(transport))
        self._tamper(api, client, "plan_id")
        job = client.new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, PlanLoadFailedError)
        assert str(exc) == "Failed to load 'training_plan' Plan: Plan ID not found!"

    def test_invalid_model(self, grid, transport, api):
        name = grid.host()
        grid.corrupt(name, model=b"\x0a\x03abc-not-a-state")
        job = api.client(grid.url_for(transport)).new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, ModelLoadFailedError)
        assert str(exc).startswith("Failed to load Model: ")
        assert exc.__cause__ is not None

    def test_invalid_plan(self, grid, transport, api):
        name = grid.host()
        grid.corrupt(name, plan=b"definitely not onnx")
        job = api.client(grid.url_for(transport)).new_job(name, "1.0")
        events = recorder(job)
        api.start(job)
        _, exc = only(events, "error")
        assert isinstance(exc, PlanLoadFailedError)
        assert str(exc).startswith("Failed to load 'training_plan' Plan: ")


def test_sync_api_inside_running_event_loop(grid, transport):
    """Syft's blocking calls work where an event loop already runs (Jupyter)."""
    from gridfl.client import Syft

    name = grid.host(server_config={"max_diffs": 1, "num_cycles": 2})

    async def notebook_cell():
        with Syft(grid.url_for(transport)) as client:
            job = client.new_job(name, "1.0")
            job.start()
            result = job.train("training_plan", *linear_data(n=32))
            job.report(job.model.create_serialized_diff(result.params))
            return job.state

    assert asyncio.run(notebook_cell()) is JobState.REPORTED


def test_protocols_downloaded(grid, transport):
    from gridfl.client import Syft

    name = grid.host(protocols={"secure_agg": b"\x01\x02protocol"})
    with Syft(grid.url_for(transport)) as client:
        job = client.new_job(name, "1.0")
        job.start()
        assert job.protocols == {"secure_agg": b"\x01\x02protocol"}


class TestDownloadsOverTheSocket:
    """Over ``ws://`` the gridfl node selects gridfl.binary.2: the model, plans and
    protocols come over the open socket, and the worker makes no HTTP request at all
    (counted at the client's HTTP transport, httpx's request hook)."""

    @staticmethod
    def _http_requests(api, client) -> list[str]:
        seen: list[str] = []
        api.add_request_hook(client, lambda request: seen.append(
            f"{request.method} {request.url.path}"))
        return seen

    def test_full_cycle_makes_no_http_request(self, grid, transport, api):
        name = grid.host(server_config={"max_diffs": 1, "num_cycles": 3},
                         protocols={"secure_agg": b"\x01\x02protocol"})
        client = api.client(grid.url_for(transport))
        http = self._http_requests(api, client)
        job = client.new_job(name, "1.0")
        for cycle in (1, 2):
            api.start(job)
            assert job.state is JobState.ACCEPTED
            assert job.protocols == {"secure_agg": b"\x01\x02protocol"}
            result = api.train(job, "training_plan", *linear_data(n=32))
            api.report(job, job.model.create_serialized_diff(result.params))
            np.testing.assert_allclose(grid.checkpoint(name)[0], result.params[0], rtol=1e-6)
            assert grid.status(name)["cycles"][0]["reported"] == 1, cycle
        if transport == "ws":
            ws = client._net.ws
            assert ws._conn.subprotocol == _messages.BINARY_SUBPROTOCOL and ws.connects == 1
            assert http == []
        else:  # the same flow over HTTP: every download is a GET, but the plan only once
            gets = [r for r in http if r.startswith("GET ")]
            assert gets == ["GET /model-centric/get-model", "GET /model-centric/get-plan",
                            "GET /model-centric/get-protocol", "GET /model-centric/get-model",
                            "GET /model-centric/get-protocol"], http

    def test_too_large_for_the_socket_goes_over_http(self, grid, api):
        """A download larger than the socket's frame limit is refused by the node (413 for
        the request's max_bytes) and fetched over HTTP; the socket stays up."""
        from gridfl.client._transports import _REPLY_HEADER_ROOM

        name = grid.host()
        client = api.client(grid.url_for("ws"))
        # the model (126 bytes) fits, the plan (1330 bytes of ONNX) does not
        client._net.ws.max_message = _REPLY_HEADER_ROOM + 600
        http = self._http_requests(api, client)
        job = client.new_job(name, "1.0")
        api.start(job)
        assert job.state is JobState.ACCEPTED and "training_plan" in job.plans
        np.testing.assert_array_equal(job.model.params[0], linear_params()[0])
        assert http == ["GET /model-centric/get-plan"]
        ws = client._net.ws
        assert ws._conn.subprotocol == _messages.BINARY_SUBPROTOCOL and ws.connects == 1


class TestRunWorker:
    def test_runs_until_the_node_is_done(self, grid, transport):
        """run_worker trains and reports each cycle, then stops on a bare rejection."""
        from gridfl.client import run_worker

        name = grid.host(server_config={"num_cycles": 2, "max_diffs": 1})
        trained = []
        summary = run_worker(grid.url_for(transport), name, *linear_data(n=64), model_version="1.0",
                             max_wait=0.1, seed=1,
                             on_trained=lambda job, result: trained.append(result.steps))
        assert summary.finished and summary.cycles == 2 and trained == [4, 4]
        assert len(summary.losses) == 2 and summary.last_loss == summary.losses[-1]
        assert len(grid.status(name)["checkpoints"]) == 3

    def test_max_cycles(self, grid, transport):
        from gridfl.client import run_worker

        name = grid.host(server_config={"max_diffs": 1})
        summary = run_worker(grid.url_for(transport), name, *linear_data(n=64), max_cycles=1)
        assert summary.cycles == 1 and not summary.finished

    def test_auth_error_is_raised_at_once(self, grid, transport):
        from gridfl.client import run_worker

        name = grid.host(server_config={"authentication": {"secret": SECRET}})
        sleeps = []
        with pytest.raises(AuthenticationError):
            run_worker(grid.url_for(transport), name, *linear_data(n=64), auth_token="bad",
                       sleep=sleeps.append)
        assert sleeps == []
