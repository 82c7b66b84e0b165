"""
The syft-proto ``State`` codec: lists of numpy arrays <-> the bytes PySyft, PyGrid and
syft.js exchange for model parameters and diffs.

    >>> import numpy as np
    >>> from gridfl.state import dumps, loads
    >>> data = dumps([np.ones((2, 3), np.float32), np.arange(3)])
    >>> [a.shape for a in loads(data)]
    [(2, 3), (3,)]

Wire format (syft-proto, field numbers in brackets)::

    State        placeholders[1]: Placeholder*, tensors[2]: StateTensor*
    StateTensor  oneof torch_tensor[1]: TorchTensor | torch_param[2]: Parameter
    Parameter    id[1], tensor[2]: TorchTensor, requires_grad[3], grad[4]
    TorchTensor  id[1]: Id, contents_data[2]: TensorData | contents_bin[3], chain[4],
                 grad_chain[5], tags[6], description[7], serializer[8] (SERIALIZER_ALL = 4)
    TensorData   shape[1]: Size{dims[1]: int32*}, dtype[2]: string, is_quantized[3], ...,
                 contents_uint8[16] int8[17] int16[18] int32[19] int64[20] (varints),
                 contents_float16[21] float32[22] (fixed32), float64[23] (fixed64), bool[24]
    Placeholder  id[3]: Id, tags[4], description[5], expected_shape[6]: Shape{dims[1]}
    Id           id_int[1]: int64 | id_str[2]: string

:func:`dumps` writes what syft.js writes for a diff: one ``Placeholder`` per tensor with
``id = i`` and tags ``["#<i>", "#state-<i>"]`` (plus ``expected_shape``, as PySyft
does), and a ``TorchTensor`` with ``id = i``, ``serializer = SERIALIZER_ALL`` and
``contents_data`` holding the shape, the dtype name and the packed contents. The output
is byte-identical to what the ``protobuf`` library serializes for the same message.

:func:`loads` reads any ``State`` whose tensors use ``SERIALIZER_ALL``: plain or
``torch_param`` (``nn.Parameter``) wrapped tensors, with or without placeholders,
packed or unpacked contents, unknown fields skipped by wire type. Anything else raises
:class:`gridfl.StateError` saying what is wrong, where (byte offset) and in which tensor.
Tensors come back in ``State.tensors`` order (placeholders are not used for ordering:
PyGrid only relies on order).

Parse cost is bounded by the structure, not the bytes. The structure (tags, lengths,
shapes) is read in pure Python, so a hostile ``State`` made of millions of tiny fields
(empty tensors, placeholders, tags, unknown fields at any level, groups, unpacked
elements) could cost seconds of CPU for a few megabytes. :func:`loads` therefore pays
every field it visits from one budget and refuses the input when the budget or a count
runs out, before building anything:

* with ``expect`` (the tensors the caller wants, as a grid node knows its model): at most
  ``len(expect)`` tensors and placeholders, each tensor's dtype and shape must match
  (checked before its contents are decoded or copied), and at most
  ``FIELDS_BASE + FIELDS_PER_TENSOR * len(expect)`` fields in all. A hostile input is
  then refused after O(``len(expect)``) Python work whatever its size, and bulk contents
  stay numpy work, linear in the bytes;
* without ``expect``: at most :data:`MAX_TENSORS` tensors and placeholders and
  ``FIELDS_BASE + FIELDS_PER_TENSOR * MAX_TENSORS`` fields (generous caps: a fraction
  of a second of parsing at worst).

A ``State`` written by :func:`dumps`, PySyft or syft.js uses 12-14 fields per tensor.
Contents written unpacked (one field per element, which proto3 writers do not do) count
one field per element, so only small unpacked tensors fit the budget.

Supported dtypes: float32, float64, float16 (float32 on the wire, as PySyft does),
int64, int32, int16, int8, uint8 and bool. bfloat16, quantized and complex tensors are
refused.

Why not the ``protobuf`` library? Its repeated numeric fields are Python sequences:
getting 1.6 M float32 parameters out of ``contents_float32`` materialises 1.6 M Python
floats (``np.array(msg.contents_float32)``), and writing them needs ``arr.tolist()``;
that is 10-100x slower than copying the bytes. Here packed fixed-width contents go
straight between the wire bytes and numpy buffers (``np.frombuffer`` on a slice of the
input; ``b"".join`` of the headers and the array's own buffer on output), and packed
varints are converted with vectorised numpy. The structure around them is a few dozen
bytes per tensor, parsed by the small pure-Python reader in :mod:`gridfl._protobuf`.
It also keeps ``protobuf`` off the workers' dependency list.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gridfl import _protobuf as pw
from gridfl._exceptions import StateError

__all__ = [
    "FIELDS_BASE",
    "FIELDS_PER_TENSOR",
    "MAX_TENSORS",
    "SERIALIZER_ALL",
    "SUPPORTED_DTYPES",
    "dumps",
    "loads",
]

SERIALIZER_ALL = 4
_SERIALIZER_NAMES = {
    0: "SERIALIZER_UNSPECIFIED",
    1: "SERIALIZER_TORCH",
    2: "SERIALIZER_NUMPY",
    3: "SERIALIZER_TF",
    4: "SERIALIZER_ALL",
}

#: numpy arrays cannot have more dimensions than this on every supported numpy.
MAX_NDIM = 32
#: Tensors (and placeholders) :func:`loads` reads without ``expect``; models have hundreds.
MAX_TENSORS = 10_000
#: Fields :func:`loads` may visit per tensor: 12-14 in a State from dumps, PySyft or
#: syft.js, so room for tags, descriptions and unknown fields, but a bound.
FIELDS_PER_TENSOR = 24
#: Fields :func:`loads` may visit besides the per-tensor allowance (unknown top-level fields).
FIELDS_BASE = 16
#: Bytes of a dtype name kept for matching and messages (the longest supported is 7).
_DTYPE_KEEP = 64
_MAX_BYTES = (1 << 62) - 1


@dataclass(frozen=True)
class _Kind:
    name: str  # dtype string on the wire
    field: int  # TensorData contents_<name> field number
    wire: str  # "f32", "f64" (fixed width) or "varint"
    np_dtype: np.dtype  # dtype of the arrays loads() returns


_KINDS = [
    _Kind("float32", 22, "f32", np.dtype(np.float32)),
    _Kind("float64", 23, "f64", np.dtype(np.float64)),
    _Kind("float16", 21, "f32", np.dtype(np.float16)),
    _Kind("int64", 20, "varint", np.dtype(np.int64)),
    _Kind("int32", 19, "varint", np.dtype(np.int32)),
    _Kind("int16", 18, "varint", np.dtype(np.int16)),
    _Kind("int8", 17, "varint", np.dtype(np.int8)),
    _Kind("uint8", 16, "varint", np.dtype(np.uint8)),
    _Kind("bool", 24, "varint", np.dtype(np.bool_)),
]
_BY_NAME = {k.name: k for k in _KINDS}
# Other spellings of the same dtypes (torch short names) accepted on read.
_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}
_BY_NP = {k.np_dtype: k for k in _KINDS}
_CONTENTS_FIELDS = {k.field for k in _KINDS} | {25, 26, 27, 28}  # + qint8/quint8/qint32/bf16
_CONTENTS_NAMES = {k.field: f"contents_{k.name}" for k in _KINDS} | {
    25: "contents_qint8",
    26: "contents_quint8",
    27: "contents_qint32",
    28: "contents_bfloat16",
}

#: dtype names :func:`dumps` and :func:`loads` support.
SUPPORTED_DTYPES: tuple[str, ...] = tuple(k.name for k in _KINDS)


# =========================================================================== dumps


def dumps(arrays: Sequence[np.ndarray]) -> bytes:
    """Serialize arrays to syft-proto ``State`` bytes (SERIALIZER_ALL, packed contents).

    Arrays are written row-major in the given order. Array-likes (anything
    ``numpy.asarray`` accepts) are converted first. Raises :class:`gridfl.StateError`
    for a dtype syft-proto cannot carry (see :data:`SUPPORTED_DTYPES`).

        >>> import numpy as np
        >>> b = dumps([np.zeros(3, np.float32)])
        >>> loads(b)[0]
        array([0., 0., 0.], dtype=float32)
    """
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise TypeError(
            f"dumps() takes a sequence of arrays, got {type(arrays).__name__}; "
            "wrap a single array in a list"
        )
    return _encode(arrays, range(len(arrays)))


def _encode(arrays: Sequence[np.ndarray], ids: Iterable[int]) -> bytes:
    """:func:`dumps` with the given tensor ids (gridfl's are 0, 1, ...; PySyft's random)."""
    placeholders: list[bytes] = []
    tensors: list[bytes | memoryview] = []
    for i, (a, tensor_id) in enumerate(zip(arrays, ids, strict=True)):
        arr = np.asarray(a)
        dt = arr.dtype
        kind = _BY_NP.get(dt if dt.isnative else dt.newbyteorder("="))
        if kind is None:
            raise StateError(
                f"tensor {i}: dtype {arr.dtype} cannot be written to a syft-proto State "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        payload = _payload(arr, kind)
        placeholder, head, tail = _framing(tensor_id, arr.shape, kind, _nbytes(payload))
        placeholders.append(placeholder)
        tensors += (head, payload, tail) if payload else (head, tail)
    # One copy of every payload, straight from the array buffers into the result.
    return b"".join([*placeholders, *tensors])


def _framing(i: int, shape: tuple[int, ...], kind: _Kind, size: int) -> tuple[bytes, ...]:
    """The bytes :func:`dumps` writes around tensor ``i``'s ``size``-byte payload: its
    placeholder, then the tensor's head and tail (all placeholders come first)."""
    dims = b"".join(pw.varint(d) for d in shape)
    # Placeholder{id=Id{id_int=i}, tags=["#i", "#state-i"], expected_shape=Shape{dims}}
    ph = (
        pw.len_field(3, pw.varint_field(1, i))
        + pw.len_field(4, f"#{i}".encode())
        + pw.len_field(4, f"#state-{i}".encode())
        + pw.len_field(6, pw.len_field(1, dims) if dims else b"")
    )
    td_head = pw.len_field(1, pw.len_field(1, dims) if dims else b"") + pw.len_field(
        2, kind.name.encode()
    )
    if size:
        td_head += pw.key(kind.field, pw.LEN) + pw.varint(size)
    td_len = len(td_head) + size
    tt_head = pw.len_field(1, pw.varint_field(1, i)) + pw.key(2, pw.LEN) + pw.varint(td_len)
    tt_tail = pw.varint_field(8, SERIALIZER_ALL)
    tt_len = len(tt_head) + td_len + len(tt_tail)
    st_head = pw.key(1, pw.LEN) + pw.varint(tt_len)
    st_len = len(st_head) + tt_len
    head = pw.key(2, pw.LEN) + pw.varint(st_len) + st_head + tt_head + td_head
    return pw.len_field(1, ph), head, tt_tail


