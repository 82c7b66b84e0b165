"""
Hostile ``State`` diffs: structures that would make a pure-Python structure reader loop
once per few bytes, each built to a chosen byte size, and the normal diff they are
compared with (a model whose real diff has the same size, with the ids another client
gives its tensors: :func:`foreign_bytes`).

Shared by ``tests/server/test_parser_cost.py`` and ``benchmarks/bench_state.py``.

    >>> from benchmarks.hostile_state import HOSTILE, model_of_size
    >>> model = model_of_size(100_000)
    >>> len(HOSTILE["empty tensors"](model, 100_000)) >= 100_000
    True
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gridfl import _protobuf as pw
from gridfl import state
from gridfl.state import dumps

Model = list[tuple[tuple[int, ...], np.dtype]]

F32 = np.dtype(np.float32)


def model_of_size(nbytes: int) -> Model:
    """A CNN-like float32 model (McMahan et al. layout) whose diff is about ``nbytes``."""
    conv = [(32, 1, 5, 5), (32,), (64, 32, 5, 5), (64,)]
    fixed = sum(int(np.prod(s)) for s in conv) + 10
    rows = max(1, (nbytes // 4 - fixed) // (1024 + 1 + 10))
    shapes = [*conv, (rows, 1024), (rows,), (10, rows), (10,)]
    return [(s, F32) for s in shapes]


def normal_diff(model: Model, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.01 * rng.standard_normal(s)).astype(dt) for s, dt in model]


def foreign_bytes(arrays: list[np.ndarray], seed: int = 0) -> bytes:
    """``arrays`` as a client other than gridfl writes them: dumps' framing with random
    64-bit ids, as PySyft gives its tensors. ``loads`` reads these by walking their fields
    (gridfl's own bytes, ids 0, 1, ..., it reads by their layout), so they are what a
    hostile diff's cost is measured against."""
    ids = np.random.default_rng(seed).integers(1 << 40, 1 << 62, size=len(arrays))
    return state._encode(arrays, (int(i) for i in ids))


# --------------------------------------------------------------------------- building blocks
def _repeat(unit: bytes, nbytes: int) -> bytes:
    return unit * max(1, -(-nbytes // len(unit)))


def _state_tensor(td: bytes, tt_extra: bytes = b"", st_extra: bytes = b"") -> bytes:
    """State.tensors[2] { StateTensor { torch_tensor[1] { id, contents_data[2], serializer } } }"""
    tt = pw.len_field(1, pw.varint_field(1, 0)) + pw.len_field(2, td) + tt_extra
    tt += pw.varint_field(8, 4)
    return pw.len_field(2, pw.len_field(1, tt) + st_extra)


def _tensor_data(shape, dtype: str = "float32", contents: bytes = b"", extra: bytes = b""):
    dims = b"".join(pw.varint(d) for d in shape)
    td = pw.len_field(1, pw.len_field(1, dims) if dims else b"") + pw.len_field(2, dtype.encode())
    if contents:
        td += pw.len_field(22, contents)
    return td + extra


def _first(model: Model) -> tuple[tuple[int, ...], int]:
    shape = model[0][0]
    return shape, int(np.prod(shape))


def _with_noise_in(level: str) -> Callable[[Model, int], bytes]:
    """The model's first tensor, right shape, with ~nbytes of unknown varint fields (2 bytes
    each: field 15, value 0) inside the message named by ``level``."""

    def build(model: Model, nbytes: int) -> bytes:
        shape, count = _first(model)
        noise = _repeat(pw.varint_field(15, 0), nbytes)
        contents = np.zeros(count, "<f4").tobytes()
        if level == "Size":
            dims = b"".join(pw.varint(d) for d in shape)
            td = pw.len_field(1, noise + pw.len_field(1, dims)) + pw.len_field(2, b"float32")
            return _state_tensor(td + pw.len_field(22, contents))
        td = _tensor_data(shape, contents=contents, extra=noise if level == "TensorData" else b"")
        if level == "TensorData":
            return _state_tensor(td)
        if level == "TorchTensor":
            return _state_tensor(td, tt_extra=noise)
        if level == "StateTensor":
            return _state_tensor(td, st_extra=noise)
        if level == "Parameter":  # StateTensor.torch_param[2] = Parameter { tensor[2] }
            tt = pw.len_field(1, pw.varint_field(1, 0)) + pw.len_field(2, td)
            param = noise + pw.len_field(2, tt + pw.varint_field(8, 4))
            return pw.len_field(2, pw.len_field(2, param))
        raise ValueError(level)

    return build


# --------------------------------------------------------------------------- the hostile diffs
def _empty_tensors(model: Model, nbytes: int) -> bytes:
    return _repeat(_state_tensor(_tensor_data((0,))), nbytes)


def _extra_tensor(model: Model, nbytes: int) -> bytes:
    # the real diff, then one empty tensor too many
    return dumps(normal_diff(model)) + _state_tensor(_tensor_data(()))


def _placeholders(model: Model, nbytes: int) -> bytes:
    ph = pw.len_field(3, pw.varint_field(1, 0)) + pw.len_field(4, b"#0")
    return _repeat(pw.len_field(1, ph), nbytes)


def _empty_placeholders(model: Model, nbytes: int) -> bytes:
    # an empty placeholder every 2 bytes
    return _repeat(pw.len_field(1, b""), nbytes)


def _tags(model: Model, nbytes: int) -> bytes:
    # one placeholder with a tag every 4 bytes
    return pw.len_field(1, _repeat(pw.len_field(4, b"#0"), nbytes))


def _unknown_top(model: Model, nbytes: int) -> bytes:
    return _repeat(pw.varint_field(15, 0), nbytes)


def _unknown_every_type(model: Model, nbytes: int) -> bytes:
    unit = (
        pw.varint_field(9, 1)
        + pw.key(10, pw.I32) + b"\0" * 4
        + pw.key(11, pw.I64) + b"\0" * 8
        + pw.len_field(12, b"")
        + pw.key(13, pw.SGROUP) + pw.key(13, pw.EGROUP)
    )  # fmt: skip
    return _repeat(unit, nbytes)


def _wide_group(model: Model, nbytes: int) -> bytes:
    inner = _repeat(pw.varint_field(1, 0), nbytes)
    return pw.key(5, pw.SGROUP) + inner + pw.key(5, pw.EGROUP)


def _deep_groups(model: Model, nbytes: int) -> bytes:
    # 60 levels of nested groups (under the depth limit), again and again
    nest = pw.key(5, pw.SGROUP) * 60 + pw.key(5, pw.EGROUP) * 60
    return _repeat(nest, nbytes)


def _too_deep_groups(model: Model, nbytes: int) -> bytes:
    return _repeat(pw.key(5, pw.SGROUP), nbytes)


def _packed_dims(model: Model, nbytes: int) -> bytes:
    # a shape of one-byte dims, as many as fit
    td = pw.len_field(1, pw.len_field(1, _repeat(b"\x01", nbytes))) + pw.len_field(2, b"float32")
    return _state_tensor(td)


def _unpacked_dims(model: Model, nbytes: int) -> bytes:
    td = pw.len_field(1, _repeat(pw.varint_field(1, 1), nbytes)) + pw.len_field(2, b"float32")
    return _state_tensor(td)


def _repeated_shapes(model: Model, nbytes: int) -> bytes:
    # TensorData.shape repeated (protobuf merges them): an empty Size every 2 bytes
    td = _repeat(pw.len_field(1, b""), nbytes) + pw.len_field(2, b"float32")
    return _state_tensor(td)


def _huge_dims(model: Model, nbytes: int) -> bytes:
    # a shape of 2**31-1 x 2**31-1 x 2**31-1 with nbytes of contents
    contents = bytes(nbytes // 4 * 4)
    return _state_tensor(_tensor_data(((1 << 31) - 1,) * 3, contents=contents))


def _zero_and_huge_dims(model: Model, nbytes: int) -> bytes:
    # an empty tensor of shape (0, 2**31-1, ...), repeated
    return _repeat(_state_tensor(_tensor_data((0,) + ((1 << 31) - 1,) * 4)), nbytes)


def _unpacked_contents(model: Model, nbytes: int) -> bytes:
    # the first tensor's float32 values one field each (5 bytes per value), as many as fit
    shape, _count = _first(model)
    values = _repeat(pw.key(22, pw.I32) + b"\0\0\0\0", nbytes)
    return _state_tensor(_tensor_data(shape) + values)


def _split_segments(model: Model, nbytes: int) -> bytes:
    # StateTensor.torch_tensor repeated (merged): an empty segment every 2 bytes
    return pw.len_field(2, _repeat(pw.len_field(1, b""), nbytes))


def _split_contents_data(model: Model, nbytes: int) -> bytes:
    tt = _repeat(pw.len_field(2, b""), nbytes) + pw.varint_field(8, 4)
    return pw.len_field(2, pw.len_field(1, tt))


def _repeated_dtype(model: Model, nbytes: int) -> bytes:
    shape, _ = _first(model)
    td = _repeat(pw.len_field(2, b"float32"), nbytes) + _tensor_data(shape)
    return _state_tensor(td)


def _huge_dtype(model: Model, nbytes: int) -> bytes:
    td = pw.len_field(1, b"") + pw.len_field(2, _repeat(b"float32", nbytes))
    return _state_tensor(td)


def _wrong_shape(model: Model, nbytes: int) -> bytes:
    # the real diff, the last 2-d tensor transposed: refused after the others are decoded
    arrays = normal_diff(model)
    last = max(i for i, a in enumerate(arrays) if a.ndim == 2)
    arrays[last] = np.ascontiguousarray(arrays[last].T)
    return dumps(arrays)


def _wrong_dtype(model: Model, nbytes: int) -> bytes:
    # the real diff, the last 2-d tensor as float16 (float32 on the wire: same size)
    arrays = normal_diff(model)
    last = max(i for i, a in enumerate(arrays) if a.ndim == 2)
    arrays[last] = arrays[last].astype(np.float16)
    return dumps(arrays)


def _short_contents(model: Model, nbytes: int) -> bytes:
    # the first tensor's shape, with one float32 value missing
    shape, count = _first(model)
    return _state_tensor(_tensor_data(shape, contents=bytes(4 * (count - 1))))


#: name -> builder(model, nbytes) of a diff of about nbytes (or the model's diff size)
HOSTILE: dict[str, Callable[[Model, int], bytes]] = {
    "empty tensors": _empty_tensors,
    "one tensor too many": _extra_tensor,
    "placeholders": _placeholders,
    "empty placeholders": _empty_placeholders,
    "tags": _tags,
    "unknown fields, top level": _unknown_top,
    "unknown fields, every wire type": _unknown_every_type,
    **{f"unknown fields in {lv}": _with_noise_in(lv) for lv in (
        "StateTensor", "Parameter", "TorchTensor", "TensorData", "Size")},
    "one wide group": _wide_group,
    "nested groups": _deep_groups,
    "groups too deep": _too_deep_groups,
    "packed dims": _packed_dims,
    "unpacked dims": _unpacked_dims,
    "repeated shapes": _repeated_shapes,
    "huge dims": _huge_dims,
    "zero and huge dims": _zero_and_huge_dims,
    "unpacked contents": _unpacked_contents,
    "split torch_tensor": _split_segments,
    "split contents_data": _split_contents_data,
    "repeated dtype": _repeated_dtype,
    "huge dtype": _huge_dtype,
    "real diff, one wrong shape": _wrong_shape,
    "real diff, wrong dtype": _wrong_dtype,
    "contents one value short": _short_contents,
}  # fmt: skip
