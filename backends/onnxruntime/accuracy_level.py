"""MatMulNBits' `accuracy_level`, chosen by a timing on this machine (backend option
`quant_accuracy_level=auto`, the default on CPU).

Level 0 computes in float32, as the reference kernel does; level 4 lets the CPU kernel quantize
the activations to int8 per block and use integer dot products: faster where the CPU has them
(the issue measured ~1.8x on a 2-core machine), at a small cost in accuracy (+0.01 % perplexity
on examples/default, docs/quantization.md). Whether it is faster depends on the CPU and the
shapes, so `auto` measures: each distinct (K, N, bits, block size) of the graph's QuantLinear
layers as a one-node MatMulNBits model at both levels, at one row (a decode step) and at 64 rows
(a prefill), interleaved; per row count the layers' times are summed, weighted by how many layers
have the shape. Level 4 is chosen when it is at least MARGIN faster at one row count and at most
MARGIN slower at the other (a decoder's step and its prefill are judged apart: summed, the
64-row prefill drowned the one-row step, the call a generator repeats). A generation-ready
decoder (past_key_values.* inputs) is judged instead by what it runs: one 64-row prefill and
GENERATION_STEPS one-row steps, level 4 when that total is at least MARGIN lower. Judged row
count by row count, the Llama-style model of issue 13 flipped between runs: level 4 made its
step 2.1x faster and its 64-row prefill 1.2x slower one run (so level 0) and within 10 % the
next (so level 4), and its int4 step ran at either 1.0x or about 0.7x the model builder's.
Each time is the minimum of REPEATS interleaved runs: load from other processes only ever adds
time, and with a median of five on a loaded 2-core machine the rule chose level 0 for GPT-2's
block-32 layers, whose step level 4 makes about 2x faster. The totals go to the manifest (`quant_accuracy_level`).
Timings are cached per process and shape (the accuracy guard lowers many mixes of one model).
"""
from __future__ import annotations

import collections
import time

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph

MARGIN = 0.10      # level 4 must save at least 10 % at one row count and lose at most 10 % at the other
ROWS = (1, 64)     # a decode step and a prefill
REPEATS = 9        # timed rounds per (shape, rows, level); the minimum counts
LEVELS = (0, 4)
GENERATION_STEPS = 64  # one-row steps weighed against one 64-row prefill for a generation-ready decoder

_CACHE: dict[tuple, dict[int, dict[int, float]]] = {}  # (K, N, bits, block_size) -> level -> rows -> ms


def quant_shapes(graph: Graph) -> collections.Counter:
    """(K, N, bits, block_size) -> how many QuantLinear layers have it."""
    return collections.Counter((n.attr("K"), n.attr("N"), n.attr("bits", 4), n.attr("block_size", 32))
                               for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN and n.op_type == "QuantLinear")


def choose_accuracy_level(graph: Graph, generation: bool | None = None) -> dict | None:
    """{"level": 0 or 4, "ms": {level: {rows: weighted total}}, ...} or None without QuantLinear
    layers. `generation`: whether the graph is (or will be made) a generation-ready decoder;
    by default whether it takes a KV cache now (the accuracy guard measures before the rewrite)."""
    shapes = quant_shapes(graph)
    if not shapes:
        return None
    total = {level: {rows: 0.0 for rows in ROWS} for level in LEVELS}
    for shape, count in shapes.items():
        if shape not in _CACHE:
            _CACHE[shape] = _measure(*shape)
        for level in LEVELS:
            for rows in ROWS:
                total[level][rows] += count * _CACHE[shape][level][rows]
    if generates(graph) if generation is None else generation:
        run = {level: total[level][ROWS[1]] + GENERATION_STEPS * total[level][ROWS[0]] for level in LEVELS}
        level = 4 if run[4] <= (1 - MARGIN) * run[0] else 0
        rule = (f"4 if one {ROWS[1]}-row prefill plus {GENERATION_STEPS} one-row decode steps take at least "
                f"{MARGIN:.0%} less time (a generation-ready decoder; minimum of {REPEATS} interleaved runs)")
    else:
        ratio = {rows: total[4][rows] / max(total[0][rows], 1e-12) for rows in ROWS}
        level = 4 if min(ratio.values()) <= 1 - MARGIN and max(ratio.values()) <= 1 + MARGIN else 0
        rule = (f"4 if at least {MARGIN:.0%} faster at one row count and at most {MARGIN:.0%} slower at the other "
                f"(minimum of {REPEATS} interleaved runs)")
    return {"level": level, "ms": {str(k): {str(r): round(v, 4) for r, v in t.items()} for k, t in total.items()},
            "rows": list(ROWS), "layers": int(sum(shapes.values())), "shapes": len(shapes), "rule": rule}


def generates(graph: Graph) -> bool:
    """A generation-ready decoder: it takes a KV cache (rewrite-kv-cache's past_key_values.* inputs)."""
    return any(v.name.startswith("past_key_values.") for v in graph.inputs if not v.is_initializer)


def _measure(k: int, n: int, bits: int, block_size: int) -> dict[int, dict[int, float]]:
    """level -> rows -> minimum ms of one MatMulNBits [rows, K] x [K, N]."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    sessions = {level: _session(ort, k, n, bits, block_size, level, rng) for level in LEVELS}
    out: dict[int, dict[int, float]] = {level: {} for level in LEVELS}
    for rows in ROWS:
        x = {"X": rng.standard_normal((rows, k)).astype(np.float32)}
        times = {level: [] for level in LEVELS}
        for sess in sessions.values():
            sess.run(None, x)  # warm-up
        for _ in range(REPEATS):
            for level, sess in sessions.items():  # interleaved, so load drifts hit both alike
                t = time.perf_counter()
                sess.run(None, x)
                times[level].append(time.perf_counter() - t)
        for level in LEVELS:
            out[level][rows] = min(times[level]) * 1e3
    return out


def _session(ort, k: int, n: int, bits: int, block_size: int, level: int, rng):
    from onnx import TensorProto, helper, numpy_helper

    nb = -(-k // block_size)
    packed = rng.integers(0, 256, (n, nb, block_size * bits // 8), dtype=np.uint8)
    scales = (rng.random((n, nb)) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["X", "W", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=level)
    graph = helper.make_graph([node], "matmul_nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(packed, "W"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # two live sessions must not spin on each other
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