def _payload(arr: np.ndarray, kind: _Kind) -> memoryview:
    if arr.size == 0:
        return memoryview(b"")
    if kind.wire == "f32":
        flat = np.ascontiguousarray(arr, dtype="<f4")
    elif kind.wire == "f64":
        flat = np.ascontiguousarray(arr, dtype="<f8")
    else:
        flat = pw.encode_packed_varints(np.ascontiguousarray(arr))
    return flat.reshape(-1).data.cast("B")


def _nbytes(payload: memoryview) -> int:
    return payload.nbytes


# =========================================================================== loads


def loads(
    data: bytes | bytearray | memoryview,
    expect: Iterable[tuple[Sequence[int], npt.DTypeLike]] | None = None,
    *,
    views: bool = False,
) -> list[np.ndarray]:
    """Parse syft-proto ``State`` bytes into a list of numpy arrays.

    The arrays are fresh, writable, C-contiguous and native-endian. Raises
    :class:`gridfl.StateError` on malformed, truncated or unsupported input. With
    ``views=True`` float32 and float64 tensors whose bytes are aligned for their dtype may
    instead be read-only views of ``data`` (no copy; a grid node reads a report's diff
    once and drops it).

    ``expect``, a ``(shape, dtype)`` pair per tensor, says what the State must hold: the
    parse refuses the input as soon as it departs from it (one tensor too many, a dtype
    or shape that differs, fewer tensors at the end) and visits at most
    ``FIELDS_BASE + FIELDS_PER_TENSOR * len(expect)`` fields, so refusing hostile input
    costs no more than reading the real thing. Without it, the global caps
    :data:`MAX_TENSORS` and ``FIELDS_BASE + FIELDS_PER_TENSOR * MAX_TENSORS`` apply.

        >>> import numpy as np
        >>> loads(dumps([np.eye(2, dtype=np.float64)]))[0].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        >>> loads(dumps([np.eye(2)]), expect=[((2, 2), np.float64)])[0].shape
        (2, 2)
        >>> try:
        ...     loads(dumps([np.eye(2)]), expect=[((2, 3), np.float64)])
        ... except StateError as e:
        ...     print(e)
        State tensor 0 is float64[2, 2] (TensorData at byte 36); expected float64[2, 3]
    """
    try:
        buf = memoryview(data)
    except TypeError:
        raise TypeError(f"loads() takes bytes, got {type(data).__name__}") from None
    if buf.ndim != 1 or buf.itemsize != 1 or not buf.contiguous:
        buf = memoryview(buf.tobytes())
    buf = buf.cast("B") if buf.format != "B" else buf
    wants = None if expect is None else _wants(expect)
    out = None if wants is None else _as_written(buf, _Written.of(tuple(wants)))
    if out is not None:
        return _aligned(out) if views else [a.copy() for a in out]
    if wants is None:
        most, why = MAX_TENSORS, f"loads() reads at most {MAX_TENSORS:,} without expect"
    else:
        most, why = len(wants), f"expected {len(wants)}"
    budget = pw.FieldBudget(
        FIELDS_BASE + FIELDS_PER_TENSOR * most,
        f"the limit for a State of {most:,} tensors" if wants is not None else "loads() cap",
    )
    out = []
    placeholders = 0
    for fnum, wt, start, stop, info in pw.iter_fields(buf, 0, len(buf), budget):
        at = _tag_pos(wt, start, info)
        if fnum == 1:  # placeholders: only checked to be well-formed messages
            _expect_len("State.placeholders", wt, at)
            if placeholders == most:
                raise StateError(f"State has more than {most:,} placeholders (byte {at}); {why}")
            placeholders += 1
            for _ in pw.iter_fields(buf, start, stop, budget):
                pass
        elif fnum == 2:
            where = f"State tensor {len(out)}"
            _expect_len(where, wt, at)
            if len(out) == most:
                raise StateError(
                    f"State has more than {most:,} tensors ({where} at byte {at}); {why}"
                )
            want = None if wants is None else wants[len(out)]
            out.append(_read_state_tensor(buf, start, stop, where, budget, want))
    if wants is not None and len(out) != len(wants):
        raise StateError(f"State has {len(out)} tensors; expected {len(wants)}")
    if views:
        return _aligned(out)
    whole = np.frombuffer(buf, np.uint8)
    return [
        a.copy() if not a.flags.writeable or np.may_share_memory(a, whole) else a for a in out
    ]


