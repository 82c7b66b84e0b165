"""Numeric extremes: no sequence of accepted reports publishes a non-finite checkpoint or a
status that JSON cannot carry (Hypothesis, through GridNode on SQLite and PostgreSQL).

Every expected value comes from an independent reference: the cycle's weighted mean in
float64 (and, for metrics, in exact fractions), by the rule docs/configs.md states.
"""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridfl import InvalidRequestError, _messages, state
from gridfl.server import GridNode
from gridfl.server.aggregate import MAX_DIFF_VALUE
from tests.builders import SHAPES, host_payload
from tests.harness import make_settings, seat

F32_MAX = float(np.finfo(np.float32).max)
F16_MAX = float(np.finfo(np.float16).max)
F64_MAX = float(np.finfo(np.float64).max)
#: a float32 tensor and a float16 one: a float16 model leaves its range with diffs well
#: within the bound (a float32 one cannot: float32 max + 1e12 rounds back to float32 max)
DTYPES = [np.float32, np.float16]
MAXIMA = [F32_MAX, F16_MAX]
#: error of one rounding to each dtype, with margin: relative, and absolute for subnormals
ROUNDING = [2e-7, 1e-3]
SUBNORMAL = [float(np.finfo(dt).smallest_subnormal) for dt in DTYPES]
_BOUND = float(np.float32(MAX_DIFF_VALUE))  # the largest float32 within the bound


def _values(dtype, bound):
    width = 32 if dtype == np.float32 else 16
    top = min(bound, float(np.finfo(dtype).max))
    top = float(np.asarray(top, dtype))  # representable at that width
    extremes = st.sampled_from([top, -top, 0.0])
    return st.one_of(extremes, st.floats(-top, top, width=width, allow_nan=False))


def _tensors(bound):
    return st.tuples(
        *[
            st.lists(_values(dt, bound), min_size=int(np.prod(s)), max_size=int(np.prod(s))).map(
                lambda v, s=s, dt=dt: np.array(v, dt).reshape(s)
            )
            for s, dt in zip(SHAPES, DTYPES, strict=True)
        ]
    ).map(list)


model_st = _tensors(float("inf"))
weight = st.one_of(
    st.none(), st.integers(1, _messages.MAX_NUM_SAMPLES), st.just(_messages.MAX_NUM_SAMPLES)
)
metric = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e300, -1e300, F64_MAX, -F64_MAX]),
)
report_st = st.tuples(
    _tensors(_BOUND),
    weight,
    st.dictionaries(st.sampled_from(["loss", "acc"]), metric, max_size=2),
)


def reference_mean(reports) -> np.ndarray:
    """The cycle's aggregate in float64: the plain mean when no report carried
    num_samples, the weighted mean when all did; in a mixed cycle a report without
    num_samples weighs the mean num_samples of the others."""
    flats = [np.concatenate([a.astype(np.float64).ravel() for a in d]) for d, _, _ in reports]
    weights = [n for _, n, _ in reports if n is not None]
    fill = (sum(weights) / len(weights)) if weights else 1.0
    w = np.array([float(n) if n is not None else fill for _, n, _ in reports])
    return sum((wi / w.sum()) * f for wi, f in zip(w, flats, strict=True))


def reference_metrics(reports) -> dict[str, tuple[float, float]]:
    """Each metric's exact weighted mean (fractions), and the scale of its floating-point
    error: sum(|v| w) / sum(w), which a mean of opposite-signed values can cancel down
    to far below (the standard bound of a rounded weighted sum)."""
    weighted = all(n is not None for _, n, _ in reports)
    sums: dict[str, Fraction] = {}
    scales: dict[str, Fraction] = {}
    totals: dict[str, int] = {}
    for _, n, m in reports:
        for k, v in m.items():
            w = n if weighted else 1
            sums[k] = sums.get(k, Fraction(0)) + w * Fraction(v)
            scales[k] = scales.get(k, Fraction(0)) + w * abs(Fraction(v))
            totals[k] = totals.get(k, 0) + w
    return {k: (float(sums[k] / totals[k]), float(scales[k] / totals[k])) for k in sums}


_names = (f"p{i}" for i in itertools.count())


@pytest.fixture
def node(db_url, tmp_path):
    n = GridNode(make_settings(db_url, tmp_path))
    yield n
    n.close()


def _report(node: GridNode, name: str, diff, num_samples, metrics) -> None:
    node.report(
        _messages.ReportRequest(*seat(node, name), state.dumps(diff), num_samples, metrics)
    )


@st.composite
def processes(draw):
    """A model, and 1-3 cycles of the same number (1-4) of reports each."""
    k = draw(st.integers(1, 4))
    cycles = draw(st.lists(st.lists(report_st, min_size=k, max_size=k), min_size=1, max_size=3))
    return draw(model_st), k, cycles


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(process=processes())
def test_accepted_reports_never_publish_a_non_finite_model(node, process):
    model, k, cycles = process
    name = next(_names)
    node.host(host_payload(name, server_config={"max_diffs": k, "num_cycles": 0}, params=model))
    current = model
    for seq, reports in enumerate(cycles, start=1):
        for report in reports:
            _report(node, name, *report)
        status = node.status(name, "1.0")
        json.dumps(status, allow_nan=False)  # valid JSON, or this raises
        cycle = status["cycles"][seq - 1]
        new = state.loads(node.checkpoint(name, "1.0"))
        assert all(np.isfinite(a).all() for a in new)
        mean = reference_mean(reports)
        expected, tol, beyond = [], [], False
        for i, (p, shape) in enumerate(zip(current, SHAPES, strict=True)):
            size, start = int(np.prod(shape)), sum(int(np.prod(s)) for s in SHAPES[:i])
            e = p.astype(np.float64).ravel() - mean[start : start + size]
            # the node sums in float32 (weights rounded to float32 too), then rounds once
            largest = np.max([np.abs(d[i].astype(np.float64)).ravel() for d, _, _ in reports], 0)
            t = 1e-6 * largest + ROUNDING[i] * np.abs(e) + SUBNORMAL[i]
            expected.append(e)
            tol.append(t)
            beyond |= bool(np.any(np.abs(e) + t > MAXIMA[i]))
        if cycle["status"] == "completed":
            for got, e, t in zip(new, expected, tol, strict=True):
                assert np.all(np.abs(got.astype(np.float64).ravel() - e) <= t), (got, e)
            current = new
        else:
            assert cycle["status"] == "expired", cycle
            # only a result beyond a dtype's range may expire a cycle, and it changes nothing
            assert beyond, expected
            assert all(np.array_equal(a, b) for a, b in zip(new, current, strict=True))
        for key, (value, scale) in reference_metrics(reports).items():
            assert cycle["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-14 * scale)


def test_a_diff_beyond_the_bound_is_refused_and_changes_nothing(node):
    """The adversarial check's examples: 3e38 twice (each finite, their sum not in
    float32), and 1e23 weighted by 2**53 - 1."""
    node.host(host_payload("edge", server_config={"max_diffs": 2}))
    before = node.checkpoint("edge", "1.0")
    for value, n in ((3e38, None), (1e23, _messages.MAX_NUM_SAMPLES)):
        diff = [np.full(s, value, np.float32) for s in SHAPES]  # the default float32 model
        with pytest.raises(InvalidRequestError, match="beyond ±1e\\+12"):
            _report(node, "edge", diff, n, {})
    assert node.checkpoint("edge", "1.0") == before
    assert node.status("edge", "1.0")["cycles"][0]["reported"] == 0
