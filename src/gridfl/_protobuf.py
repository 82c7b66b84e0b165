"""
A small protobuf wire-format reader and writer (private to :mod:`gridfl.state`).

Structure (tags, lengths, a few ids and strings) is parsed in pure Python: a ``State``
holds only a handful of tensors. Bulk numeric payloads never go through Python
objects: fixed-width payloads are handed to ``numpy.frombuffer`` by the caller, and
packed varint payloads are encoded and decoded here with vectorised numpy code (a
bounded number of whole-array passes, no per-element Python loop).

Every reader function checks bounds before it reads and raises :class:`StateError`
with the byte offset of the problem: a declared length larger than what is left, a
varint longer than 10 bytes, a varint above 64 bits, an invalid wire type or field
number, or groups nested deeper than :data:`MAX_GROUP_DEPTH`.

Work is bounded too: every tag the reader visits (fields it yields, and fields inside
groups it skips) is paid from a :class:`FieldBudget`, so a caller that gives one a limit
does at most that many Python-level iterations however many bytes it is handed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import NoReturn

import numpy as np

from gridfl._exceptions import StateError

# Wire types.
VARINT = 0
I64 = 1
LEN = 2
SGROUP = 3
EGROUP = 4
I32 = 5

WIRE_TYPE_NAMES = {
    VARINT: "varint",
    I64: "fixed64",
    LEN: "length-delimited",
    SGROUP: "start-group",
    EGROUP: "end-group",
    I32: "fixed32",
}

#: Deepest nesting of (deprecated) groups we skip before calling the input hostile.
MAX_GROUP_DEPTH = 64

_U64 = (1 << 64) - 1

Buffer = bytes | bytearray | memoryview


class FieldBudget:
    """How many more fields a parse may visit; :class:`StateError` when it runs out.

    One budget is shared by every :func:`iter_fields` call of a parse, so the Python-level
    work of the whole parse is at most ``limit`` field visits (each O(1): a varint of at
    most 10 bytes, a bounds check). ``why`` explains the limit in the error message.

        >>> budget = FieldBudget(1, "the example's limit")
        >>> list(iter_fields(b"\\x08\\x01\\x08\\x02", 0, 4, budget))
        Traceback (most recent call last):
        ...
        gridfl._exceptions.StateError: more than 1 fields (the example's limit) at byte 2
    """

    __slots__ = ("left", "limit", "why")

    def __init__(self, limit: int, why: str = "") -> None:
        self.limit = limit
        self.left = limit
        self.why = why

    def exhausted(self, at: int) -> NoReturn:
        why = f" ({self.why})" if self.why else ""
        raise StateError(f"more than {self.limit:,} fields{why} at byte {at}")


# --------------------------------------------------------------------------- reading


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Read one varint at ``pos``; return ``(value, next_pos)``. Never reads past ``end``."""
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise StateError(f"truncated varint at byte {start}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise StateError(f"varint longer than 10 bytes at byte {start}")
    if result > _U64:
        raise StateError(f"varint at byte {start} does not fit in 64 bits")
    return result, pos


def _skip_group(buf: Buffer, pos: int, end: int, field: int, at: int, budget: FieldBudget) -> int:
    """Skip a group whose start tag (``field``) was at byte ``at``; return the position after it."""
    stack = [field]
    while pos < end:
        tag_pos = pos
        f, wt, pos = _read_tag(buf, pos, end, budget)
        if wt == VARINT:
            _, pos = read_varint(buf, pos, end)
        elif wt == I64:
            pos = _advance(pos, 8, end, f, tag_pos)
        elif wt == I32:
            pos = _advance(pos, 4, end, f, tag_pos)
        elif wt == LEN:
            n, pos = read_varint(buf, pos, end)
            pos = _advance(pos, n, end, f, tag_pos)
        elif wt == SGROUP:
            if len(stack) >= MAX_GROUP_DEPTH:
                raise StateError(
                    f"groups nested deeper than {MAX_GROUP_DEPTH} levels at byte {tag_pos}"
                )
            stack.append(f)
        elif wt == EGROUP:
            if stack.pop() != f:
                raise StateError(f"end-group tag for field {f} at byte {tag_pos} does not match")
            if not stack:
                return pos
        else:
            raise StateError(f"invalid wire type {wt} (field {f}) at byte {tag_pos}")
    raise StateError(f"group for field {field} starting at byte {at} is not closed")


def _read_tag(buf: Buffer, pos: int, end: int, budget: FieldBudget) -> tuple[int, int, int]:
    """Pay one field from ``budget`` and read its tag at ``pos``: ``(field, wire type,
    position after the tag)``."""
    budget.left -= 1
    if budget.left < 0:
        budget.exhausted(pos)
    key, after = read_varint(buf, pos, end)
    if key >> 3 == 0:
        raise StateError(f"invalid field number 0 at byte {pos}")
    return key >> 3, key & 7, after


def _advance(pos: int, n: int, end: int, field: int, tag_pos: int) -> int:
    if n > end - pos:
        raise StateError(
            f"field {field} at byte {tag_pos} declares {n} bytes but only {end - pos} remain"
        )
    return pos + n


def iter_fields(
    buf: Buffer, pos: int, end: int, budget: FieldBudget | None = None
) -> Iterator[tuple[int, int, int, int, int]]:
    """Iterate over the fields of the message in ``buf[pos:end]``.

    Yields ``(field, wire_type, start, stop, value)``:

    * varint: ``buf[start:stop]`` are the varint's own bytes, ``value`` its value;
    * fixed32/fixed64/length-delimited: ``buf[start:stop]`` is the payload, ``value`` is
      the offset of the field's tag (for error messages).

    Groups are skipped (no field in syft-proto uses them). Offsets are absolute in ``buf``.
    Every field visited, skipped groups' fields included, is paid from ``budget`` (no
    limit without one).
    """
    if budget is None:
        budget = FieldBudget(sys.maxsize)
    while pos < end:
        tag_pos = pos
        field, wt, pos = _read_tag(buf, pos, end, budget)
        if wt == VARINT:
            start = pos
            value, pos = read_varint(buf, pos, end)
            yield field, wt, start, pos, value
        elif wt == LEN:
            n, start = read_varint(buf, pos, end)
            pos = _advance(start, n, end, field, tag_pos)
            yield field, wt, start, pos, tag_pos
        elif wt == I32:
            start = pos
            pos = _advance(pos, 4, end, field, tag_pos)
            yield field, wt, start, pos, tag_pos
        elif wt == I64:
            start = pos
            pos = _advance(pos, 8, end, field, tag_pos)
            yield field, wt, start, pos, tag_pos
        elif wt == SGROUP:
            pos = _skip_group(buf, pos, end, field, tag_pos, budget)
        elif wt == EGROUP:
            raise StateError(f"unexpected end-group tag (field {field}) at byte {tag_pos}")
        else:
            raise StateError(f"invalid wire type {wt} (field {field}) at byte {tag_pos}")


def decode_packed_varints(data: np.ndarray, what: str, at: int) -> np.ndarray:
    """Decode a packed run of varints (``uint8`` array) into ``uint64`` values, vectorised.

    ``what`` and ``at`` (the payload's byte offset) only feed error messages.
    """
    n = data.size
    if n == 0:
        return np.zeros(0, np.uint64)
    last = data < 0x80
    if last.all():  # every value < 128: one byte each (bool, small uint8 ...)
        return data.astype(np.uint64)
    if not last[-1]:
        raise StateError(f"{what}: packed varints at byte {at} end in the middle of a varint")
    ends = np.flatnonzero(last)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > 10:
        bad = int(starts[np.argmax(lengths > 10)])
        raise StateError(f"{what}: varint longer than 10 bytes at byte {at + bad}")
    tenth = lengths == 10
    if tenth.any() and int(data[ends[tenth]].max()) > 1:
        bad = int(starts[np.argmax(tenth & (data[ends] > 1))])
        raise StateError(f"{what}: varint at byte {at + bad} does not fit in 64 bits")
    # Position of every byte inside its varint; OR (= sum, the bits never overlap) of the
    # 7-bit groups shifted into place.
    pos_in = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    payload = (data & 0x7F).astype(np.uint64) << (pos_in.astype(np.uint64) * np.uint64(7))
    return np.add.reduceat(payload, starts)


# --------------------------------------------------------------------------- writing


def varint(n: int) -> bytes:
    """Encode a non-negative int (< 2**64) as a varint. Negative ints: pass ``n & (2**64-1)``."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def len_field(field: int, payload: bytes) -> bytes:
    return key(field, LEN) + varint(len(payload)) + payload


def varint_field(field: int, value: int) -> bytes:
    return key(field, VARINT) + varint(value & _U64)


def encode_packed_varints(values: np.ndarray) -> np.ndarray:
    """Encode integers (any int/bool dtype) as a packed varint run; returns a ``uint8`` array.

    Negative values are sign-extended to 64 bits (10 bytes each), as protobuf does for
    ``int32``/``int64``. Vectorised: at most 10 whole-array passes.
    """
    v = values.reshape(-1)
    if v.dtype.kind == "b":
        return v.view(np.uint8) if v.dtype.itemsize == 1 else v.astype(np.uint8)
    u = v.astype(np.uint64) if v.dtype.kind == "u" else v.astype(np.int64).view(np.uint64)
    if u.size == 0:
        return np.zeros(0, np.uint8)
    if int(u.max()) < 0x80:
        return u.astype(np.uint8)
    nbytes = np.ones(u.size, np.int64)
    for k in range(1, 10):
        nbytes += u >= np.uint64(1 << (7 * k))
    offsets = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), np.uint8)
    for k in range(10):
        sel = np.flatnonzero(nbytes > k)
        if sel.size == 0:
            break
        group = ((u[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        group[nbytes[sel] > k + 1] |= 0x80
        out[offsets[sel] + k] = group
    return out
