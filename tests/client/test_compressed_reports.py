"""Compressed reports end to end: the worker SDK on a real node (uvicorn on loopback),
over a WebSocket that negotiated gridfl.binary.2. The checkpoint must be what a numpy
reference computes from the dequantized diffs (tests/_compression_ref.py), top-k's error
feedback must carry into the next cycle, and a worker over HTTP must keep plain State."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import state
from gridfl.client import Syft
from tests._compression_ref import ref_float16, ref_int8, ref_topk
from tests.builders import linear_params, linear_sgd_plan

FEATURES = 40
WEIGHTS = [50, 30, 20]


def _params() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [p + rng.standard_normal(p.shape).astype(np.float32) for p in linear_params(FEATURES)]


def _diff(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return [(0.1 * rng.standard_normal(p.shape)).astype(np.float32) for p in _params()]


def _host(server, compression: dict, max_diffs: int) -> str:
    return server.host(
        params=_params(),
        plan=linear_sgd_plan(FEATURES),
        server_config={"max_diffs": max_diffs, "compression": compression},
    )


def _join(client: Syft, name: str):
    job = client.new_job(name, "1.0")
    job.start()
    assert job.state.value == "accepted", job.state
    return job


@pytest.mark.parametrize(
    ("compression", "reference"),
    [
        ({"kind": "float16"}, ref_float16),
        ({"kind": "int8"}, ref_int8),
        ({"kind": "topk", "fraction": 0.25}, lambda a: ref_topk(a, 0.25)),
    ],
    ids=["float16", "int8", "topk"],
)
def test_checkpoint_is_the_mean_of_dequantized_diffs(server, compression, reference):
    name = _host(server, compression, max_diffs=len(WEIGHTS))
    clients = [Syft(server.ws_url) for _ in WEIGHTS]
    try:
        for i, (client, n) in enumerate(zip(clients, WEIGHTS, strict=True)):
            job = _join(client, name)
            job.report(state.dumps(_diff(i)), num_samples=n)
    finally:
        for c in clients:
            c.close()
    got = server.checkpoint(name)
    total = sum(WEIGHTS)
    for j, p in enumerate(_params()):
        mean = sum(n * reference(_diff(i))[j] for i, n in enumerate(WEIGHTS)) / total
        np.testing.assert_allclose(got[j], p - mean, rtol=1e-5, atol=1e-6)
    # and it is not the uncompressed mean: the reports really were compressed
    exact = [sum(n * _diff(i)[j].astype(np.float64) for i, n in enumerate(WEIGHTS)) / total
             for j in range(2)]
    assert not np.allclose(got[0], _params()[0] - exact[0], rtol=0, atol=1e-7)


def test_topk_error_feedback_carries_over_cycles(server):
    """One worker, one report per cycle: each cycle's update is the top-k of (its diff +
    what earlier cycles left out), which the reference tracks itself."""
    fraction = 0.1
    name = _host(server, {"kind": "topk", "fraction": fraction}, max_diffs=1)
    want = [p.astype(np.float64) for p in _params()]
    residual = [np.zeros_like(w) for w in want]
    with Syft(server.ws_url) as client:
        for cycle in range(4):
            job = _join(client, name)
            diff = _diff(10 + cycle)
            job.report(state.dumps(diff))
            carried = [d.astype(np.float64) + r for d, r in zip(diff, residual, strict=True)]
            sent = ref_topk(carried, fraction)
            residual = [c - s for c, s in zip(carried, sent, strict=True)]
            want = [w - s for w, s in zip(want, sent, strict=True)]
            got = server.checkpoint(name)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            client._compressor.residual((name, "1.0")),
            np.concatenate([r.ravel() for r in residual]),
            atol=1e-6,
        )


def test_http_worker_keeps_plain_state(server):
    """The node asks every worker; one without gridfl.binary.2 (HTTP here, syft.js alike)
    sends plain State, aggregated exactly."""
    name = _host(server, {"kind": "int8"}, max_diffs=1)
    with Syft(server.http_url) as client:
        job = _join(client, name)
        job.report(state.dumps(_diff(0)))
    for g, p, d in zip(server.checkpoint(name), _params(), _diff(0), strict=True):
        np.testing.assert_allclose(g, p - d, rtol=1e-6, atol=1e-7)
