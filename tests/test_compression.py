"""Compressed diffs (gridfl.compression) against an independent numpy reference: each
encoding's payload decodes to what the reference quantizer / sparsifier computes from the
formula, folds into a running sum as ``sum + weight x dequantized``, and top-k's error
feedback loses nothing over several cycles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gridfl import compression
from gridfl._exceptions import ConfigError, InvalidRequestError, ModelError
from gridfl.client._compress import Compressor
from gridfl.server import aggregate as agg
from gridfl.state import dumps
from tests._compression_ref import ref_float16, ref_int8, ref_topk

SHAPES = [(8, 5), (5,), (3, 4, 2)]
TOTAL = 40 + 5 + 24


def _diff(seed: int, scale: float = 0.01) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def _spec(arrays):
    return agg.ModelSpec.of(arrays)


def _decode(kind, arrays, fraction=0.1):
    payload = compression.encode(kind, arrays, fraction)
    return payload, compression.decode(
        kind, payload, [a.shape for a in arrays], [a.dtype for a in arrays], fraction=fraction
    )


# --- each encoding vs the reference ----------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "reference", "size"),
    [
        ("float16", ref_float16, 2 * TOTAL),
        ("int8", ref_int8, 4 * len(SHAPES) + TOTAL),
        ("topk", lambda a: ref_topk(a, 0.1), 4 + 8 * math.ceil(0.1 * TOTAL)),
    ],
)
def test_decoded_tensors_match_the_reference(kind, reference, size):
    arrays = _diff(1)
    payload, decoded = _decode(kind, arrays)
    assert len(payload) == size
    want = reference(arrays)
    assert len(decoded) == len(arrays)
    for got, w, a in zip(decoded, want, arrays, strict=True):
        assert got.shape == a.shape and got.dtype == a.dtype
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-9)


def test_int8_error_is_within_half_a_step():
    arrays = _diff(2)
    _, decoded = _decode("int8", arrays)
    for got, a in zip(decoded, arrays, strict=True):
        step = np.abs(a).max() / 127
        assert np.abs(got - a).max() <= step / 2 * (1 + 1e-5)


@pytest.mark.parametrize("kind", compression.KINDS)
@pytest.mark.parametrize("weight", [None, 7])
@pytest.mark.parametrize("acc", [np.float32, np.float64])
def test_fold_adds_weight_times_the_dequantized_diff(kind, weight, acc):
    reference = {"float16": ref_float16, "int8": ref_int8,
                 "topk": lambda a: ref_topk(a, 0.1)}[kind]
    start = np.random.default_rng(9).standard_normal(TOTAL).astype(acc)
    total = start.copy()
    folded = []
    for seed in (3, 4, 5):
        arrays = _diff(seed)
        _, decoded = _decode(kind, arrays)
        agg.fold(total, decoded, _spec(arrays), weight=weight)
        folded.append(np.concatenate([r.ravel() for r in reference(arrays)]))
    want = start.astype(np.float64) + (1 if weight is None else weight) * np.sum(folded, axis=0)
    np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-6)


def test_a_zero_tensor_has_scale_zero():
    arrays = [np.zeros(s, np.float32) for s in SHAPES]
    arrays[1] += 1
    payload, decoded = _decode("int8", arrays)
    assert np.frombuffer(payload[:12], "<f4").tolist() == [0.0, float(np.float32(1 / 127)), 0.0]
    np.testing.assert_allclose(decoded[1], 1.0, rtol=1e-6)
    assert not decoded[0].any() and not decoded[2].any()


def test_float16_refuses_what_it_cannot_hold():
    with pytest.raises(ModelError, match="beyond float16's range"):
        compression.encode("float16", [np.array([1e6], np.float32)])


# --- error feedback --------------------------------------------------------------------------
def test_error_feedback_sent_plus_residual_is_every_true_diff():
    """Over several cycles, what top-k sent plus what the worker still holds equals the sum
    of the true diffs (Stich et al. 2018: nothing is lost, only delayed)."""
    c = Compressor()
    key = ("m", "1")
    setting = {"kind": "topk", "fraction": 0.1}
    true_sum = np.zeros(TOTAL)
    sent_sum = np.zeros(TOTAL)
    for cycle in range(6):
        arrays = _diff(10 + cycle)
        payload, commit = c.compress(setting, key, dumps(arrays), SHAPES)
        commit()
        decoded = compression.decode(
            "topk", payload, SHAPES, [np.dtype(np.float32)] * 3, fraction=0.1
        )
        sent_sum += np.concatenate([d.ravel() for d in decoded])
        true_sum += np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        np.testing.assert_allclose(sent_sum + c.residual(key), true_sum, atol=1e-6)
        # this cycle sent the largest values of (its diff + the residual it started with)
        assert np.count_nonzero(np.concatenate([d.ravel() for d in decoded])) <= 7


def test_error_feedback_sends_the_largest_of_diff_plus_residual():
    c = Compressor()
    key, setting = ("m", None), {"kind": "topk", "fraction": 0.5}
    shapes = [(4,)]
    _, commit = c.compress(setting, key, dumps([np.array([4, 3, 1, 0], np.float32)]), shapes)
    commit()
    assert c.residual(key).tolist() == [0, 0, 1, 0]
    payload, _ = c.compress(setting, key, dumps([np.array([0, 0, 0.5, -2], np.float32)]), shapes)
    decoded = compression.decode("topk", payload, shapes, [np.dtype(np.float32)])
    assert decoded[0].tolist() == [0, 0, 1.5, -2]


def test_a_failed_report_keeps_the_residual():
    c = Compressor()
    key, setting = ("m", None), {"kind": "topk", "fraction": 0.5}
    _, commit = c.compress(setting, key, dumps([np.array([4, 3, 1, 0], np.float32)]), [(4,)])
    commit()
    c.compress(setting, key, dumps([np.array([9, 9, 9, 9], np.float32)]), [(4,)])  # not sent
    assert c.residual(key).tolist() == [0, 0, 1, 0]


def test_residuals_are_per_process():
    c = Compressor()
    setting = {"kind": "topk", "fraction": 0.5}
    for key, diff in ((("a", "1"), [4, 3, 1, 0]), (("b", "1"), [0, 1, 3, 4])):
        _, commit = c.compress(setting, key, dumps([np.array(diff, np.float32)]), [(4,)])
        commit()
    assert c.residual(("a", "1")).tolist() == [0, 0, 1, 0]
    assert c.residual(("b", "1")).tolist() == [0, 1, 0, 0]


# --- what decode refuses (the node's table of cases is tests/server/test_bad_input.py) -----
def _refused(kind, payload, match, fraction=None):
    with pytest.raises(InvalidRequestError, match=match):
        compression.decode(kind, payload, SHAPES, [np.dtype(np.float32)] * 3, fraction=fraction)


def test_decode_refuses_malformed_payloads():
    _refused("float16", b"\0" * (2 * TOTAL - 1), "float16 diff is 137 bytes")
    _refused("int8", b"\0" * (4 * 2 + TOTAL), "int8 diff is 77 bytes; this model's is 81")
    scales = np.array([1, np.nan, 1], "<f4").tobytes()
    _refused("int8", scales + b"\1" * TOTAL, "tensor 1's scale is nan")
    big = np.array([1, 1, 1e11], "<f4").tobytes()
    _refused("int8", big + b"\x80" * TOTAL, r"tensor 2 dequantizes to 1\.28e\+13")
    head = np.array([2], "<u4").tobytes()
    _refused("topk", head + np.array([5, 5], "<u4").tobytes() + b"\0" * 8, "strictly increasing")
    _refused("topk", head + np.array([5, TOTAL], "<u4").tobytes() + b"\0" * 8, "out of range")
    _refused("topk", head + np.array([1, 2], "<u4").tobytes() + b"\0" * 8, "more than the 1",
             fraction=0.01)
    _refused("topk", head, "topk diff is 4 bytes")
    _refused("bfloat16", b"", "unknown compression 'bfloat16'")


def test_the_bound_is_the_nodes():
    assert compression.MAX_VALUE == agg.MAX_DIFF_VALUE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("int8", "must be null or an object"),
        ({"kind": "int4"}, "must be null or an object"),
        ({"kind": "topk", "fraction": 1.5}, r"fraction must be a number in \(0, 1\]"),
        ({"kind": "topk", "fraction": True}, "fraction must be a number"),
        ({"kind": "float16", "fraction": 0.1}, "unknown keys"),
    ],
)
def test_config_refuses(value, message):
    with pytest.raises(ConfigError, match=message):
        compression.validate_config(value)


def test_config_defaults():
    assert compression.validate_config(None) is None
    assert compression.validate_config({"kind": "int8"}) == {"kind": "int8"}
    assert compression.validate_config({"kind": "topk", "fraction": 1}) == {
        "kind": "topk", "fraction": 1.0}


def test_widen_float16_is_exact_for_every_finite_float16():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    got = compression.widen_float16(finite)
    want = finite.astype(np.float32)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("scale", [600.0, 2.0**53 - 1])
def test_widen_float16_scales(scale):
    values = np.array([1.5, -3e-6, 65504, 0], np.float16)
    np.testing.assert_allclose(compression.widen_float16(values, scale),
                               values.astype(np.float64) * scale, rtol=1e-7)
