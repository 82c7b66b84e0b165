"""Clipping and quantization of a diff into the field, and back.

A worker's input is one vector mod 2**b: element 0 is its weight w (``num_samples``,
at most ``max_num_samples``; 1 when it reports none), then ``w * q(x)`` for every diff
value x, where ``q(x) = stochastic_round(clip(x, -c, c) * scale)`` is a signed integer
in ``[-(2**(B-1) - 1), 2**(B-1) - 1]`` (B = ``quantization_bits``). Negative values are
stored as their two's complement mod 2**b. Stochastic rounding is unbiased, so the
dequantized mean has no systematic error; each value's error is below ``1/scale``.

The sum of the inputs, read back as signed integers (hosting checks that the field holds
it), gives ``sum(w)`` and ``sum(w * q(x))``; the weighted mean diff is their ratio over
``scale``.

    >>> import numpy as np
    >>> from gridfl.secagg.params import SecAggParams
    >>> p = SecAggParams.from_config({"threshold": 2}, max_workers=3)
    >>> v = encode([np.array([1.0, -2.0, 0.0], np.float32)], 2, p)  # -2.0 is clipped
    >>> decode(to_signed(v, p.field_bits), p).tolist()
    [1.0, -1.0, 0.0]
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from gridfl._exceptions import ProtocolError
from gridfl.secagg.params import SecAggParams


def quantize(flat: np.ndarray, p: SecAggParams, rng: np.random.Generator | None = None):
    """``q(x)`` of the module docstring, as int64 (stochastic rounding)."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    # one float64 buffer, worked in place: clipped, scaled, then its fractional part
    scaled = np.array(flat, np.float64)
    np.clip(scaled, -p.clipping_range, p.clipping_range, out=scaled)
    scaled *= p.scale
    low = np.floor(scaled)
    scaled -= low
    q = low.astype(np.int64)
    q += rng.random(scaled.shape) < scaled
    return q


def weight_of(num_samples: int | None, p: SecAggParams) -> int:
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ProtocolError(f"num_samples must be a positive integer; got {num_samples!r}")
    return min(num_samples, p.max_num_samples)


def encode_quantized(q: np.ndarray, weight: int, p: SecAggParams) -> np.ndarray:
    """``[w, w * q...]`` mod 2**b as uint64 (two's complement for negatives)."""
    vec = np.empty(q.size + 1, np.int64)
    vec[0] = weight
    np.multiply(q, weight, out=vec[1:])
    out = vec.view(np.uint64)  # two's complement: the same bits, read mod 2**64
    if p.field_bits < 64:
        out &= np.uint64((1 << p.field_bits) - 1)
    return out


def encode(diff: Sequence[np.ndarray], num_samples: int | None, p: SecAggParams, rng=None):
    """A diff (list of arrays) as the worker's unmasked input vector."""
    flat = np.concatenate([np.ravel(a) for a in diff]) if diff else np.zeros(0)
    return encode_quantized(quantize(flat, p, rng), weight_of(num_samples, p), p)


def to_signed(vec: np.ndarray, bits: int) -> np.ndarray:
    """Values mod 2**bits read as signed integers in [-2**(bits-1), 2**(bits-1))."""
    v = vec.astype(np.uint64)
    if bits == 64:
        return v.view(np.int64)
    half = np.uint64(1 << (bits - 1))
    signed = v.astype(np.int64)
    return np.where(v >= half, signed - (1 << bits), signed)


def decode(total: np.ndarray, p: SecAggParams) -> np.ndarray:
    """The weighted mean diff (flat float64) from the signed sum ``[sum w, sum w*q...]``."""
    weight = int(total[0])
    if weight <= 0:
        raise ProtocolError("the unmasked sum carries no weight")
    return total[1:].astype(np.float64) / (weight * p.scale)