@dataclass(frozen=True)
class _Written:
    """What :func:`dumps` writes for float tensors of given shapes: the bytes between the
    payloads (``runs``, each at its offset) and where each payload lies. Bytes that match
    these everywhere but in the payloads are parsed by their layout, without walking
    their fields: a gridfl worker's diff and the node's own checkpoints are such bytes.
    Only float32 and float64 tensors, whose payloads are their values' bytes."""

    size: int
    runs: tuple[tuple[int, bytes], ...]
    payloads: tuple[tuple[int, int, str, tuple[int, ...], np.dtype], ...]

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def of(wants: tuple[tuple[tuple[int, ...], _Kind], ...]) -> _Written | None:
        if not wants or any(kind.name not in ("float32", "float64") for _, kind in wants):
            return None
        framing = [
            _framing(i, shape, kind, math.prod(shape) * kind.np_dtype.itemsize)
            for i, (shape, kind) in enumerate(wants)
        ]
        runs, payloads = [], []
        at = 0
        pending = b"".join(placeholder for placeholder, _, _ in framing)
        for (shape, kind), (_, head, tail) in zip(wants, framing, strict=True):
            pending += head
            runs.append((at, pending))
            at += len(pending)
            count = math.prod(shape)
            wire = "<f4" if kind.name == "float32" else "<f8"
            payloads.append((at, count, wire, shape, kind.np_dtype))
            at += count * kind.np_dtype.itemsize
            pending = tail
        runs.append((at, pending))
        return _Written(at + len(pending), tuple(runs), tuple(payloads))


