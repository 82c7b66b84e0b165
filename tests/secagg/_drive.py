"""A worker driven by hand through the stages of secure aggregation over HTTP (the SDK
does the same inside ``job.report``); the tests interleave bad messages and crashes."""

from __future__ import annotations

import time

import numpy as np

from gridfl import _messages
from gridfl.secagg import WorkerSession
from gridfl.secagg import messages as m
from tests.harness import HttpWorker


def assert_weighted_mean_step(original, new, diffs, weights, params) -> None:
    """``new`` is ``original`` less the weighted mean of the diffs clipped to the range
    (numpy, FedAvg's formula), within the quantization bound: what a secure cycle of
    these diffs, reported with these ``num_samples``, must give."""
    w = np.array(weights, np.float64)
    for t, cur in enumerate(original):
        c = params.clipping_range
        stacked = np.stack([np.clip(d[t], -c, c) for d in diffs]).astype(np.float64)
        mean = np.tensordot(w, stacked, axes=1) / w.sum()
        np.testing.assert_allclose(new[t], cur - mean, rtol=0, atol=1 / params.scale + 1e-6)


class Driver:
    """One worker: authenticated and accepted into the open cycle of ``mnist``."""

    def __init__(self, url: str, params, auth_token: str | None = None, **identity) -> None:
        self.http = HttpWorker(url)
        body = {"model_name": "mnist", "auth_token": auth_token}
        st, auth = self.http.call(_messages.AUTHENTICATE, body)
        assert st == 200, auth
        self.wid = auth["worker_id"]
        req = {"worker_id": self.wid, "model": "mnist", "protocols": ["secure_aggregation"]}
        st, cyc = self.http.call(_messages.CYCLE_REQUEST, req)
        assert st == 200 and cyc["status"] == "accepted", cyc
        self.key = cyc["request_key"]
        self.session = WorkerSession(params, self.wid, **identity)

    def move_to(self, url: str) -> None:
        """Talk to another server process on the same database from now on."""
        self.http.close()
        self.http = HttpWorker(url)

    def send(self, stage: str, message=None, **override) -> tuple[int, dict]:
        body = {"worker_id": self.wid, "request_key": self.key, "stage": stage}
        return self.http.call(
            _messages.SECURE_AGGREGATION, {**body, "message": message, **override}
        )

    def ok(self, stage: str, message=None) -> dict:
        st, reply = self.send(stage, message)
        assert st == 200, reply
        self.session.bind(reply["session"].encode())
        return reply

    def wait_for(self, stage: str) -> dict:
        """Poll until the node has this worker's message for ``stage``."""
        while True:
            reply = self.ok(stage)
            if reply["status"] != "waiting":
                return reply
            time.sleep(reply["retry_after"])

    def answer_unmask(self) -> m.UnmaskRequest:
        """Wait for the unmask stage and answer its request as an honest worker does;
        the request."""
        request = m.UnmaskRequest.from_json(self.wait_for(m.UNMASK)["message"])
        self.ok(m.UNMASK, self.session.unmask(request).to_json())
        return request
