"""The bytes a decode step reads, as the GPT-2 decode benchmarks bound it (benchmarks/generation.py
`step_bytes_read`): a table only gathers read counts one row a token, a tied table read in full
by a MatMul counts once and in full, the past cache counts."""
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _model(path: Path) -> None:
    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "wte")  # tied: gathered and read by the head
    pos = numpy_helper.from_array(np.zeros((50, 8), np.float32), "wpe")   # gathered only
    w = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")
    nodes = [helper.make_node("Gather", ["wte", "input_ids"], ["x"]),
             helper.make_node("Gather", ["wpe", "input_ids"], ["p"]),
             helper.make_node("Add", ["x", "p"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["h2"]),
             helper.make_node("Reshape", ["h2", "shape"], ["h2_2d"]),
             helper.make_node("Gemm", ["h2_2d", "wte"], ["logits"], transB=1)]
    shape = numpy_helper.from_array(np.array([1, 8], np.int64), "shape")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 100])],
                              [emb, pos, w, shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_step_bytes_read_counts_gathered_rows_tied_tables_and_the_cache(tmp_path):
    from generation import step_bytes_read

    _model(tmp_path / "m.onnx")
    past = np.zeros((1, 2, 16, 4), np.float32)
    step = {"input_ids": np.array([[3]], np.int64), "attention_mask": np.ones((1, 17), np.int64),
            "past_key_values.0.key": past, "past_key_values.0.value": past}
    r = step_bytes_read(tmp_path / "m.onnx", step)
    # wte in full (the head reads it), one 8-float row of wpe, w, the Reshape's shape (2 int64)
    assert r["weights"] == 100 * 8 * 4 + 8 * 4 + 8 * 8 * 4 + 2 * 8
    assert r["cache"] == 2 * past.nbytes and r["total"] == r["weights"] + r["cache"]


def test_interleaved_times_blocks_and_takes_the_ratio_of_block_medians():
    """benchmarks/quantization.py `interleaved(block=N)`: N timed calls in a row per variant and
    round (every one recorded), the per-round ratio taken between the blocks' medians: a 2 ms
    step against a 4 ms anchor is 2x faster whatever one outlier call in a block does."""
    import time

    from quantization import interleaved

    def busy(ms):
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    calls = {"fast": 0}

    def fast():
        calls["fast"] += 1
        busy(20 if calls["fast"] % 3 == 0 else 2)  # one slow call in each block of 3

    out = interleaved({"anchor": lambda: busy(4), "fast": fast}, 4, warmup=0, block=3, anchor="anchor")
    assert out["fast"]["runs"] == out["anchor"]["runs"] == 12
    assert out["fast"]["speedup_vs_anchor_median_round"] > 1.6  # the block medians: 4 / 2
    assert out["anchor"]["speedup_vs_anchor_median_round"] == 1.0