def _as_written(buf: memoryview, written: _Written | None) -> list[np.ndarray] | None:
    """The tensors of ``buf`` if it is byte for byte what :func:`dumps` writes for them
    (payloads aside, which any bytes are valid for), as :func:`loads` would parse them:
    views of ``buf``. ``None`` otherwise, and the fields are walked."""
    if written is None or len(buf) != written.size:
        return None
    for at, run in written.runs:
        if buf[at : at + len(run)] != run:
            return None
    return [
        np.frombuffer(buf, wire, count, at).astype(dtype, copy=False).reshape(shape)
        for at, count, wire, shape, dtype in written.payloads
    ]


def _aligned(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Views of the input as they are, but a misaligned one copied: numpy and BLAS read
    misaligned floats 2-5x slower than copying them costs (a payload starts wherever
    the protobuf framing before it ends)."""
    return [a if a.flags.aligned else a.copy() for a in arrays]


def _wants(
    expect: Iterable[tuple[Sequence[int], npt.DTypeLike]],
) -> list[tuple[tuple[int, ...], _Kind]]:
    """``expect`` as (shape, kind) pairs; a dtype State cannot carry is the caller's bug."""
    wants = []
    for shape, dtype in expect:
        dt = np.dtype(dtype)
        kind = _BY_NP.get(dt if dt.isnative else dt.newbyteorder("="))
        if kind is None:
            raise ValueError(f"expect: dtype {dt} cannot be in a State")
        wants.append((tuple(int(d) for d in shape), kind))
    return wants


def _expect_len(where: str, wt: int, at: int) -> None:
    if wt != pw.LEN:
        raise StateError(
            f"{where}: wire type {pw.WIRE_TYPE_NAMES.get(wt, wt)} at byte {at}, "
            "expected length-delimited (a message)"
        )


def _tag_pos(wt: int, start: int, info: int) -> int:
    # For varints iter_fields gives the value, not the tag offset; the value's start is close.
    return start if wt == pw.VARINT else info


def _read_state_tensor(
    buf: memoryview, start: int, stop: int, where: str, budget: pw.FieldBudget, want
) -> np.ndarray:
    # oneof tensor { TorchTensor torch_tensor = 1; Parameter torch_param = 2; }
    # Protobuf merge semantics: repeated occurrences of the same member merge, switching
    # member replaces.
    member = 0
    segments: list[tuple[int, int]] = []
    for fnum, wt, s, e, info in pw.iter_fields(buf, start, stop, budget):
        if fnum in (1, 2):
            name = "torch_tensor" if fnum == 1 else "torch_param"
            _expect_len(f"{where}: StateTensor.{name}", wt, _tag_pos(wt, s, info))
            if fnum != member:
                member, segments = fnum, []
            segments.append((s, e))
    if member == 0:
        raise StateError(f"{where}: StateTensor at byte {start} holds no tensor")
    if member == 2:  # Parameter { Id id = 1; TorchTensor tensor = 2; ... }
        inner: list[tuple[int, int]] = []
        for s0, e0 in segments:
            for fnum, wt, s, e, info in pw.iter_fields(buf, s0, e0, budget):
                if fnum == 2:
                    _expect_len(f"{where}: Parameter.tensor", wt, _tag_pos(wt, s, info))
                    inner.append((s, e))
        if not inner:
            raise StateError(f"{where}: Parameter at byte {segments[0][0]} has no tensor")
        segments = inner
    return _read_torch_tensor(buf, segments, where, budget, want)


@dataclass
class _TensorData:
    dims: list[int] = field(default_factory=list)
    has_shape: bool = False
    dtype_at: int = -1  # offsets of the (last) dtype name; -1: none
    dtype_end: int = -1
    quantized: bool = False
    # contents field number -> list of (wire type, start, stop) chunks, in order
    contents: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)


