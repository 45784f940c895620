"""The dequantize-fused TVM kernels (backends/tvm/schedules_quant.py) for graphopt.QuantLinear
and graphopt.QuantGather: equal to the reference kernels, and never a float weight in memory.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from graphopt.testing import require_installed

require_installed("tvm", "apache-tvm")

from graphopt.builder import Builder  # noqa: E402
from graphopt.dtypes import DType  # noqa: E402
from graphopt.interpreter import run as run_reference  # noqa: E402
from graphopt.ir import Graph, TensorType  # noqa: E402
from graphopt.ops.quant_format import dequantize_blockwise, quantize_blockwise  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

import graphopt.backends.tvm as tvm_backend  # noqa: E402

RNG = np.random.default_rng(13)


def _quant_linear_graph(lead, n: int, k: int, bits: int, block_size: int, symmetric: bool, bias: bool = False):
    """A one-node graph Y = QuantLinear(X) with a random weight; returns (graph, feeds)."""
    packed, scales, zp = quantize_blockwise(RNG.standard_normal((n, k)).astype(np.float32), bits, block_size, symmetric)
    g = Graph("quant_linear")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT32, tuple(lead) + (k,)))
    ins = [x, b.const(packed, "packed"), b.const(scales, "scales"), None if zp is None else b.const(zp, "zp")]
    if bias:
        ins.append(b.const(RNG.standard_normal(n).astype(np.float32), "bias"))
    g.outputs = [b.op("QuantLinear", *ins, domain="graphopt", K=k, N=n, bits=bits, block_size=block_size)]
    feed_shape = [2 if d == "batch" else 17 if d == "seq" else d for d in lead]
    return g, {"x": RNG.standard_normal(feed_shape + [k]).astype(np.float32)}


def _tolerance(want: np.ndarray, k: int) -> float:
    # fp32 sums of k products in another order: |error| <= about k * eps * sum |terms|;
    # |want| bounds it from below, so allow 4 eps per term of the largest output.
    return float(4 * k * np.finfo(np.float32).eps * np.abs(want).max())


def _int8_path(bits: int, lead) -> bool:
    """Whether a CPU build runs this QuantLinear with X rounded to int8 (quant_panels.py: the
    VNNI GEMV for 4 bits, at one row or a symbolic count, where the CPU has VNNI)."""
    from graphopt.backends.tvm.quant_panels import vnni_available

    return bits == 4 and (tuple(lead) == (1, 1) or any(isinstance(d, str) for d in lead)) and vnni_available()


def _rounding_bound(g: Graph, x: np.ndarray, block_size: int) -> np.ndarray:
    """The most X's rounding to int8 per block (|x - x8 * scale| <= max|x_block| / 254) can move
    each output: sum over blocks of that times sum |w| over the block; [rows..., N]."""
    node = next(n for n in g.nodes if n.op_type == "QuantLinear")  # its weight: [N, K]
    packed, scales = (np.asarray(node.inputs[i].const_value) for i in (1, 2))
    zp = None if len(node.inputs) < 4 or node.inputs[3] is None else np.asarray(node.inputs[3].const_value)
    k = x.shape[-1]
    w = np.abs(dequantize_blockwise(packed, scales, zp, 4, block_size, k)).astype(np.float64)
    nb = scales.shape[1]
    pad = nb * block_size - k
    x_blocks = np.pad(np.abs(x.reshape(-1, k)), ((0, 0), (0, pad))).reshape(-1, nb, block_size).max(-1) / 254
    w_blocks = np.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], nb, block_size).sum(-1)
    return (x_blocks @ w_blocks.T).reshape(x.shape[:-1] + (w.shape[0],))


def _check(g: Graph, feeds: dict, got: np.ndarray, want: np.ndarray, *, bits: int, block_size: int, lead, k: int,
           what: str) -> None:
    """got == want within fp32 reordering, plus X's int8 rounding where the int8 path ran."""
    atol = _tolerance(want, k)
    if _int8_path(bits, lead):
        bound = _rounding_bound(g, feeds["x"], block_size) + atol
        excess = np.abs(got.astype(np.float64) - want) - bound
        assert excess.max() <= 0, f"{what}: beyond the int8 rounding bound by {excess.max():.3g} at {excess.argmax()}"
        return
    assert_close(got, want, rtol=0, atol=atol, what=what)


