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

#: values per pass of :func:`encode`: a chunk's float64 scratch (256 KiB) stays in the
#: core's cache, and no model-sized temporary is made besides the output
CHUNK = 1 << 15


def weight_of(num_samples: int | None, p: SecAggParams) -> int:
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ProtocolError(f"num_samples must be a positive integer; got {num_samples!r}")
    return min(num_samples, p.max_num_samples)


def check_finite(diff: Sequence[np.ndarray]) -> None:
    """Refuse a diff with NaN or infinite values (a diverged training): the node cannot
    see a masked input to refuse it, as it refuses such a plain report, and NaN has no
    integer to quantize to. Integer and boolean tensors pass.

    >>> try:
    ...     check_finite([np.zeros(2), np.array([0.5, np.nan])])
    ... except ProtocolError as e:
    ...     print(str(e).split(":")[0])
    diff tensor 1 has NaN or infinite values
    """
    for i, a in enumerate(diff):
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise _not_finite(i)


def _not_finite(i: int) -> ProtocolError:
    return ProtocolError(
        f"diff tensor {i} has NaN or infinite values: an honest worker does not "
        "mask it; check the training (nothing was sent)"
    )


def encode(diff: Sequence[np.ndarray], num_samples: int | None, p: SecAggParams, rng=None):
    """A diff (list of arrays) as the worker's unmasked input vector: ``[w, w * q(x)...]``
    mod 2**b as uint64 (two's complement for negatives). A diff with NaN or infinite
    values is refused as :func:`check_finite` refuses it, checked chunk by chunk while
    the chunk is in cache."""
    rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    weight = weight_of(num_samples, p)
    flats = [np.ravel(a) for a in diff]
    out = np.empty(1 + sum(f.size for f in flats), np.uint64)
    out[0] = weight
    body = out[1:].view(np.int64)  # two's complement: the same bits, read mod 2**64
    scaled = np.empty(min(CHUNK, body.size), np.float64)
    low, draws = np.empty_like(scaled), np.empty_like(scaled)
    at = 0
    for i, flat in enumerate(flats):
        for start in range(0, flat.size, CHUNK):
            part = flat[start : start + CHUNK]
            x, floor, u = scaled[: part.size], low[: part.size], draws[: part.size]
            # clipped and scaled; its floor, then the fractional part, rounded up with
            # that probability (the uniform draws in order, as one call would make them)
            x[...] = part  # clipped in float64, whatever the diff's dtype
            if not np.isfinite(x).all():  # NaN has no integer to round to
                raise _not_finite(i)
            np.clip(x, -p.clipping_range, p.clipping_range, out=x)
            x *= p.scale
            np.floor(x, out=floor)
            x -= floor
            q = body[at : at + part.size]
            q[...] = floor
            q += rng.random(out=u) < x
            q *= weight
            at += part.size
    if p.field_bits < 64:
        out &= np.uint64((1 << p.field_bits) - 1)
    return out


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