def _read_torch_tensor(
    buf: memoryview, segments: list[tuple[int, int]], where: str, budget: pw.FieldBudget, want
) -> np.ndarray:
    serializer = 0
    td_segments: list[tuple[int, int]] = []
    content_member = 0  # oneof contents { contents_data = 2; contents_bin = 3 }
    first = segments[0][0]
    for s0, e0 in segments:
        for fnum, wt, s, e, info in pw.iter_fields(buf, s0, e0, budget):
            at = _tag_pos(wt, s, info)
            if fnum == 2:
                _expect_len(f"{where}: TorchTensor.contents_data", wt, at)
                if content_member != 2:
                    content_member, td_segments = 2, []
                td_segments.append((s, e))
            elif fnum == 3:
                _expect_len(f"{where}: TorchTensor.contents_bin", wt, at)
                content_member, td_segments = 3, []
            elif fnum == 4:
                raise StateError(
                    f"{where}: TorchTensor at byte {first} has a chain (a wrapped tensor such "
                    "as a shared or pointer tensor); only plain tensors are supported"
                )
            elif fnum == 8:
                if wt != pw.VARINT:
                    raise StateError(
                        f"{where}: TorchTensor.serializer at byte {at} has wire type "
                        f"{pw.WIRE_TYPE_NAMES.get(wt, wt)}, expected varint"
                    )
                serializer = info
    if serializer not in (0, SERIALIZER_ALL) or content_member == 3:
        name = _SERIALIZER_NAMES.get(serializer, f"unknown serializer {serializer}")
        raise StateError(
            f"{where}: tensor serializer {name} ({serializer}) is not supported; "
            "gridfl reads SERIALIZER_ALL (4) tensors with contents_data"
        )
    if content_member != 2:
        raise StateError(f"{where}: TorchTensor at byte {first} has no contents_data")
    td = _TensorData()
    for s0, e0 in td_segments:
        _parse_tensor_data(buf, s0, e0, td, where, budget)
    return _build_array(buf, td, where, td_segments[0][0], want)


