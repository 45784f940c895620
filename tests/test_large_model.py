"""A model with more than 2 GB of external-data weights round-trips (import memory-maps the
weights, export streams them), and ONNX Runtime runs the result."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.errors import UserError
from graphopt.onnx_io import PROTOBUF_LIMIT, load_onnx, save_onnx
from graphopt.testing import run_ort

ROWS, COLS = 524_800, 1024  # 2,149,580,800 bytes of float32: over 2 GiB
MARKED = {0: 1.5, 7: -2.0, 300_000: 3.25, ROWS - 1: 42.0}


def build(folder):
    data = folder / "big.onnx.data"
    with open(data, "wb") as f:
        f.truncate(ROWS * COLS * 4)  # sparse: zeros cost no disk
        for row, val in MARKED.items():
            f.seek(row * COLS * 4)
            f.write(np.full(COLS, val, np.float32).tobytes())
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[ROWS, COLS])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data.name), ("offset", "0"), ("length", str(ROWS * COLS * 4))):
        e = w.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "idx"], ["rows"], axis=0)], "big",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", COLS])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_over_2gb_roundtrip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = build(src)
    g = load_onnx(path)
    w = g.initializers["w"].const_value
    assert isinstance(w, np.memmap) and w.nbytes > 2**31
    with pytest.raises(UserError, match="needs external data"):
        save_onnx(g, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx").exists()
    out = tmp_path / "out"
    out.mkdir()
    files = save_onnx(g, out / "big.onnx")  # over the threshold: external data by default
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    assert (out / "big.onnx").stat().st_size < 1 << 20
    onnx.checker.check_model(str(out / "big.onnx"))  # path form: checks external data too
    g2 = load_onnx(out / "big.onnx")
    w2 = g2.initializers["w"].const_value
    for row, val in MARKED.items():
        assert (w2[row] == val).all()
    assert not w2[1:7].any() and not w2[-5:-1].any()
    idx = np.array(sorted(MARKED) + [1], np.int64)
    rows = run_ort(out / "big.onnx", {"idx": idx})["rows"]
    np.testing.assert_array_equal(rows[:, 0], [MARKED[i] for i in sorted(MARKED)] + [0.0])
    del w, w2, g, g2
    assert PROTOBUF_LIMIT < 2**31
