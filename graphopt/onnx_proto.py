"""graphopt IR <-> ONNX protobuf messages: types, tensors, attributes and nodes.

The IR-level half of ONNX I/O, with no op registry behind it: the registry's adapter for core
ops (ONNX shape inference, `onnx.reference` kernels) builds node protos with it, and
`graphopt.onnx_io` builds whole models on top of it.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import AttrKind, Attr, Node, TensorType


class OnnxImportError(UserError):
    """An ONNX model (or part of one) that graphopt cannot hold; names the node or tensor."""


def tensor_type_from_proto(tp: onnx.TypeProto, what: str = "value") -> TensorType | None:
    which = tp.WhichOneof("value")
    if which is None:
        return None
    if which != "tensor_type":
        raise OnnxImportError(f"{what} has type {which.replace('_type', '')}: graphopt supports tensors only")
    tt = tp.tensor_type
    if tt.elem_type == 0:
        return None
    try:
        dtype = DType.from_onnx(tt.elem_type)
    except ValueError as e:
        raise OnnxImportError(f"{what}: {e}") from None
    if not tt.HasField("shape"):
        return TensorType(dtype, None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorType(dtype, tuple(dims))


def type_to_proto(t: TensorType) -> onnx.TypeProto:
    shape = None if t.shape is None else [d for d in t.shape]
    return onnx.helper.make_tensor_type_proto(t.dtype.onnx_type, shape)


def array_to_proto(array: np.ndarray, name: str = "") -> TensorProto:
    dtype = DType.from_numpy(array.dtype)
    t = TensorProto()
    t.name = name
    t.data_type = dtype.onnx_type
    t.dims.extend(array.shape)
    t.raw_data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def attr_to_proto(name: str, a: Attr) -> AttributeProto:
    p = AttributeProto()
    p.name = name
    k = a.kind
    if k is AttrKind.INT:
        p.type, p.i = AttributeProto.INT, a.value
    elif k is AttrKind.FLOAT:
        p.type, p.f = AttributeProto.FLOAT, a.value
    elif k is AttrKind.STRING:
        p.type, p.s = AttributeProto.STRING, a.value.encode("utf-8")
    elif k is AttrKind.TENSOR:
        p.type = AttributeProto.TENSOR
        p.t.CopyFrom(array_to_proto(a.value))
    elif k is AttrKind.INTS:
        p.type = AttributeProto.INTS
        p.ints.extend(a.value)
    elif k is AttrKind.FLOATS:
        p.type = AttributeProto.FLOATS
        p.floats.extend(a.value)
    elif k is AttrKind.STRINGS:
        p.type = AttributeProto.STRINGS
        p.strings.extend(s.encode("utf-8") for s in a.value)
    return p


def node_to_proto(node: Node) -> onnx.NodeProto:
    p = onnx.NodeProto()
    p.op_type = node.op_type
    p.domain = node.domain
    p.name = node.name
    p.input.extend("" if v is None else v.name for v in node.inputs)
    outs = ["" if v is None else v.name for v in node.outputs]
    while outs and outs[-1] == "":
        outs.pop()
    p.output.extend(outs)
    for k in sorted(node.attrs):
        p.attribute.append(attr_to_proto(k, node.attrs[k]))
    if node.meta.doc_string:
        p.doc_string = node.meta.doc_string
    for k, v in node.meta.metadata_props:
        e = p.metadata_props.add()
        e.key, e.value = k, v
    return p


def write_array(f, arr: np.ndarray, chunk_bytes: int = 64 << 20) -> None:
    """Write an array's little-endian bytes in chunks, so a memory-mapped weight is never
    copied whole."""
    flat = arr.reshape(-1)
    if flat.dtype.byteorder == ">":
        flat = flat.astype(flat.dtype.newbyteorder("<"))
    step = max(1, chunk_bytes // max(1, flat.dtype.itemsize))
    for i in range(0, flat.size, step):
        f.write(np.ascontiguousarray(flat[i:i + step]).tobytes())