def _parse_tensor_data(
    buf: memoryview, start: int, stop: int, td: _TensorData, where: str, budget: pw.FieldBudget
):
    for fnum, wt, s, e, info in pw.iter_fields(buf, start, stop, budget):
        at = _tag_pos(wt, s, info)
        if fnum == 1:  # Size shape
            _expect_len(f"{where}: TensorData.shape", wt, at)
            td.has_shape = True
            if s == e:  # an empty Size (merged repeats of one add nothing)
                continue
            for f2, wt2, s2, e2, info2 in pw.iter_fields(buf, s, e, budget):
                if f2 != 1:
                    continue
                if wt2 == pw.VARINT:
                    _add_dim(td, info2, s2, where)
                elif wt2 == pw.LEN:
                    p = s2
                    while p < e2:
                        d, p2 = pw.read_varint(buf, p, e2)
                        _add_dim(td, d, p, where)
                        p = p2
                else:
                    raise StateError(
                        f"{where}: Size.dims at byte {info2} has wire type "
                        f"{pw.WIRE_TYPE_NAMES.get(wt2, wt2)}, expected varint"
                    )
        elif fnum == 2:
            _expect_len(f"{where}: TensorData.dtype", wt, at)
            td.dtype_at, td.dtype_end = s, e  # copied once, when the tensor is built
        elif fnum == 3:
            if wt != pw.VARINT:
                raise StateError(f"{where}: TensorData.is_quantized at byte {at} is not a varint")
            td.quantized = info != 0
        elif fnum in _CONTENTS_FIELDS:
            td.contents.setdefault(fnum, []).append((wt, s, e))


def _add_dim(td: _TensorData, value: int, at: int, where: str) -> None:
    if len(td.dims) >= MAX_NDIM:
        raise StateError(f"{where}: shape has more than {MAX_NDIM} dimensions (byte {at})")
    if value >= 1 << 63:
        value -= 1 << 64  # int32 on the wire: negative values are sign-extended varints
    if value < 0:
        raise StateError(f"{where}: negative dimension {value} in shape at byte {at}")
    if value >= 1 << 31:
        raise StateError(f"{where}: dimension {value} at byte {at} does not fit in int32")
    td.dims.append(value)


