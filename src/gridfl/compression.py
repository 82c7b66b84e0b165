"""Compressed model diffs (gridfl extension of the binary report frame).

A process opts in with ``server_config.compression``; the node names the setting in its
accepted cycle-request reply, and a gridfl worker whose socket negotiated
``gridfl.binary.2`` then sends its diff compressed (syft.js and HTTP keep plain State).
The three encodings of a diff over the model's tensors, all little-endian:

* ``float16``: every value as float16, tensor after tensor (``2 x total`` bytes);
* ``int8``: one float32 scale per tensor, then every value as int8 (``4 x tensors +
  total`` bytes); a value is ``q x scale`` with ``scale = max|x| / 127``;
* ``topk``: ``count`` (uint32), ``count`` flat indices into the concatenated tensors
  (uint32, strictly increasing), ``count`` float32 values; every other value is 0. The
  worker keeps what it did not send (error feedback) and adds it to its next diff.

:func:`decode` validates a payload against the model and returns a :class:`CompressedDiff`
that folds into a running sum without a dense float64 copy.

    >>> import numpy as np
    >>> shapes, dtypes = [(2,), (3,)], [np.dtype(np.float32)] * 2
    >>> payload = encode("int8", [np.array([1, -2], np.float32), np.zeros(3, np.float32)])
    >>> [round(float(v), 4) for v in decode("int8", payload, shapes, dtypes)[0]]  # 64, -127
    [1.0079, -2.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gridfl._exceptions import ConfigError, InvalidRequestError, ModelError

#: the encodings, as ``server_config.compression.kind`` and the report's ``compression``
KINDS = ("float16", "int8", "topk")
#: top-k's default fraction of values sent
DEFAULT_FRACTION = 0.1
#: largest magnitude of a decoded diff value (the node's bound on every diff value)
MAX_VALUE = 1e12

_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")
_U32 = np.dtype("<u4")
_I8 = np.dtype("i1")


def validate_config(value: Any) -> dict[str, Any] | None:
    """``server_config.compression``: null (off), ``{"kind": "float16"}``, ``{"kind":
    "int8"}`` or ``{"kind": "topk", "fraction": f}`` with ``0 < f <= 1`` (default 0.1).

    >>> validate_config({"kind": "topk"})
    {'kind': 'topk', 'fraction': 0.1}
    """
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("kind") not in KINDS:
        raise ConfigError(
            "server_config.compression must be null or an object "
            '{"kind": "float16" | "int8" | "topk", "fraction"?: number}, got '
            f"{value!r:.100}"
        )
    kind = value["kind"]
    allowed = {"kind", "fraction"} if kind == "topk" else {"kind"}
    extra = set(value) - allowed
    if extra:
        raise ConfigError(
            f"server_config.compression: unknown keys {sorted(extra)} for kind {kind!r}; "
            f"known: {sorted(allowed)}"
        )
    if kind != "topk":
        return {"kind": kind}
    fraction = value.get("fraction", DEFAULT_FRACTION)
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ConfigError(
            f"server_config.compression.fraction must be a number in (0, 1], got {fraction!r}"
        )
    return {"kind": kind, "fraction": float(fraction)}


def topk_count(fraction: float, total: int) -> int:
    """How many values top-k sends of ``total``: ``ceil(fraction x total)``, at least 1."""
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))


def _sizes(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(s) for s in shapes]


# --- the worker's side ----------------------------------------------------------------------
def encode(kind: str, arrays: Sequence[np.ndarray], fraction: float = DEFAULT_FRACTION) -> bytes:
    """The payload of ``arrays`` (a diff, one array per model tensor) in encoding ``kind``.

    For ``topk`` use :class:`ErrorFeedback`, which also keeps what was left out.

        >>> len(encode("float16", [np.zeros(4, np.float32)]))
        8
    """
    flats = [np.asarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32).ravel()
             for a in arrays]
    if kind == "float16":
        for i, f in enumerate(flats):
            if f.size and float(np.abs(f).max()) > float(np.finfo(np.float16).max):
                raise ModelError(
                    f"diff tensor {i} has values beyond float16's range (±65504): "
                    "compress it with int8 or topk instead"
                )
        return b"".join(f.astype(_F16).tobytes() for f in flats)
    if kind == "int8":
        scales = np.array([_int8_scale(f) for f in flats], dtype=_F32)
        parts = [scales.tobytes()]
        for f, s in zip(flats, scales, strict=True):
            parts.append(_quantize(f, float(s)).tobytes())
        return b"".join(parts)
    if kind == "topk":
        flat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
        idx = top_indices(flat, topk_count(fraction, flat.size))
        return encode_topk(idx, flat[idx])
    raise InvalidRequestError(f"unknown compression {kind!r}; known: {', '.join(KINDS)}")


def _int8_scale(flat: np.ndarray) -> float:
    peak = float(np.abs(flat).max()) if flat.size else 0.0
    return peak / 127.0


def _quantize(flat: np.ndarray, scale: float) -> np.ndarray:
    if scale == 0.0 or not math.isfinite(scale):
        return np.zeros(flat.size, _I8)
    return np.clip(np.rint(flat / np.float32(scale)), -127, 127).astype(_I8)


def top_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` indices of ``flat``'s largest magnitudes, increasing (uint32)."""
    if k >= flat.size:
        return np.arange(flat.size, dtype=_U32)
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    idx.sort()
    return idx.astype(_U32)


