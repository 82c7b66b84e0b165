"""Unit tests of the sans-I/O pieces: wire parsing, config validation, aggregation rules."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl import ConfigError, InvalidRequestError, _messages
from gridfl.server import aggregate as agg
from gridfl.server.config import validate_server_config, worker_capacity


def test_parse_report_and_errors():
    r = _messages.parse_report(
        {
            "worker_id": "w",
            "request_key": "k",
            "diff": "AAEC",
            "num_samples": 5,
            "metrics": {"loss": 0.5},
        }
    )
    assert r.diff == b"\x00\x01\x02" and r.num_samples == 5 and r.metrics == {"loss": 0.5}
    for bad, text in [
        ({"request_key": "k", "diff": "AA=="}, "'worker_id' is required"),
        ({"worker_id": "w", "request_key": "k", "diff": "@@"}, "base64"),
        ({"worker_id": "w", "request_key": "k", "diff": "AA==", "num_samples": 0}, "positive"),
        ({"worker_id": "w", "request_key": "k", "diff": "AA==", "num_samples": True}, "positive"),
        ({"worker_id": "w", "request_key": "k", "diff": "AA==", "metrics": {"x": "y"}}, "metric"),
        ([], "JSON object"),
    ]:
        with pytest.raises(InvalidRequestError, match=text):
            _messages.parse_report(bad)


def test_parse_cycle_request_speeds():
    r = _messages.parse_cycle_request({"worker_id": "w", "model": "m", "ping": 3, "download": 1.5})
    assert (r.version, r.ping, r.download, r.upload) == (None, 3.0, 1.5, None)
    with pytest.raises(InvalidRequestError, match="positive number"):
        _messages.parse_cycle_request({"worker_id": "w", "model": "m", "upload": -1})


def test_rejected_response_shape():
    assert _messages.CycleRejected(None, "done").to_json() == {
        "status": "rejected",
        "reason": "done",
    }
    assert _messages.CycleRejected(-3, "x").to_json()["timeout"] == 0


def test_server_config_defaults_and_refusals():
    cfg = validate_server_config({})
    assert cfg["num_cycles"] == 0 and cfg["pool_selection"] == "iterate"
    assert worker_capacity({"max_workers": 10, "over_selection": 1.3}) == 13
    assert worker_capacity({"max_workers": 10, "over_selection": 1.0}) == 10
    for bad in [
        {"x": 1},
        {"cycle_length": 0},
        {"num_cycles": -1},
        {"max_diffs": 1.5},
        {"iterative_plan": 1},
        {"over_selection": 0.5},
        {"authentication": {"k": 1}},
        {"authentication": {"endpoint": "ftp://x"}},
        {"minimum_upload_speed": "fast"},
    ]:
        with pytest.raises(ConfigError):
            validate_server_config(bad)


def test_mean_rules():
    spec = agg.ModelSpec.of([np.zeros(2, np.float32)])
    d = [np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)]
    sx = agg.new_sum(spec)
    for x in d:
        agg.fold(sx, [x], spec)
    np.testing.assert_allclose(agg.mean_diff(None, 0, 0, sx, 2), [2, 4])
    sw = agg.new_sum(spec)
    agg.fold(sw, [d[0]], spec, weight=1)
    agg.fold(sw, [d[1]], spec, weight=3)
    np.testing.assert_allclose(agg.mean_diff(sw, 2, 4, None, 0), [2.5, 5])
    # mixed: the report without num_samples weighs the mean num_samples (2)
    sx1 = agg.new_sum(spec)
    agg.fold(sx1, [np.array([5.0, 5.0], np.float32)], spec)
    np.testing.assert_allclose(agg.mean_diff(sw, 2, 4, sx1, 1), [(10 + 2 * 5) / 6, (20 + 10) / 6])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_fold_is_the_weighted_sum_in_the_sums_dtype(dtype):
    """Weighted reports fold into the running sum in place, in its dtype: numpy's float64
    sum of ``weight * diff`` within that dtype's rounding, and a misaligned view of a diff
    folds to the same sums."""
    rng = np.random.default_rng(7)
    # more than two of the weighted fold's chunks, and a part of one
    shapes = [(30, 7), (5,), (0,), (2 * agg._SCALE_CHUNK + 1,), (4, 3, 2)]
    spec = agg.ModelSpec.of([np.zeros(s, dtype) for s in shapes])
    diffs = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]
    weights = [600, 1, 37, 2**20]
    total = agg.new_sum(spec)
    before = total.ctypes.data
    for diff, w in zip(diffs, weights, strict=True):
        agg.fold(total, diff, spec, weight=w)
    assert total.ctypes.data == before and total.dtype == dtype  # in place
    expected = sum(
        w * np.concatenate([a.reshape(-1).astype(np.float64) for a in diff])
        for diff, w in zip(diffs, weights, strict=True)
    )
    eps = np.finfo(dtype).eps
    bound = 4 * eps * sum(w * np.abs(np.concatenate([a.reshape(-1) for a in d])).astype(
        np.float64) for d, w in zip(diffs, weights, strict=True))
    assert np.all(np.abs(total - expected) <= bound + 1e-300)
    # a misaligned view of the same values folds to the same sums
    raw = bytearray(1) + bytearray(np.concatenate([a.reshape(-1) for a in diffs[0]]).tobytes())
    flat = np.frombuffer(raw, dtype, offset=1)
    assert not flat.flags.aligned
    at, odd = 0, []
    for s in shapes:
        n = int(np.prod(s))
        odd.append(flat[at : at + n].reshape(s))
        at += n
    one, other = agg.new_sum(spec), agg.new_sum(spec)
    agg.fold(one, diffs[0], spec, weight=600)
    agg.fold(other, odd, spec, weight=600)
    np.testing.assert_allclose(other, one, rtol=4 * eps, atol=0)


def test_validate_diff():
    spec = agg.ModelSpec.of([np.zeros((2, 2), np.float32)])
    agg.validate_diff([np.ones((2, 2), np.float32)], spec)
    for bad in (
        [np.ones((2, 2), np.float64)],
        [np.ones(4, np.float32)],
        [],
        [np.full((2, 2), np.inf, np.float32)],
    ):
        with pytest.raises(InvalidRequestError):
            agg.validate_diff(bad, spec)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_validate_diff_holds_every_value_to_the_bound(dtype):
    """Whichever way a tensor is checked (one sum of squares when it is small, min and
    max otherwise), the verdict is each value's own against MAX_DIFF_VALUE."""
    spec = agg.ModelSpec.of([np.zeros(1000, dtype)])
    within = float(np.asarray(agg.MAX_DIFF_VALUE, dtype))
    if within > agg.MAX_DIFF_VALUE:
        within = float(np.nextafter(np.asarray(within, dtype), dtype(0)))
    beyond = float(np.nextafter(np.asarray(within, dtype), dtype(np.inf)))
    assert within <= agg.MAX_DIFF_VALUE < beyond

    def diff(*values):
        a = np.full(1000, 1e-3, dtype)
        a[: len(values)] = values
        return [a]

    for ok in (diff(), diff(within), diff(-within), diff(*[within / 10] * 1000)):
        agg.validate_diff(ok, spec)
    for bad, says in (
        (diff(beyond), "beyond"),
        (diff(-beyond), "beyond"),
        (diff(within, beyond), "beyond"),
        (diff(np.nan), "NaN or infinite"),
        (diff(np.inf, -np.inf), "NaN or infinite"),
    ):
        with pytest.raises(InvalidRequestError, match=says):
            agg.validate_diff(bad, spec)