def _build_array(  # noqa: C901 - one check per way a tensor can be malformed
    buf: memoryview, td: _TensorData, where: str, at: int, want
) -> np.ndarray:
    if td.quantized:
        raise StateError(f"{where}: quantized tensors are not supported (TensorData at byte {at})")
    if td.dtype_at == td.dtype_end:
        raise StateError(f"{where}: TensorData at byte {at} has no dtype")
    try:
        # at most _DTYPE_KEEP bytes: no copy of a huge name
        raw_name = bytes(buf[td.dtype_at : min(td.dtype_end, td.dtype_at + _DTYPE_KEEP)])
        dname = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise StateError(
            f"{where}: dtype at byte {td.dtype_at} is not valid UTF-8: {raw_name[:40]!r}"
        ) from None
    kind = _BY_NAME.get(_ALIASES.get(dname, dname))
    if kind is None:
        raise StateError(
            f"{where}: unsupported dtype {dname[:40]!r} (byte {td.dtype_at}); "
            f"supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    shape = tuple(td.dims)
    if want is not None and (shape, kind) != want:
        raise StateError(
            f"{where} is {kind.name}{list(shape)} (TensorData at byte {at}); "
            f"expected {want[1].name}{list(want[0])}"
        )
    for fnum, chunks in td.contents.items():
        if fnum != kind.field and any(s != e or wt != pw.LEN for wt, s, e in chunks):
            raise StateError(
                f"{where}: dtype is {kind.name!r} but values are in "
                f"{_CONTENTS_NAMES[fnum]} (field {fnum}, byte {chunks[0][1]})"
            )
    count = math.prod(shape)
    # numpy refuses shapes whose non-zero dims overflow its index type, even when one dim is 0.
    if math.prod(d for d in shape if d) * kind.np_dtype.itemsize > _MAX_BYTES:
        raise StateError(f"{where}: shape {shape} is too large (element count overflows)")

    raw = _gather(buf, td.contents.get(kind.field, []), kind, where)
    if kind.wire == "varint":
        # Every element takes at least one byte: refuse an impossible shape before decoding.
        if count > len(raw):
            raise StateError(_mismatch(where, shape, count, f"at most {len(raw)}"))
        # ... and at most 10 bytes: refuse before decoding 8 bytes per input byte.
        if len(raw) > 10 * count:
            raise StateError(_mismatch(where, shape, count, f"at least {-(-len(raw) // 10)}"))
        values = pw.decode_packed_varints(np.frombuffer(raw, np.uint8), where, at)
        if values.size != count:
            raise StateError(_mismatch(where, shape, count, values.size))
        arr = _narrow(values, kind, where)
    else:
        width = 4 if kind.wire == "f32" else 8
        if len(raw) % width:
            raise StateError(
                f"{where}: {_CONTENTS_NAMES[kind.field]} has {len(raw)} bytes, "
                f"not a multiple of {width}"
            )
        n = len(raw) // width
        if n != count:
            raise StateError(_mismatch(where, shape, count, n))
        # a view when the wire type is the dtype: loads() copies it unless views=True
        wire = np.frombuffer(raw, "<f4" if width == 4 else "<f8")
        arr = wire.astype(kind.np_dtype, copy=False)
    try:
        return arr.reshape(shape)
    except ValueError as e:  # unreachable after the checks above; belt and braces
        raise StateError(f"{where}: cannot shape the contents as {shape}: {e}") from None


def _mismatch(where: str, shape: tuple[int, ...], count: int, got: object) -> str:
    return f"{where}: shape {shape} needs {count} elements but the contents hold {got}"


def _gather(buf: memoryview, chunks: list[tuple[int, int, int]], kind: _Kind, where: str):
    """The contents payload as one buffer: packed chunks and unpacked elements, in order."""
    ok_unpacked = {"f32": pw.I32, "f64": pw.I64, "varint": pw.VARINT}[kind.wire]
    for wt, s, _e in chunks:
        if wt not in (pw.LEN, ok_unpacked):
            raise StateError(
                f"{where}: {_CONTENTS_NAMES[kind.field]} element at byte {s} has wire type "
                f"{pw.WIRE_TYPE_NAMES.get(wt, wt)}"
            )
    if len(chunks) == 1:
        return buf[chunks[0][1] : chunks[0][2]]
    # Unpacked elements (or several packed runs): their payload bytes concatenated form
    # one valid packed run.
    return b"".join(buf[s:e] for _wt, s, e in chunks)


_RANGES = {
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int8": (-(1 << 7), (1 << 7) - 1),
}


def _narrow(values: np.ndarray, kind: _Kind, where: str) -> np.ndarray:
    """uint64 varint values -> the tensor's dtype, refusing out-of-range values."""
    if kind.name == "bool":
        return values != 0
    if kind.name == "uint8":
        if values.size and int(values.max()) > 0xFF:
            raise StateError(f"{where}: uint8 value {int(values.max())} out of range")
        return values.astype(np.uint8)
    signed = values.view(np.int64)
    if kind.name == "int64":
        return signed.copy()
    lo, hi = _RANGES[kind.name]
    if signed.size and (int(signed.min()) < lo or int(signed.max()) > hi):
        bad = int(signed[(signed < lo) | (signed > hi)][0])
        raise StateError(f"{where}: {kind.name} value {bad} out of range")
    return signed.astype(kind.np_dtype)