# bits x block size x symmetric, on shapes the schedules do not divide (N and K odd, K not a
# whole number of blocks), for one row (the GEMV schedule) and 2 x 17 rows (the matmul one)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("lead", [(1, 1), (2, 17)], ids=["1x1", "2x17"])
def test_quant_linear_matches_reference(bits, block_size, symmetric, lead):
    n, k = 37, 3 * block_size - 5
    g, feeds = _quant_linear_graph(lead, n, k, bits, block_size, symmetric, bias=not symmetric)
    want = run_reference(g, feeds)[g.outputs[0].name]
    got = tvm_backend.compile_graph(g).run(feeds)[g.outputs[0].name]
    _check(g, feeds, got, want, bits=bits, block_size=block_size, lead=lead, k=k, what=f"int{bits} b{block_size}")


@pytest.mark.parametrize("bits,symmetric,vnni", [(4, False, True), (4, True, True), (4, False, False), (8, False, True)],
                         ids=["int4-asym", "int4-sym", "int4-fp32", "int8"])
def test_quant_linear_symbolic_rows(bits, symmetric, vnni, monkeypatch):
    """One build serves any batch and length (the kernel's row count is a variable): whole
    groups of rows, the remainder one at a time, and a single row (decode); N (130) spans
    three panels, the last one padded. int4-fp32: the fp32 panel GEMV that 4-bit weights
    take on a CPU without VNNI."""
    from graphopt.backends.tvm import quant_panels

    if not vnni:
        monkeypatch.setattr(quant_panels, "vnni_available", lambda: False)
    g, _ = _quant_linear_graph(("batch", "seq"), 130, 96, bits, 32, symmetric=symmetric)
    compiled = tvm_backend.compile_graph(g)
    for shape in ((1, 1), (2, 17), (3, 5), (1, 4)):
        feeds = {"x": RNG.standard_normal(shape + (96,)).astype(np.float32)}
        want = run_reference(g, feeds)[g.outputs[0].name]
        _check(g, feeds, compiled.run(feeds)[g.outputs[0].name], want, bits=bits, block_size=32, lead=("batch", "seq"),
               k=96, what=str(shape))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quant_gather_matches_reference(bits, symmetric):
    k, rows = 3 * 32 - 5, 50
    packed, scales, zp = quantize_blockwise(RNG.standard_normal((rows, k)).astype(np.float32), bits, 32, symmetric)
    g = Graph("quant_gather")
    b = Builder(g)
    idx = g.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
    ins = [b.const(packed, "packed"), idx, b.const(scales, "scales")] + ([] if zp is None else [b.const(zp, "zp")])
    g.outputs = [b.op("QuantGather", *ins, domain="graphopt", K=k, bits=bits, block_size=32)]
    feeds = {"ids": np.array([[0, 49, 7], [-1, 3, 3]], np.int64)}  # -1: the last row, as ONNX Gather
    want = run_reference(g, feeds)[g.outputs[0].name]
    got = tvm_backend.compile_graph(g).run(feeds)[g.outputs[0].name]
    assert_close(got, want, rtol=0, atol=0, what=f"int{bits}")  # the same arithmetic: exact


def test_accuracy_level_option_chooses_the_arithmetic(tmp_path):
    """`quant_accuracy_level=0`: fp32 arithmetic, equal to the reference kernel; the default
    (auto): X rounded to int8 where the CPU has VNNI, within that rounding's bound; the
    manifest fields say which; a value the option does not take is the user's error."""
    from graphopt.backends.tvm.quant_panels import vnni_available
    from graphopt.backends.tvm.runtime import save
    from graphopt.errors import UserError

    g, feeds = _quant_linear_graph((1, 1), 70, 96, 4, 32, symmetric=False)
    want = run_reference(g, feeds)[g.outputs[0].name]
    exact = tvm_backend.compile_graph(g, options={"quant_accuracy_level": "0"}).run(feeds)[g.outputs[0].name]
    assert_close(exact, want, rtol=0, atol=_tolerance(want, 96), what="quant_accuracy_level=0")
    for name in ("exact", "auto"):
        (tmp_path / name).mkdir()
    assert save(g, tmp_path / "exact", "cpu", {"quant_accuracy_level": "0"})["quant_accuracy_level"] == 0
    fields = save(g, tmp_path / "auto", "cpu")
    assert fields["quant_accuracy_level"] == (4 if vnni_available() else 0)
    got = tvm_backend.compile_graph(g).run(feeds)[g.outputs[0].name]
    _check(g, feeds, got, want, bits=4, block_size=32, lead=(1, 1), k=96, what="auto")
    with pytest.raises(UserError, match="quant_accuracy_level"):
        tvm_backend.compile_graph(g, options={"quant_accuracy_level": "2"})


