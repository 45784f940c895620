"""Element types: one table mapping graphopt's short names to ONNX and numpy.

bfloat16 (and the float8 family, which we refuse) come from `ml_dtypes`, the numpy dtype
package ONNX itself uses. What is not in this table cannot enter the IR: the importer
refuses it with an error naming the tensor.
"""
from __future__ import annotations

import enum

import ml_dtypes
import numpy as np
from onnx import TensorProto


class DType(enum.Enum):
    # name   = (short, onnx elem type, numpy dtype)
    FLOAT32 = ("f32", TensorProto.FLOAT, np.dtype(np.float32))
    FLOAT16 = ("f16", TensorProto.FLOAT16, np.dtype(np.float16))
    BFLOAT16 = ("bf16", TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16))
    FLOAT64 = ("f64", TensorProto.DOUBLE, np.dtype(np.float64))
    INT8 = ("i8", TensorProto.INT8, np.dtype(np.int8))
    INT16 = ("i16", TensorProto.INT16, np.dtype(np.int16))
    INT32 = ("i32", TensorProto.INT32, np.dtype(np.int32))
    INT64 = ("i64", TensorProto.INT64, np.dtype(np.int64))
    UINT8 = ("u8", TensorProto.UINT8, np.dtype(np.uint8))
    UINT16 = ("u16", TensorProto.UINT16, np.dtype(np.uint16))
    UINT32 = ("u32", TensorProto.UINT32, np.dtype(np.uint32))
    UINT64 = ("u64", TensorProto.UINT64, np.dtype(np.uint64))
    BOOL = ("bool", TensorProto.BOOL, np.dtype(np.bool_))

    def __init__(self, short: str, onnx_type: int, np_dtype: np.dtype):
        self.short = short
        self.onnx_type = onnx_type
        self.np_dtype = np_dtype

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.FLOAT32, DType.FLOAT16, DType.BFLOAT16, DType.FLOAT64)

    @staticmethod
    def from_short(short: str) -> "DType":
        try:
            return _BY_SHORT[short]
        except KeyError:
            raise ValueError(f"unknown element type {short!r}") from None

    @staticmethod
    def from_onnx(elem_type: int) -> "DType":
        try:
            return _BY_ONNX[elem_type]
        except KeyError:
            name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)
            raise ValueError(f"element type {name} is not supported by graphopt") from None

    @staticmethod
    def from_numpy(dtype) -> "DType":
        dtype = np.dtype(dtype)
        try:
            return _BY_NUMPY[dtype]
        except KeyError:
            raise ValueError(f"numpy dtype {dtype} is not supported by graphopt") from None


_BY_SHORT = {d.short: d for d in DType}
_BY_ONNX = {d.onnx_type: d for d in DType}
_BY_NUMPY = {d.np_dtype: d for d in DType}


# (rtol, atol) per float element type for "the same computation done two ways": a graph
# before and after a pass (--check-numerics), a lowering against the reference, in the tests.
TOLERANCES = {
    DType.FLOAT64: (1e-9, 1e-12),
    DType.FLOAT32: (1e-5, 1e-5),
    DType.FLOAT16: (1e-3, 1e-3),
    DType.BFLOAT16: (1e-2, 1e-2),
}