def encode_topk(indices: np.ndarray, values: np.ndarray) -> bytes:
    """The ``topk`` payload: count, increasing uint32 indices, float32 values."""
    count = np.array([indices.size], dtype=_U32)
    return b"".join(
        (count.tobytes(), indices.astype(_U32).tobytes(), values.astype(_F32).tobytes())
    )


class ErrorFeedback:
    """A worker's top-k residual for one process: what earlier reports left out, added to
    the next diff before choosing its largest values (Stich et al., *Sparsified SGD with
    memory*, 2018). :meth:`compress` does not change the residual; :meth:`commit` keeps
    the new one once the report was accepted.

        >>> ef = ErrorFeedback(0.5)
        >>> payload, residual = ef.compress([np.array([3, 1, -2, 0], np.float32)])
        >>> ef.commit(residual)
        >>> ef.residual.tolist()
        [0.0, 1.0, 0.0, 0.0]
    """

    def __init__(self, fraction: float = DEFAULT_FRACTION) -> None:
        self.fraction = fraction
        self.residual: np.ndarray | None = None

    def compress(self, arrays: Sequence[np.ndarray]) -> tuple[bytes, np.ndarray]:
        """``(payload, new residual)`` of ``arrays`` plus the residual carried so far."""
        flat = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])
        if self.residual is not None and self.residual.size == flat.size:
            flat += self.residual
        idx = top_indices(flat, topk_count(self.fraction, flat.size))
        payload = encode_topk(idx, flat[idx])
        flat[idx] = 0.0  # what is left for later
        return payload, flat

    def commit(self, residual: np.ndarray) -> None:
        self.residual = residual


# --- the node's side ------------------------------------------------------------------------
_F16_TO_F32_EXPONENT = np.float32(2.0**112)  # 2**(127 - 15): float32's bias minus float16's
_F16_SIGN_AND_BODY = np.uint32(0x8FFFFFFF)  # the sign, exponent and mantissa once shifted


def widen_float16(
    values: np.ndarray, scale: float = 1.0, out: np.ndarray | None = None
) -> np.ndarray:
    """Finite float16 ``values`` times ``scale`` as float32 (exact for scale 1), written
    into ``out`` (a uint32 buffer of the same size, viewed as float32) or a new array: the
    bits moved into float32's places, then multiplied by 2**112 (which also makes
    subnormals normal). ~4x faster than ``astype(np.float32)``, which numpy does element by
    element.

        >>> widen_float16(np.array([1.5, -6e-08, 65504, -0.0], np.float16)).tolist()
        [1.5, -5.960464477539063e-08, 65504.0, -0.0]
    """
    x = np.empty(values.size, np.uint32) if out is None else out
    # sign-extended to 32 bits: after the shift the sign is on bit 31, and bits 28-30,
    # also set for a negative value, are cleared by the mask
    np.copyto(x.view(np.int32), values.view(np.int16))
    np.left_shift(x, 13, out=x)  # exponent and mantissa into float32's places
    np.bitwise_and(x, _F16_SIGN_AND_BODY, out=x)
    result = x.view(np.float32)
    factor = float(_F16_TO_F32_EXPONENT) * scale
    if factor < 1e38:  # one multiply for both, while the factor fits float32
        result *= np.float32(factor)
    else:
        result *= _F16_TO_F32_EXPONENT
        result *= np.float32(scale)
    return result


#: values widened at a time when folding float16: the buffers stay in the CPU's cache
_CHUNK = 1 << 15


class CompressedDiff(Sequence[np.ndarray]):
    """A validated compressed diff: :meth:`fold_into` adds it (times a weight) to a flat
    running sum directly from its compressed form; indexing gives a tensor dequantized in
    the model's dtype, for rules that need dense tensors."""

    def __init__(self, kind: str, shapes, dtypes, parts: tuple[np.ndarray, ...]) -> None:
        self.kind = kind
        self.shapes = [tuple(s) for s in shapes]
        self.dtypes = [np.dtype(d) for d in dtypes]
        self.sizes = _sizes(self.shapes)
        self.offsets = [0, *np.cumsum(self.sizes)[:-1].tolist()]
        self.parts = parts

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        off, size = self.offsets[i], self.sizes[i]
        if self.kind == "float16":
            dense = widen_float16(self.parts[0][off : off + size]).astype(self.dtypes[i])
        elif self.kind == "int8":
            scales, q = self.parts
            dense = (q[off : off + size] * scales[i]).astype(self.dtypes[i])
        else:
            idx, values = self.parts
            dense = np.zeros(size, self.dtypes[i])
            lo, hi = np.searchsorted(idx, [off, off + size])
            dense[idx[lo:hi] - off] = values[lo:hi]
        return dense.reshape(self.shapes[i])

    def fold_into(self, total: np.ndarray, weight: float | None = None) -> None:
        """``total += weight x diff`` in place (``total`` flat, float32 or float64)."""
        acc = total.dtype.type
        if self.kind == "topk":
            idx, values = self.parts
            total[idx] += values if weight is None else values * acc(weight)
            return
        for i, (off, size) in enumerate(zip(self.offsets, self.sizes, strict=True)):
            view = total[off : off + size]
            if self.kind == "float16":
                values = self.parts[0][off : off + size]
                buf = np.empty(min(_CHUNK, size), np.uint32)
                for at in range(0, size, _CHUNK):
                    chunk = values[at : at + _CHUNK]
                    part = widen_float16(chunk, weight or 1.0, out=buf[: chunk.size])
                    piece = view[at : at + _CHUNK]
                    np.add(piece, part, out=piece, casting="unsafe")
            else:
                scales, q = self.parts
                factor = float(scales[i]) * (1.0 if weight is None else weight)
                view += q[off : off + size] * acc(factor)