def test_held_admissions_batch_what_one_signal_wakes():
    """Requests queued in the same loop turns go to the node in one admit_held call (at
    most ``batch`` each); each waiter gets its own reply, or its own error."""
    import asyncio

    from gridfl.server.held import HeldAdmissions

    class Node:  # admit_held's contract: one reply or exception per request, in order
        def __init__(self):
            self.calls = []

        def admit_held(self, reqs):
            self.calls.append([r.worker_id for r in reqs])
            return [
                ValueError(r.worker_id) if r.worker_id == "bad" else {"for": r.worker_id}
                for r in reqs
            ]

    async def main(ids, batch):
        node = Node()
        held = HeldAdmissions(node, batch=batch)
        reqs = [_messages.CycleRequest(worker_id=i, model="m") for i in ids]
        out = await asyncio.gather(*(held.admit(r) for r in reqs), return_exceptions=True)
        later = await held.admit(_messages.CycleRequest(worker_id="later", model="m"))
        return node.calls, out, later

    calls, out, later = asyncio.run(main(["a", "bad", "c"], batch=64))
    assert calls == [["a", "bad", "c"], ["later"]]
    assert out[0] == {"for": "a"} and out[2] == {"for": "c"}
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad"
    assert later == {"for": "later"}
    calls, out, _ = asyncio.run(main([str(i) for i in range(5)], batch=2))
    assert calls == [["0", "1"], ["2", "3"], ["4"], ["later"]]
    assert out == [{"for": str(i)} for i in range(5)]
