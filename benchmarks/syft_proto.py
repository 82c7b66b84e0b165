"""
syft-proto ``State`` message classes built with the real ``protobuf`` library.

The schema is written here as ``FileDescriptorProto``s (no ``.proto`` files, no
``protoc``), with syft-proto's package names and field numbers, and loaded into a
private descriptor pool. Tests use these classes as an independent oracle for
:mod:`gridfl.state`; the State benchmark uses them as the "naive" path.

    >>> from benchmarks.syft_proto import syft_proto
    >>> sp = syft_proto()
    >>> msg = sp.State()
    >>> t = msg.tensors.add().torch_tensor
    >>> t.serializer = sp.TorchTensor.SERIALIZER_ALL

``syft_proto(packed=False)`` gives the same schema with ``[packed = false]`` on the
repeated numeric fields, to produce the legacy unpacked encoding.

Placeholder fields 1 and 2 (a ``oneof child`` in syft-proto) are left out: gridfl never
writes them and reads them as unknown fields.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto

_SCALARS = {
    "int32": F.TYPE_INT32,
    "int64": F.TYPE_INT64,
    "uint32": F.TYPE_UINT32,
    "sint32": F.TYPE_SINT32,
    "float": F.TYPE_FLOAT,
    "double": F.TYPE_DOUBLE,
    "bool": F.TYPE_BOOL,
    "string": F.TYPE_STRING,
    "bytes": F.TYPE_BYTES,
}


def _file(name: str, package: str, deps: list[str]) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    fd.dependency.extend(deps)
    return fd


def _field(msg, name, number, typ, *, repeated=False, oneof=None, packed=True):
    f = msg.field.add(name=name, number=number)
    f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    if typ in _SCALARS:
        f.type = _SCALARS[typ]
        if repeated and typ not in ("string", "bytes") and not packed:
            f.options.packed = False
    elif typ.startswith("enum:"):
        f.type = F.TYPE_ENUM
        f.type_name = typ[5:]
    else:
        f.type = F.TYPE_MESSAGE
        f.type_name = typ
    if oneof is not None:
        f.oneof_index = oneof
    return f


def _build_files(packed: bool) -> list[descriptor_pb2.FileDescriptorProto]:
    files = []

    # syft_proto/types/syft/v1/id.proto, shape.proto
    fd = _file("syft_proto/types/syft/v1/id.proto", "syft_proto.types.syft.v1", [])
    m = fd.message_type.add(name="Id")
    m.oneof_decl.add(name="id")
    _field(m, "id_int", 1, "int64", oneof=0)
    _field(m, "id_str", 2, "string", oneof=0)
    files.append(fd)

    fd = _file("syft_proto/types/syft/v1/shape.proto", "syft_proto.types.syft.v1", [])
    m = fd.message_type.add(name="Shape")
    _field(m, "dims", 1, "int32", repeated=True, packed=packed)
    files.append(fd)

    # syft_proto/types/torch/v1/size.proto, tensor_data.proto, tensor.proto, parameter.proto
    fd = _file("syft_proto/types/torch/v1/size.proto", "syft_proto.types.torch.v1", [])
    m = fd.message_type.add(name="Size")
    _field(m, "dims", 1, "int32", repeated=True, packed=packed)
    files.append(fd)

    fd = _file(
        "syft_proto/types/torch/v1/tensor_data.proto",
        "syft_proto.types.torch.v1",
        ["syft_proto/types/torch/v1/size.proto"],
    )
    m = fd.message_type.add(name="TensorData")
    _field(m, "shape", 1, ".syft_proto.types.torch.v1.Size")
    _field(m, "dtype", 2, "string")
    _field(m, "is_quantized", 3, "bool")
    _field(m, "scale", 4, "float")
    _field(m, "zero_point", 5, "int32")
    for name, number, typ in [
        ("contents_uint8", 16, "uint32"),
        ("contents_int8", 17, "int32"),
        ("contents_int16", 18, "int32"),
        ("contents_int32", 19, "int32"),
        ("contents_int64", 20, "int64"),
        ("contents_float16", 21, "float"),
        ("contents_float32", 22, "float"),
        ("contents_float64", 23, "double"),
        ("contents_bool", 24, "bool"),
        ("contents_qint8", 25, "sint32"),
        ("contents_quint8", 26, "uint32"),
        ("contents_qint32", 27, "sint32"),
        ("contents_bfloat16", 28, "float"),
    ]:
        _field(m, name, number, typ, repeated=True, packed=packed)
    files.append(fd)

    fd = _file(
        "syft_proto/types/torch/v1/tensor.proto",
        "syft_proto.types.torch.v1",
        ["syft_proto/types/syft/v1/id.proto", "syft_proto/types/torch/v1/tensor_data.proto"],
    )
    m = fd.message_type.add(name="TorchTensor")
    e = m.enum_type.add(name="Serializer")
    for i, n in enumerate(
        [
            "SERIALIZER_UNSPECIFIED",
            "SERIALIZER_TORCH",
            "SERIALIZER_NUMPY",
            "SERIALIZER_TF",
            "SERIALIZER_ALL",
        ]
    ):
        e.value.add(name=n, number=i)
    m.oneof_decl.add(name="contents")
    _field(m, "id", 1, ".syft_proto.types.syft.v1.Id")
    _field(m, "contents_data", 2, ".syft_proto.types.torch.v1.TensorData", oneof=0)
    _field(m, "contents_bin", 3, "bytes", oneof=0)
    _field(m, "chain", 4, ".syft_proto.types.torch.v1.TorchTensor")
    _field(m, "grad_chain", 5, ".syft_proto.types.torch.v1.TorchTensor")
    _field(m, "tags", 6, "string", repeated=True)
    _field(m, "description", 7, "string")
    _field(m, "serializer", 8, "enum:.syft_proto.types.torch.v1.TorchTensor.Serializer")
    files.append(fd)

    fd = _file(
        "syft_proto/types/torch/v1/parameter.proto",
        "syft_proto.types.torch.v1",
        ["syft_proto/types/syft/v1/id.proto", "syft_proto/types/torch/v1/tensor.proto"],
    )
    m = fd.message_type.add(name="Parameter")
    _field(m, "id", 1, ".syft_proto.types.syft.v1.Id")
    _field(m, "tensor", 2, ".syft_proto.types.torch.v1.TorchTensor")
    _field(m, "requires_grad", 3, "bool")
    _field(m, "grad", 4, ".syft_proto.types.torch.v1.TorchTensor")
    files.append(fd)

    # syft_proto/execution/v1/placeholder.proto, state_tensor.proto, state.proto
    fd = _file(
        "syft_proto/execution/v1/placeholder.proto",
        "syft_proto.execution.v1",
        ["syft_proto/types/syft/v1/id.proto", "syft_proto/types/syft/v1/shape.proto"],
    )
    m = fd.message_type.add(name="Placeholder")
    _field(m, "id", 3, ".syft_proto.types.syft.v1.Id")
    _field(m, "tags", 4, "string", repeated=True)
    _field(m, "description", 5, "string")
    _field(m, "expected_shape", 6, ".syft_proto.types.syft.v1.Shape")
    files.append(fd)

    fd = _file(
        "syft_proto/execution/v1/state_tensor.proto",
        "syft_proto.execution.v1",
        ["syft_proto/types/torch/v1/tensor.proto", "syft_proto/types/torch/v1/parameter.proto"],
    )
    m = fd.message_type.add(name="StateTensor")
    m.oneof_decl.add(name="tensor")
    _field(m, "torch_tensor", 1, ".syft_proto.types.torch.v1.TorchTensor", oneof=0)
    _field(m, "torch_param", 2, ".syft_proto.types.torch.v1.Parameter", oneof=0)
    files.append(fd)

    fd = _file(
        "syft_proto/execution/v1/state.proto",
        "syft_proto.execution.v1",
        ["syft_proto/execution/v1/placeholder.proto", "syft_proto/execution/v1/state_tensor.proto"],
    )
    m = fd.message_type.add(name="State")
    _field(m, "placeholders", 1, ".syft_proto.execution.v1.Placeholder", repeated=True)
    _field(m, "tensors", 2, ".syft_proto.execution.v1.StateTensor", repeated=True)
    files.append(fd)
    return files


_NAMES = {
    "Id": "syft_proto.types.syft.v1.Id",
    "Shape": "syft_proto.types.syft.v1.Shape",
    "Size": "syft_proto.types.torch.v1.Size",
    "TensorData": "syft_proto.types.torch.v1.TensorData",
    "TorchTensor": "syft_proto.types.torch.v1.TorchTensor",
    "Parameter": "syft_proto.types.torch.v1.Parameter",
    "Placeholder": "syft_proto.execution.v1.Placeholder",
    "StateTensor": "syft_proto.execution.v1.StateTensor",
    "State": "syft_proto.execution.v1.State",
}


def syft_proto(packed: bool = True) -> SimpleNamespace:
    """The syft-proto State message classes (``sp.State``, ``sp.TorchTensor``, ...)."""
    return _classes(bool(packed))


@functools.cache
def _classes(packed: bool) -> SimpleNamespace:
    pool = descriptor_pool.DescriptorPool()
    for fd in _build_files(packed):
        pool.Add(fd)
    return SimpleNamespace(
        **{
            short: message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
            for short, full in _NAMES.items()
        }
    )


def state_message(arrays, *, packed: bool = True, syftjs_placeholders: bool = True):
    """Build a ``State`` message the way gridfl writes it, through the protobuf API.

    Uses ``contents_<dtype>.extend(arr.ravel().tolist())``: the naive path.
    """
    import numpy as np

    sp = syft_proto(packed)
    msg = sp.State()
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        dtype = a.dtype.name
        if syftjs_placeholders:
            ph = msg.placeholders.add()
            ph.id.id_int = i
            ph.tags.extend([f"#{i}", f"#state-{i}"])
            ph.expected_shape.SetInParent()
            ph.expected_shape.dims.extend(a.shape)
        tt = msg.tensors.add().torch_tensor
        tt.id.id_int = i
        td = tt.contents_data
        td.shape.SetInParent()
        td.shape.dims.extend(a.shape)
        td.dtype = dtype
        values = a.astype(np.float32) if dtype == "float16" else a
        getattr(td, f"contents_{dtype}").extend(values.ravel().tolist())
        tt.serializer = sp.TorchTensor.SERIALIZER_ALL
    return msg


def arrays_from_message(msg, *, via_list: bool = False) -> list:
    """Read arrays out of a ``State`` message through the protobuf API (the naive path).

    ``np.array(container)``; with ``via_list=True``, ``np.array(list(container))``: the
    cost where the container has no fast ``__array__`` (protobuf's pure-Python backend
    and releases before the upb one grew it).
    """
    import numpy as np

    out = []
    for st in msg.tensors:
        tt = st.torch_param.tensor if st.WhichOneof("tensor") == "torch_param" else st.torch_tensor
        td = tt.contents_data
        dtype = td.dtype
        contents = getattr(td, f"contents_{dtype}")
        if via_list:
            contents = list(contents)
        values = np.array(contents, dtype=np.dtype(dtype))
        out.append(values.reshape(tuple(td.shape.dims)))
    return out