def test_tied_head_and_embedding_share_one_panel_copy():
    """An embedding lookup and the LM head tied to it (one quantized table): both run on the
    table stored once, in column panels; the logits equal the reference kernels'."""
    from graphopt.backends.tvm.lowering import lower_graph, prepare
    from graphopt.backends.tvm.quant_panels import vnni_available

    vocab, hidden = 150, 64  # vocab: three panels, the last one padded
    packed, scales, zp = quantize_blockwise(RNG.standard_normal((vocab, hidden)).astype(np.float32), 4, 32, False)
    g = Graph("tied")
    b = Builder(g)
    ids = g.add_input("ids", TensorType(DType.INT64, ("batch", "seq")))
    table = [b.const(packed, "table"), b.const(scales, "table_scales"), b.const(zp, "table_zp")]
    h = b.op("QuantGather", table[0], ids, *table[1:], domain="graphopt", K=hidden, bits=4, block_size=32)
    g.outputs = [b.op("QuantLinear", h, *table, domain="graphopt", K=hidden, N=vocab, bits=4, block_size=32)]
    _, params = lower_graph(prepare(g, pack_weights=True), pack_weights=True, int8_activations=vnni_available())  # as a CPU build does
    layout = "vnni64" if _int8_path(4, (1, 1)) else "panels64"
    assert sorted(name for name, _ in params) == [f"table:{layout}", "table_scales:panels64", "table_zp:panels64"]
    feeds = {"ids": np.array([[0, 149, 64], [-1, 63, 7]], np.int64)}
    want = run_reference(g, feeds)[g.outputs[0].name]
    got = tvm_backend.compile_graph(g).run(feeds)[g.outputs[0].name]
    x = dequantize_blockwise(packed, scales, zp, 4, 32, hidden)[feeds["ids"]]  # the head's input: the gathered rows
    _check(g, {"x": x}, got, want, bits=4, block_size=32, lead=("batch", "seq"), k=hidden, what="tied head")


# --------------------------------------------------------------------------------------
# Structure: the lowered TIR holds no float buffer as large as the weight


_BUFFER = re.compile(r'(\w+)\s*[:=]\s*T\.(?:Buffer|alloc_buffer|alloc_local|alloc_shared)\(\(')
_DIM = re.compile(r"(?:T\.int\d+\()?(\d+)\)?")


def _buffers_in(script: str):
    """(name, dims text, dtype) of each buffer declared in printed TIR."""
    for m in _BUFFER.finditer(script):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(script[i], 0)
            i += 1
        dtype = re.match(r'\s*,\s*"(\w+)"', script[i:])
        yield m.group(1), script[m.end():i - 1], dtype.group(1) if dtype else "float32"


def _split_dims(dims: str) -> list[str]:
    """The dims of a printed shape, split at the commas outside parentheses and quotes."""
    out, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(dims):
        quoted ^= c == '"'
        depth += {"(": 1, ")": -1}.get(c, 0) if not quoted else 0
        if c == "," and depth == 0 and not quoted:
            out.append(dims[start:i])
            start = i + 1
    return [d.strip() for d in out + [dims[start:]] if d.strip()]


def _float_buffers(mod) -> dict[str, list[tuple[str, int | None]]]:
    """Per PrimFunc, (name, elements) of every float buffer it takes or allocates (a
    symbolic dim, a count of rows, counts 1: a weight's dims are static), after TVM's own buffer compaction: a tile computed under a loop
    shrinks to the tile. Read from the printed TIR (TVM 0.27 has no Python statement visitor)."""
    import tvm
    from tvm import s_tir, tirx

    lower = tvm.transform.Sequential([
        s_tir.transform.LowerCrossThreadReduction(), s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerOpaqueBlock(),
    ])
    prims = tvm.IRModule({gv: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)})
    out = {}
    for gv, func in lower(prims).functions_items():
        found = []
        for name, dims, dtype in _buffers_in(func.script()):
            if dtype.startswith("float"):
                sizes = [_DIM.fullmatch(d.strip()) for d in _split_dims(dims)]
                found.append((name, int(np.prod([int(m.group(1)) if m else 1 for m in sizes]))))
        out[gv.name_hint] = found
    return out