def decode(
    kind: Any,
    payload: bytes | memoryview,
    shapes: Sequence[Sequence[int]],
    dtypes: Sequence[np.dtype],
    *,
    fraction: float | None = None,
) -> CompressedDiff:
    """Validate a compressed diff for a model of ``shapes``/``dtypes`` (all float); raise
    :class:`~gridfl.InvalidRequestError` naming what is wrong. ``fraction`` (top-k)
    bounds how many values it may carry."""
    sizes = _sizes(shapes)
    total = sum(sizes)
    buf = memoryview(payload)
    if kind == "float16":
        _expect_bytes(kind, len(buf), 2 * total, f"2 bytes x {total} values")
        values = np.frombuffer(buf, _F16)
        # non-finite float16 = exponent bits all ones; on the bits, as numpy's float16
        # min/max are slow. Every finite float16 is within the bound (±65504).
        if values.size and int((values.view(np.uint16) & 0x7FFF).max()) >= 0x7C00:
            raise InvalidRequestError(f"{kind} diff has NaN or infinite values")
        return CompressedDiff(kind, shapes, dtypes, (values,))
    if kind == "int8":
        n = len(sizes)
        _expect_bytes(kind, len(buf), 4 * n + total, f"{n} float32 scales + {total} int8 values")
        scales = np.frombuffer(buf[: 4 * n], _F32)
        q = np.frombuffer(buf[4 * n :], _I8)
        for i, (off, size) in enumerate(zip([0, *np.cumsum(sizes)[:-1]], sizes, strict=True)):
            scale = float(scales[i])
            part = q[off : off + size]
            peak = max(-int(part.min()), int(part.max())) if size else 0
            if not math.isfinite(scale) or scale < 0:
                raise InvalidRequestError(
                    f"int8 diff: tensor {i}'s scale is {scale!r}; it must be finite and >= 0"
                )
            if scale * peak > MAX_VALUE:
                raise InvalidRequestError(
                    f"int8 diff: tensor {i} dequantizes to {scale * peak:g}, beyond the "
                    f"diff bound ±{MAX_VALUE:g}"
                )
        return CompressedDiff(kind, shapes, dtypes, (scales, q))
    if kind == "topk":
        if len(buf) < 4:
            _expect_bytes(kind, len(buf), 4, "a uint32 count first")
        count = int(np.frombuffer(buf[:4], _U32)[0])
        limit = total if fraction is None else topk_count(fraction, total)
        if count > limit:
            raise InvalidRequestError(
                f"topk diff: {count} values, more than the {limit} this process takes "
                f"(fraction {fraction} of {total} values)"
            )
        _expect_bytes(kind, len(buf), 4 + 8 * count, f"count + {count} indices + values")
        idx = np.frombuffer(buf[4 : 4 + 4 * count], _U32)
        values = np.frombuffer(buf[4 + 4 * count :], _F32)
        if count > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise InvalidRequestError(
                "topk diff: indices must be strictly increasing (no duplicates)"
            )
        if count and int(idx[-1]) >= total:
            raise InvalidRequestError(
                f"topk diff: index {int(idx[-1])} is out of range (the model has "
                f"{total} values)"
            )
        _check_values(kind, values)
        return CompressedDiff(kind, shapes, dtypes, (idx, values))
    raise InvalidRequestError(f"unknown compression {kind!r}; known: {', '.join(KINDS)}")


def _expect_bytes(kind: str, got: int, want: int, layout: str) -> None:
    if got != want:
        raise InvalidRequestError(
            f"{kind} diff is {got} bytes; this model's is {want} ({layout})"
        )


def _check_values(kind: str, values: np.ndarray) -> None:
    if not values.size:
        return
    lo, hi = float(values.min()), float(values.max())  # NaN fails both comparisons
    if not (lo >= -MAX_VALUE and hi <= MAX_VALUE):
        if not np.isfinite(values).all():
            raise InvalidRequestError(f"{kind} diff has NaN or infinite values")
        raise InvalidRequestError(
            f"{kind} diff has values beyond ±{MAX_VALUE:g} (from {lo:g} to {hi:g})"
        )
