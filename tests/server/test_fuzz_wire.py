"""Property tests (Hypothesis) of the message parsers in ``gridfl._messages`` and the node's JSON
decoding: arbitrary JSON-like values, bytes and text either parse into well-typed requests
or raise :class:`gridfl.InvalidRequestError` (a gridfl error, mapped to a 4xx), never anything
else, and quickly (a per-example deadline). Plus the allocation bound of the State codec:
``state.loads`` of arbitrary or mutated bytes never allocates much more than its input
(tests/test_state.py covers that it raises only StateError).
"""

from __future__ import annotations

import contextlib
import json
import math
import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridfl import GridflError, InvalidRequestError, StateError, _messages, state
from gridfl.server.bodies import parse_worker_json

FAST = settings(
    max_examples=250,
    deadline=500,  # ms per example: a parser that hangs or goes quadratic fails here
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "\ud800", "mnist", "1.0", "AAAA", "@@", "a" * 5000]),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=12), inner, max_size=5),
    ),
    max_leaves=20,
)

KEYS = [
    "model_name",
    "model_version",
    "auth_token",
    "worker_id",
    "model",
    "version",
    "ping",
    "download",
    "upload",
    "wait",
    "request_key",
    "diff",
    "num_samples",
    "metrics",
    "type",
    "data",
    "request_id",
    "model_id",
    "plan_id",
    "protocol_id",
    "receive_operations_as",
]
# objects with the protocol's own keys, holding anything: these get past the first checks
messages = st.dictionaries(st.sampled_from(KEYS), json_like, max_size=8)
# well-formed-looking values for each key, to reach the deeper checks
plausible = st.fixed_dictionaries(
    {},
    optional={
        "model_name": st.text(max_size=20),
        "worker_id": st.text(max_size=40),
        "model": st.text(max_size=20),
        "request_key": st.text(max_size=70),
        "diff": st.one_of(
            st.text(max_size=40), st.binary(max_size=60).map(_messages.encode_diff)
        ),
        "num_samples": st.one_of(st.integers(), st.floats()),
        "metrics": st.dictionaries(st.text(max_size=70), scalars, max_size=34),
        "ping": json_like,
        "wait": json_like,
        "model_id": st.one_of(st.text(max_size=30), st.integers().map(str)),
        "receive_operations_as": st.text(max_size=12),
    },
)

PARSERS = {
    "authenticate": _messages.parse_authenticate,
    "cycle_request": _messages.parse_cycle_request,
    "report": _messages.parse_report,
    "ws_frame": _messages.parse_ws_frame,
    "get-model": lambda v: _messages.parse_asset_request(v, "model_id"),
    "get-plan": lambda v: _messages.parse_asset_request(v, "plan_id", variant=True),
}


def _check_text(value) -> None:
    assert isinstance(value, str)
    assert "\x00" not in value
    value.encode("utf-8")  # no lone surrogates reach the database


def _check_parsed(result) -> None:
    """What a successful parse guarantees to the node."""
    if isinstance(result, _messages.AuthenticateRequest):
        _check_text(result.model_name)
        assert result.auth_token is None or isinstance(result.auth_token, str)
    elif isinstance(result, _messages.CycleRequest):
        _check_text(result.worker_id)
        for v in (result.ping, result.download, result.upload):
            assert v is None or (isinstance(v, float) and math.isfinite(v) and v >= 0)
        assert 0 <= result.wait <= _messages.MAX_WAIT
    elif isinstance(result, _messages.ReportRequest):
        assert isinstance(result.diff, bytes) and result.diff
        n = result.num_samples
        assert n is None or (type(n) is int and 0 < n <= _messages.MAX_NUM_SAMPLES)
        assert len(result.metrics) <= 32
        for k, v in result.metrics.items():
            _check_text(k)
            assert isinstance(v, float) and math.isfinite(v)
        json.dumps(result.metrics, allow_nan=False)
    elif isinstance(result, _messages.AssetRequest):
        assert type(result.asset_id) is int and result.asset_id < 1 << 63
        _check_text(result.worker_id)
        _check_text(result.request_key)


def _parse_all(value) -> None:
    for name, parse in PARSERS.items():
        try:
            result = parse(value)
        except InvalidRequestError as e:
            assert str(e), name  # a message to show the worker
        else:
            _check_parsed(result)


# --------------------------------------------------------------------------- parsers
@given(json_like)
@FAST
def test_parsers_take_any_json_value(value):
    _parse_all(value)


@given(messages)
@FAST
def test_parsers_take_protocol_keys_with_any_values(value):
    _parse_all(value)


@given(plausible)
@FAST
def test_parsers_take_plausible_messages(value):
    _parse_all(value)


@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
@FAST
def test_body_decoding_takes_any_bytes(body):
    try:
        value = parse_worker_json(body)
    except InvalidRequestError:
        return
    _parse_all(value)


@given(
    st.builds(
        lambda prefix, inner, suffix: prefix + inner + suffix,
        st.sampled_from(["", "[" * 3000, '{"a":' * 3000, "-"]),
        st.sampled_from(["1", "9" * 5000, "NaN", "1e999", '"\\ud800"', "", "{}"]),
        st.sampled_from(["", "]" * 3000, "}" * 3000]),
    )
)
@settings(max_examples=30, deadline=2000)
def test_body_decoding_takes_hostile_json(text):
    try:
        value = parse_worker_json(text.encode())
    except InvalidRequestError:
        return
    _parse_all(value)


@given(st.text(max_size=300))
@FAST
def test_decode_diff_takes_any_text(text):
    with contextlib.suppress(InvalidRequestError):
        assert isinstance(_messages.decode_diff(text), bytes)


# --------------------------------------------------------------------------- State allocation
_SMALL = state.dumps([np.arange(12, dtype=np.float32).reshape(4, 3), np.arange(3)])


def _peak_alloc(data: bytes) -> int:
    tracemalloc.start()
    try:
        state.loads(data)
    except StateError:
        pass
    except GridflError as e:  # pragma: no cover - only StateError is allowed
        raise AssertionError(f"unexpected {type(e).__name__}") from e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(
            st.tuples(st.integers(0, len(_SMALL) - 1), st.integers(0, 255)), max_size=6
        ).map(lambda edits: _mutate(_SMALL, edits)),
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_state_loads_allocates_in_proportion_to_its_input(data):
    # decoded arrays can be at most 8x the wire bytes (packed varints -> int64/float64)
    assert _peak_alloc(data) <= 16 * len(data) + 64 * 1024


def _mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        b[pos] = value
    return bytes(b)
