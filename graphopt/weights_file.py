"""Weights beside a `.gir` file, in the safetensors layout.

The format is an 8-byte little-endian header length, a JSON header mapping each name to
its dtype, shape and byte range, then the raw bytes. It is written here (about thirty lines)
rather than through the `safetensors` package because we need two things it does not give
a numpy user: bfloat16 arrays (via ml_dtypes) and streaming, memory-mapped I/O for weights
over 2 GB. Files written here are readable by `safetensors` and vice versa.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.onnx_proto import write_array

_CODES = {
    DType.FLOAT32: "F32", DType.FLOAT16: "F16", DType.BFLOAT16: "BF16", DType.FLOAT64: "F64",
    DType.INT8: "I8", DType.INT16: "I16", DType.INT32: "I32", DType.INT64: "I64",
    DType.UINT8: "U8", DType.UINT16: "U16", DType.UINT32: "U32", DType.UINT64: "U64", DType.BOOL: "BOOL",
}
_FROM_CODE = {c: d for d, c in _CODES.items()}


def write_tensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in tensors.items():
        dtype = DType.from_numpy(arr.dtype)
        header[name] = {"dtype": _CODES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((-len(hbytes)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for arr in tensors.values():
            write_array(f, arr)


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise UserError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (the header is a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype = _FROM_CODE[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a bad or unsupported entry in the header") from None
        if start < 0 or any(d < 0 for d in shape):
            raise UserError(f"{path}: tensor {name!r} has a negative offset or dimension in the header")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != nbytes or base + end > size:
            raise UserError(f"{path}: tensor {name!r} has a byte range that does not fit its shape or the file")
        if nbytes == 0 or not shape:
            with open(path, "rb") as f:
                f.seek(base + start)
                out[name] = np.frombuffer(f.read(nbytes), dtype=dtype.np_dtype).reshape(shape).copy()
        else:
            out[name] = np.memmap(path, dtype=dtype.np_dtype, mode="r", offset=base + start, shape=shape)
    return out
