"""The worker's input vector (gridfl.secagg.quantize.encode), against the module's formula
computed here in one pass: ``[w, w * q(x)...]`` mod 2**b with ``q(x)`` the stochastic
rounding of ``clip(x, -c, c) * scale``."""

from __future__ import annotations

import numpy as np
import pytest

from gridfl._exceptions import ProtocolError
from gridfl.secagg import quantize
from gridfl.secagg.params import SecAggParams


def reference(diff, weight: int, p: SecAggParams, seed: int) -> list[int]:
    x = np.concatenate([np.ravel(a).astype(np.float64) for a in diff])
    scaled = np.clip(x, -p.clipping_range, p.clipping_range) * p.scale
    low = np.floor(scaled)
    up = np.random.default_rng(seed).random(x.size) < scaled - low
    q = [int(v) + int(u) for v, u in zip(low, up, strict=True)]
    return [weight] + [(weight * v) % (1 << p.field_bits) for v in q]


@pytest.mark.parametrize("chunk", [4, 5, quantize.CHUNK])
def test_encode_is_the_formula_across_arrays_and_chunks(monkeypatch, chunk):
    monkeypatch.setattr(quantize, "CHUNK", chunk)
    p = SecAggParams.from_config(
        {"threshold": 2, "clipping_range": 0.3, "field_bits": 40, "max_num_samples": 100},
        max_workers=3,
    )
    rng = np.random.default_rng(0)
    diff = [
        rng.normal(0, 0.2, (3, 7)).astype(np.float32),  # some beyond the range: clipped
        np.array([0.3, -0.3, 0.0, 1e-9, -1e-9]),
        rng.normal(0, 0.2, 11).astype(np.float32)[::2],  # not contiguous
    ]
    got = quantize.encode(diff, 37, p, np.random.default_rng(5))
    assert got.dtype == np.uint64
    assert got.tolist() == reference(diff, 37, p, seed=5)


def test_encode_rounds_up_with_the_probability_of_the_fraction():
    p = SecAggParams.from_config({"threshold": 2, "clipping_range": 1.0}, max_workers=3)
    n, fraction = 200_000, 0.3
    x = np.full(n, (7 + fraction) / p.scale)
    vec = quantize.encode([x], None, p, np.random.default_rng(1))
    assert vec[0] == 1 and set(vec[1:].tolist()) == {7, 8}
    share_up = float(np.mean(vec[1:] == 8))
    assert abs(share_up - fraction) < 5 * np.sqrt(fraction * (1 - fraction) / n)


def test_encode_of_an_empty_diff_is_the_weight_alone():
    p = SecAggParams.from_config({"threshold": 2}, max_workers=3)
    assert quantize.encode([], 3, p).tolist() == [3]
    assert quantize.encode([np.zeros(0, np.float32)], None, p).tolist() == [1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("chunk", [4, quantize.CHUNK])
def test_a_diff_with_nan_or_inf_is_refused_naming_its_tensor(monkeypatch, bad, chunk):
    """The node cannot refuse a masked input as it refuses such a plain report, and NaN
    has no integer: the worker refuses it, wherever it sits in a tensor."""
    monkeypatch.setattr(quantize, "CHUNK", chunk)
    p = SecAggParams.from_config({"threshold": 2, "field_bits": 64}, max_workers=3)
    second = np.zeros(9, np.float32)
    second[7] = bad  # in the second chunk of 4
    diff = [np.zeros(3, np.float32), second]
    with pytest.raises(ProtocolError, match="diff tensor 1 has NaN or infinite values"):
        quantize.encode(diff, 1, p)
    with pytest.raises(ProtocolError, match="diff tensor 1 has NaN or infinite values"):
        quantize.check_finite(diff)
    quantize.check_finite([np.arange(3), np.zeros(2, bool)])  # integers and booleans pass