def _optimized(g: Graph, target_kind: str, pack_weights: bool = False):
    import tvm

    from graphopt.backends.tvm.build import cpu_target_spec, cuda_target_spec, optimize_module
    from graphopt.backends.tvm.lowering import lower_graph, prepare

    from graphopt.backends.tvm.quant_panels import vnni_available

    mod, _ = lower_graph(prepare(g, pack_weights=pack_weights), pack_weights=pack_weights, int8_activations=pack_weights and vnni_available())
    spec = cpu_target_spec() if target_kind == "cpu" else cuda_target_spec("sm_80")
    return optimize_module(mod, tvm.target.Target(spec))


@pytest.mark.parametrize("lead", [(1, 1), ("batch", "seq"), (2, 17)], ids=["gemv", "gemv-rows", "matmul"])
@pytest.mark.parametrize("target", ["cpu", "cpu-panels", "cuda"])
def test_no_float_weight_in_memory(lead, target):
    from graphopt.backends.tvm.quant_panels import ATTR
    from graphopt.backends.tvm.schedules_quant import KERNEL_ATTR

    n, k = 96, 256  # the weight (24,576 floats) is larger than any activation here (34 x 256 or rows x 256)
    g, _ = _quant_linear_graph(lead, n, k, 4, 32, symmetric=False)
    panels = target == "cpu-panels" and lead != (2, 17)  # a static row count above one: the matmul form
    mod = _optimized(g, target.split("-")[0], pack_weights=target == "cpu-panels")
    kernels = [gv.name_hint for gv, f in mod.functions_items()
               if getattr(f, "attrs", None) is not None and (ATTR if panels else KERNEL_ATTR) in f.attrs
               and not gv.name_hint.startswith("quantize_rows")]  # the VNNI path's int8 copy of X: not the GEMV
    assert len(kernels) == 1, f"the fused kernel is not in the module: {[gv.name_hint for gv in mod.get_global_vars()]}"
    assert mod[kernels[0]].attrs["tirx.is_scheduled"], "the fused kernel was left unscheduled"
    buffers = _float_buffers(mod)
    expected = ("acc", "block") if panels else ("dequantize_local", "quant_matmul")
    assert any(name.startswith(expected) for name, _ in buffers[kernels[0]]), buffers[kernels[0]]
    too_big = {f: [(b, size) for b, size in bufs if size >= n * k // 2] for f, bufs in buffers.items()}
    assert not any(too_big.values()), f"a float buffer as large as the weight: {too_big}"


# --------------------------------------------------------------------------------------
# CUDA: built (nvcc or NVRTC) where there is no GPU; run only where there is one


def _cuda_build_possible() -> str | None:
    """None where this TVM can build for cuda (code generation and nvcc or NVRTC), else why not."""
    from graphopt.errors import UserError

    try:
        tvm_backend.check_target("cuda")
    except UserError as e:
        return str(e)
    return None


@pytest.mark.skipif(_cuda_build_possible() is not None, reason=str(_cuda_build_possible()))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("lead", [("batch", "seq"), (2, 17)], ids=["gemv", "matmul"])
def test_cuda_kernel_builds_and_runs_where_a_gpu_is(bits, lead, tmp_path):
    import tvm

    from graphopt.backends.tvm.build import build, cuda_target_spec
    from graphopt.backends.tvm.lowering import lower_graph, prepare

    g, feeds = _quant_linear_graph(lead, 37, 123, bits, 32, symmetric=False, bias=True)
    mod, params = lower_graph(prepare(g))
    executable = build(mod, cuda_target_spec())  # TVM refuses a GPU kernel no schedule bound to threads
    executable.export_library(str(tmp_path / "model.so"))
    assert f"quant_linear_int{bits}_kernel".encode() in (tmp_path / "model.so").read_bytes()
    dev = tvm.cuda(0)
    if not dev.exist or tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        pytest.skip("built for cuda; no GPU (or no CUDA runtime in this TVM) to run it on")
    vm = tvm.relax.VirtualMachine(executable, dev)
    args = [tvm.runtime.tensor(feeds["x"], dev)] + [tvm.runtime.tensor(a, dev) for _, a in params]
    got = vm["main"](*args)[0].numpy()
    want = run_reference(g, feeds)[g.outputs[0].name]
    assert_close(got, want, rtol=0, atol=_tolerance(want, 123), what=f"cuda int{bits}")
