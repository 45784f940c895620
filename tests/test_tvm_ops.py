"""Every TVM lowering rule against the reference interpreter, one op at a time.

Each case is a one-node graph: graph inputs (some with a symbolic dim) and constant inputs
(initializers, which the backend sees as compile-time values). `test_every_rule_has_a_case`
keeps the table complete: a new rule without a case fails it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graphopt.testing import require_installed  # noqa: E402

require_installed("tvm", "apache-tvm")  # installed but broken: fail, not skip

from graphopt.builder import Builder  # noqa: E402
from graphopt.dtypes import DType  # noqa: E402
from graphopt.interpreter import run as run_reference  # noqa: E402
from graphopt.ir import Graph, TensorType  # noqa: E402
from graphopt.testing import assert_close  # noqa: E402

import graphopt.backends.tvm as tvm_backend  # noqa: E402

RNG = np.random.default_rng(0)
F32 = np.float32


def f32(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(F32)


def i64(*values):
    return np.array(values, np.int64)


@dataclasses.dataclass
class Case:
    op: str
    inputs: list  # arrays: a graph input; ("const", array): an initializer; None: absent
    attrs: dict = dataclasses.field(default_factory=dict)
    domain: str = ""
    outputs: int = 1
    symbolic: dict = dataclasses.field(default_factory=dict)  # input index -> {axis: symbol}
    id: str = ""
    atol: float = 1e-6  # float outputs (rtol 1e-5)

    def graph(self) -> tuple[Graph, dict]:
        g = Graph(f"one_{self.op}")
        b = Builder(g)
        args, feeds = [], {}
        for i, a in enumerate(self.inputs):
            if a is None:
                args.append(None)
            elif isinstance(a, tuple):
                args.append(b.const(a[1], f"c{i}"))
            else:
                shape = list(a.shape)
                for axis, sym in self.symbolic.get(i, {}).items():
                    shape[axis] = sym
                args.append(g.add_input(f"x{i}", TensorType(DType.from_numpy(a.dtype), tuple(shape))))
                feeds[f"x{i}"] = a
        out = b.op(self.op, *args, domain=self.domain, n_out=self.outputs, **self.attrs)
        g.outputs = list(out) if isinstance(out, tuple) else [out]
        return g, feeds


def C(v):
    return ("const", np.asarray(v))


BATCH = {0: "batch"}
SEQ = {1: "seq"}


def _moe_cases() -> list:
    """graphopt.MoE: 3 experts, k=2, the router's choice of distinct experts per token."""
    tokens, k, experts, hidden, inner = 5, 2, 3, 8, 6
    index = np.stack([RNG.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int64)
    weights = f32(tokens, k, low=0.1, high=1.0)
    return [Case("MoE", [f32(tokens, hidden), index, weights, C(f32(experts, 2 * inner, hidden)),
                         C(f32(experts, hidden, inner))], {"activation": "silu", "gated": 1}, domain="graphopt",
                 symbolic={0: BATCH, 1: BATCH, 2: BATCH}),
            Case("MoE", [f32(tokens, hidden), index, weights, C(f32(experts, inner, hidden)),
                         C(f32(experts, hidden, inner))], {"activation": "relu", "gated": 0}, domain="graphopt",
                 id="not-gated"),
            # sizes that fill the panels: only the chosen experts run (moe_panels.py), decode and prefill
            Case("MoE", [f32(1, hidden * 8), index[:1], weights[:1], C(f32(experts, 2 * 32, hidden * 8, low=-0.3, high=0.3)),
                         C(f32(experts, hidden * 8, 32, low=-0.3, high=0.3))], {"activation": "silu", "gated": 1}, domain="graphopt",
                 id="sparse-one-token"),
            Case("MoE", [f32(2, 3, hidden * 8), np.concatenate([index, index[:1]]).reshape(2, 3, k),
                         np.concatenate([weights, weights[:1]]).reshape(2, 3, k),
                         C(f32(experts, 2 * 32, hidden * 8, low=-0.3, high=0.3)), C(f32(experts, hidden * 8, 32, low=-0.3, high=0.3)), C(f32(experts, 64)),
                         C(f32(experts, hidden * 8))],
                 {"activation": "silu", "gated": 1, "alpha": 1.702, "beta": 1.0, "limit": 1.5}, domain="graphopt",
                 symbolic={0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}, 2: {0: "batch", 1: "seq"}},
                 id="sparse-batch-seq-biases-clamped"),
            # GPT-OSS's: biases, a clamped SwiGLU (a limit some of the gate and up values pass)
            Case("MoE", [f32(tokens, hidden), index, weights, C(f32(experts, 2 * inner, hidden)),
                         C(f32(experts, hidden, inner)), C(f32(experts, 2 * inner)), C(f32(experts, hidden))],
                 {"activation": "silu", "gated": 1, "alpha": 1.702, "beta": 1.0, "limit": 1.5}, domain="graphopt",
                 id="biases-clamped")]


def _quant_moe_cases() -> list:
    """graphopt.QuantMoE (its own generator: the cases above keep their inputs): on the CPU only
    the chosen experts (quant_panels.moe_gemv_source), at one token and at [batch, seq]; panels
    padded (n_up 96), K padded to whole blocks (inner 48, block 32), int8, biases and GPT-OSS's clamp."""
    from graphopt.testing import quant_moe_inputs

    rng = np.random.default_rng(7)
    cases = []
    for bits, symmetric, inner, lead, extra, cid in (
            (4, False, 32, (1,), False, "int4-one-token"),
            (4, True, 48, (2, 3), True, "int4-symmetric-padded-batch-seq-biases-clamped"),
            (8, False, 32, (5,), False, "int8"),
            (4, False, 32, (3,), False, "int4-outside-and-repeated-choices")):
        x, index, weights, quant, _ = quant_moe_inputs(rng, experts=4, hidden=64, inner=inner, bits=bits,
                                                       symmetric=symmetric, lead=lead)
        if cid.startswith("int4-outside"):  # -1 and 4 choose nothing; expert 1 twice counts twice
            index = np.array([[0, -1], [4, 2], [1, 1]], np.int64)
        zps = quant[4:] if not symmetric else [None, None]
        biases = [C(rng.uniform(-1, 1, (4, 2 * inner)).astype(F32)), C(rng.uniform(-1, 1, (4, 64)).astype(F32))]
        form = {"alpha": 1.702, "beta": 1.0, "limit": 1.5} if extra else {}
        sym = {0: "batch", 1: "seq"} if len(lead) == 2 else {0: "batch"}
        cases.append(Case("QuantMoE", [x, index, weights] + [C(a) for a in quant[:4]]
                          + [None if z is None else C(z) for z in zps] + (biases if extra else []),
                          {"bits": bits, "block_size": 32, "hidden": 64, "inner": inner, "activation": "silu",
                           "gated": 1, **form}, domain="graphopt", symbolic={0: sym, 1: sym, 2: sym}, id=cid,
                          # outputs near 0 are differences of partial sums up to ~4, summed per block then
                          # scaled (the reference: dequantized, then one sum): float32 rounding of a few 1e-6
                          atol=1e-5))
    return cases


def _quant_linear_cases() -> list:
    from graphopt.ops.quant_format import quantize_blockwise

    cases = []
    for bits, block, k, symmetric, bias, act in ((4, 16, 40, False, True, "gelu"), (8, 32, 64, True, False, "")):
        packed, scales, zp = quantize_blockwise(f32(6, k), bits, block, symmetric)
        ins = [f32(2, 3, k), C(packed), C(scales), None if zp is None else C(zp)] + ([C(f32(6))] if bias else [])
        cases.append(Case("QuantLinear", ins, {"K": k, "N": 6, "bits": bits, "block_size": block, "activation": act},
                          domain="graphopt", symbolic={0: SEQ}, id=f"int{bits}-b{block}"))
        cases.append(Case("QuantGather", [C(packed), RNG.integers(0, 6, (2, 3)), C(scales)] + ([] if zp is None else [C(zp)]),
                          {"K": k, "bits": bits, "block_size": block}, domain="graphopt", symbolic={1: SEQ},
                          id=f"gather-int{bits}-b{block}"))
    w8 = np.clip(np.round(f32(16, 6) * 60), -127, 127).astype(np.int8)
    cases.append(Case("DynamicQuantLinear", [f32(2, 3, 16), C(w8), C(f32(6, low=0.01, high=0.02)), None, C(f32(6))],
                      {"activation": "relu"}, domain="graphopt", symbolic={0: SEQ}, id="per-channel"))
    # quantize-static's QDQ pairs: u8 activations per tensor (with ties, which round to even), i8 weights per axis
    x = np.concatenate([f32(2, 3, 8), np.full((2, 3, 2), [1.25, 1.75], np.float32)], axis=-1)  # 2.5 and 3.5: ties
    cases.append(Case("QuantizeLinear", [x, C(np.float32(0.5)), C(np.uint8(128))], symbolic={0: SEQ}, id="u8"))
    cases.append(Case("QuantizeLinear", [f32(4, 6), C(f32(6, low=0.01, high=0.02)), C(np.zeros(6, np.int8))],
                      {"axis": 1}, id="i8-per-axis"))
    cases.append(Case("DequantizeLinear", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10, C(np.float32(0.1)),
                                           C(np.uint8(128))], id="u8"))
    cases.append(Case("DequantizeLinear", [C(w8), C(f32(6, low=0.01, high=0.02))], {"axis": 1}, id="i8-per-axis"))
    return cases

CASES = [
    # elementwise
    *[Case(op, [f32(2, 3, 4), f32(3, 1)], symbolic={0: BATCH}) for op in ("Add", "Sub", "Mul", "Max", "Min")],
    Case("Div", [f32(2, 3), f32(2, 3, low=0.5)]),
    Case("Div", [i64(7, -7, 7, -7, 0), i64(2, 2, -2, -2, 3)], id="int-truncates"),
    Case("Pow", [f32(2, 3, low=0.1), f32(2, 3)]),
    Case("Pow", [f32(2, 3), C(np.float32(2.0))], id="square"),
    *[Case(op, [f32(2, 3), f32(3)]) for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")],
    *[Case(op, [RNG.random((2, 3)) < 0.5, RNG.random((3,)) < 0.5]) for op in ("And", "Or", "Xor")],
    *[Case(op, [i64(12, 5, -3), i64(10, 3, 6)]) for op in ("BitwiseAnd", "BitwiseOr")],
    Case("Sum", [f32(2, 3), f32(3), f32(2, 1)]),
    Case("Mean", [f32(2, 3), f32(3)]),
    *[Case(op, [f32(2, 5)], symbolic={0: {0: "n"}}) for op in (
        "Neg", "Abs", "Exp", "Tanh", "Sigmoid", "Relu", "Erf", "Sin", "Cos", "Floor", "Ceil", "Sign",
        "Softplus", "Reciprocal", "Identity")],
    *[Case(op, [f32(2, 5, low=0.1)]) for op in ("Sqrt", "Log")],
    Case("Round", [np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1.2, -2.7], F32)]),
    Case("Not", [RNG.random((4,)) < 0.5]),
    Case("IsNaN", [np.array([1.0, np.nan, np.inf], F32)]),
    Case("IsInf", [np.array([1.0, np.nan, np.inf, -np.inf], F32)]),
    Case("LeakyRelu", [f32(3, 4)], {"alpha": 0.2}),
    Case("Gelu", [f32(3, 4)]),
    Case("Gelu", [f32(3, 4)], {"approximate": "tanh"}, id="tanh"),
    Case("Clip", [f32(3, 4), C(np.float32(-0.5)), C(np.float32(0.7))]),
    Case("Clip", [f32(3, 4), None, C(np.float32(0.7))], id="max-only"),
    Case("Where", [RNG.random((2, 1, 4)) < 0.5, f32(3, 4), f32(2, 3, 1)]),
    Case("Cast", [f32(2, 3) * 3], {"to": 7}),
    Case("Cast", [i64(0, 1, 3)], {"to": 9}, id="to-bool"),
    Case("Dropout", [f32(2, 3)]),
    # linear algebra, normalization, reductions
    Case("MatMul", [f32(2, 5, 3), C(f32(3, 4))], symbolic={0: BATCH}),
    Case("MatMul", [f32(2, 2, 5, 3), f32(2, 2, 3, 4)], id="batched"),
    Case("Gemm", [f32(5, 3), C(f32(4, 3)), C(f32(4))], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    Case("Gemm", [f32(3, 5), f32(3, 4)], {"transA": 1}, id="transA"),
    # constant weights with a multiple of 32 columns: stored in column panels [N / 32, K, 32]
    Case("MatMul", [f32(2, 5, 24), C(f32(24, 64))], symbolic={0: {0: "batch", 1: "seq"}}, id="panels"),
    Case("Gemm", [f32(5, 24), C(f32(96, 24)), C(f32(96))], {"transB": 1}, id="panels"),
    Case("Softmax", [f32(2, 3, 6)], {"axis": -1}, symbolic={0: BATCH}),
    Case("LogSoftmax", [f32(2, 6)], {"axis": 1}),
    Case("LayerNormalization", [f32(2, 3, 8), C(f32(8)), C(f32(8))], {"epsilon": 1e-5}, symbolic={0: {1: "seq"}}),
    Case("LayerNormalization", [f32(2, 4, 3), C(f32(4, 3))], {"axis": 1}, id="two-axes-no-bias"),
    *[Case(op, [f32(2, 3, 4, low=0.5), C(i64(1))], {"keepdims": 1}) for op in (
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare", "ReduceL2")],
    Case("ReduceSum", [f32(2, 3, 4), C(i64(0, -1))], {"keepdims": 0}, id="two-axes"),
    Case("ReduceMean", [f32(2, 3)], {"keepdims": 0}, id="all-axes"),
    Case("ArgMax", [f32(3, 5)], {"axis": 1, "keepdims": 0}),
    Case("ArgMin", [f32(3, 5)], {"axis": 0}),
    Case("CumSum", [f32(3, 4), C(np.int64(1))]),
    Case("CumSum", [f32(3, 4), C(np.int64(0))], {"exclusive": 1, "reverse": 1}, id="exclusive-reverse"),
    Case("Trilu", [f32(2, 4, 4), C(np.int64(1))], {"upper": 0}),
    Case("Trilu", [f32(4, 5)], id="upper"),
    # shapes and data movement
    Case("Shape", [f32(2, 3, 4)], {"start": 1}, symbolic={0: {0: "batch", 2: "seq"}}),
    Case("Size", [f32(2, 3)], symbolic={0: BATCH}),
    Case("Constant", [], {"value": f32(3, 40)}),
    Case("Constant", [], {"value": i64(2, 5)}, id="ints"),
    Case("Reshape", [f32(2, 3, 4), C(i64(0, -1))], symbolic={0: {0: "batch", 1: "seq"}}),
    Case("Reshape", [f32(2, 12), C(i64(2, 3, 4))], id="static"),
    Case("Flatten", [f32(2, 3, 4)], {"axis": 2}, symbolic={0: BATCH}),
    Case("Transpose", [f32(2, 3, 4)], {"perm": [1, 2, 0]}, symbolic={0: BATCH}),
    Case("Transpose", [f32(2, 3)], id="default-perm"),
    Case("Unsqueeze", [f32(2, 3), C(i64(0, -1))], symbolic={0: SEQ}),
    Case("Squeeze", [f32(2, 1, 3, 1), C(i64(1, -1))]),
    Case("Squeeze", [f32(1, 3, 1)], id="all-unit"),
    Case("Concat", [f32(2, 3), f32(2, 5), C(f32(2, 1))], {"axis": 1}, symbolic={0: BATCH, 1: BATCH}),
    Case("Concat", [C(i64(2)), C(i64(3, 4))], {"axis": 0}, id="known"),
    Case("Split", [f32(2, 7)], {"axis": 1, "num_outputs": 3}, outputs=3),
    Case("Split", [f32(2, 6), C(i64(1, 5))], {"axis": -1}, outputs=2, id="sizes"),
    Case("Split", [f32(2, 6)], {"axis": 0, "num_outputs": 2}, outputs=2, symbolic={0: BATCH}, id="symbolic"),
    Case("Slice", [f32(5, 6), C(i64(1, -4)), C(i64(4, np.iinfo(np.int64).max)), C(i64(0, 1))], symbolic={0: {0: "n"}}),
    Case("Slice", [f32(4, 9), C(i64(1)), C(i64(8)), C(i64(1)), C(i64(3))], id="step"),
    Case("Gather", [f32(10, 4), np.array([[0, 3], [9, -1]], np.int64)], {"axis": 0}),
    Case("Gather", [f32(3, 10, 4), C(np.array([2, -1], np.int64))], {"axis": 1}, symbolic={0: BATCH}, id="const-idx"),
    Case("Gather", [f32(3, 4), C(np.int64(1))], {"axis": 1}, id="scalar-idx"),
    Case("GatherElements", [f32(3, 4), np.array([[0, 3, -1, 2]] * 3, np.int64)], {"axis": 1}),
    Case("GatherND", [f32(2, 3, 4), np.array([[0, 1], [1, 2]], np.int64)]),
    Case("GatherND", [f32(2, 3, 4), np.array([[1], [2]], np.int64)], {"batch_dims": 1}, id="batch-dims"),
    Case("Expand", [f32(3, 1), C(i64(2, 1, 4))]),
    Case("Tile", [f32(2, 3), C(i64(2, 1))]),
    Case("Range", [C(np.float32(0.5)), C(np.float32(30.0)), C(np.float32(0.25))]),
    Case("Range", [C(np.int64(0)), C(np.int64(7)), C(np.int64(2))], id="ints"),
    Case("ConstantOfShape", [C(i64(2, 40))], {"value": np.array([1.5], F32)}),
    Case("ConstantOfShape", [C(i64(3, 1))], {"value": np.array([-np.inf], F32)}, id="minus-infinity"),
    # graphopt ops
    Case("RMSNorm", [f32(2, 3, 8), C(f32(8))], {"epsilon": 1e-6}, domain="graphopt", symbolic={0: SEQ}),
    Case("RMSNorm", [f32(2, 3, 4), C(f32(1, 4))], {"axis": 1}, domain="graphopt", id="two-axes"),
    Case("RotaryEmbedding", [f32(2, 4, 5, 8), f32(2, 5, 4), f32(2, 5, 4)], domain="graphopt",
         symbolic={0: {2: "seq"}, 1: SEQ, 2: SEQ}),
    Case("RotaryEmbedding", [f32(2, 5, 16), C(f32(32, 2)), C(f32(32, 2)), np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])],
         {"num_heads": 2, "interleaved": 1, "rotary_embedding_dim": 4}, domain="graphopt", id="3d-partial-interleaved"),
    Case("Attention", [f32(2, 4, 5, 8), f32(2, 4, 5, 8), f32(2, 4, 5, 8)], {"causal": 1}, domain="graphopt",
         symbolic={i: {2: "seq"} for i in range(3)}),
    Case("Attention", [f32(2, 5, 16), f32(2, 5, 4), f32(2, 5, 4), RNG.random((2, 1, 5, 8)) < 0.7,
                       f32(2, 1, 3, 4), f32(2, 1, 3, 4)],
         {"num_heads": 4, "kv_num_heads": 1, "causal": 1, "softcap": 3.0}, domain="graphopt", outputs=3,
         symbolic={0: SEQ, 1: SEQ, 2: SEQ, 3: {2: "seq", 3: "total"}, 4: {2: "past"}, 5: {2: "past"}},
         id="gqa-mask-past-softcap"),  # the mask's `total` is checked against past + seq at run time
    Case("Attention", [f32(1, 2, 3, 4), f32(1, 2, 6, 4), f32(1, 2, 6, 4), np.zeros((1, 2, 3, 6), F32) - np.inf],
         {"scale": 0.3}, domain="graphopt", id="fully-masked"),
    # attention sinks (GPT-OSS): each head's logit in its softmax's sum; a row that sees no key attends it alone
    Case("Attention", [f32(2, 5, 16), f32(2, 5, 8), f32(2, 5, 8), RNG.random((2, 1, 5, 8)) < 0.7,
                       f32(2, 2, 3, 4), f32(2, 2, 3, 4), None, C(np.array([0.5, -1.0, 4.0, 1.5], F32))],
         {"num_heads": 4, "kv_num_heads": 2, "causal": 1}, domain="graphopt", outputs=3,
         symbolic={0: SEQ, 1: SEQ, 2: SEQ, 3: {2: "seq", 3: "total"}, 4: {2: "past"}, 5: {2: "past"}},
         id="gqa-mask-past-sinks"),
    Case("Attention", [f32(1, 2, 3, 4), f32(1, 2, 6, 4), f32(1, 2, 6, 4), np.zeros((1, 2, 3, 6), F32) - np.inf,
                       None, None, None, C(np.array([3.0, -2.0], F32))], {"softcap": 2.0}, domain="graphopt",
         id="fully-masked-sinks-softcap"),  # softcap: the Relax ops rather than the fused kernel
    Case("Linear", [f32(2, 3, 4), C(f32(5, 4)), C(f32(5))], {"trans_w": 1, "activation": "gelu"},
         domain="graphopt", symbolic={0: BATCH}),
    Case("Linear", [f32(3, 4), C(f32(4, 5))], {"activation": "silu"}, domain="graphopt", id="no-bias"),
    Case("Linear", [f32(2, 7, 40), C(f32(64, 40)), C(f32(64))], {"trans_w": 1, "activation": "gelu"},
         domain="graphopt", symbolic={0: SEQ}, id="panels"),
    Case("Linear", [f32(1, 40), C(f32(40, 32))], domain="graphopt", id="panels-one-row"),
    Case("GatedLinear", [f32(2, 5, 24), C(f32(24, 48)), C(f32(24, 48)), C(f32(48)), C(f32(48))],
         {"activation": "silu"}, domain="graphopt", symbolic={0: SEQ}, id="panels"),
    Case("GatedLinear", [f32(2, 3, 4), C(f32(4, 6)), C(f32(4, 6)), C(f32(6)), C(f32(6))], {"activation": "silu"},
         domain="graphopt",
         symbolic={0: SEQ}),
    Case("SkipNorm", [f32(2, 3, 8), f32(2, 3, 8), C(f32(8)), C(f32(8)), C(f32(8))], domain="graphopt", outputs=2,
         symbolic={0: SEQ, 1: SEQ}),
    Case("SkipNorm", [f32(2, 3, 8), f32(2, 3, 8), C(f32(8))], {"norm": "rms", "epsilon": 1e-6},
         domain="graphopt", id="rms"),
    *_quant_linear_cases(),
    *_moe_cases(),
    Case("TopK", [f32(4, 6), C(i64(3))], outputs=2, symbolic={0: BATCH}),  # a mixture-of-experts router's
    # a router's mask: ones scattered at each token's chosen experts (negative indices count from the end)
    Case("ScatterElements", [np.zeros((4, 6), F32), np.array([[0, 5], [2, -1], [1, 3], [4, 0]], np.int64),
                             np.ones((4, 2), F32)], {"axis": 1}, symbolic={0: BATCH, 1: BATCH, 2: BATCH}),
    Case("ScatterND", [np.zeros((4, 3), F32), np.array([[[0, 1], [2, 0]], [[3, 2], [1, 1]]], np.int64),
                       np.ones((2, 2), F32)]),  # elements
    Case("ScatterND", [f32(4, 3), np.array([[2], [0]], np.int64), f32(2, 3)], {"reduction": "add"},
         id="rows-add"),
    Case("ScatterElements", [f32(4, 6), np.array([[0, 2], [3, 3], [1, 3]], np.int64), f32(3, 2)],
         {"axis": 0, "reduction": "add"}, id="add-axis0"),
    Case("TopK", [f32(4, 6, 5), C(i64(2))], {"axis": 1, "largest": 0}, outputs=2, id="smallest-axis1"),
    # (added later: after the cases above, so that their random inputs stay as they were)
    *[Case(op, [f32(2, 3, 4, low=0.5), C(i64(1))], {"keepdims": 1}) for op in ("ReduceL1", "ReduceLogSum")],
    Case("ReduceL1", [f32(2, 3, 4), C(i64(0, -1))], {"keepdims": 0}, id="signed-two-axes"),
    *_quant_moe_cases(),
]


def _case_id(c: Case) -> str:
    name = f"{c.domain}.{c.op}" if c.domain else c.op
    return f"{name}-{c.id}" if c.id else name


def _ids(cases):
    seen: dict[str, int] = {}
    out = []
    for c in cases:
        i = _case_id(c)
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_rule_matches_reference(case: Case):
    g, feeds = case.graph()
    expected = run_reference(g, feeds)
    # fp32 arithmetic for 4-bit QuantLinear too (X rounded to int8 is checked against its bound in test_tvm_quant.py)
    actual = tvm_backend.compile_graph(g, options={"quant_accuracy_level": "0"}).run(feeds)
    for name, want in expected.items():
        got = actual[name]
        if want.dtype.kind == "f":  # transcendental kernels differ from numpy's in the last bits
            assert_close(got, want, rtol=1e-5, atol=case.atol, what=name)
        else:
            assert_close(got, want, what=name)


def test_a_constant_gather_index_outside_the_axis_is_an_error_naming_the_node():
    """ONNX's Gather with an index past the axis is an error; the lowering's clipped take would
    read the edge row instead, silently."""
    from graphopt.backends.tvm.lowering import LoweringError

    g = Graph("gather_outside")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 4)))
    g.outputs = [b.op("Gather", x, b.const(np.array([1, 4], np.int64), "idx"), axis=1)]
    with pytest.raises(LoweringError, match=r"\(Gather\): index 4 is outside an axis of 4"):
        tvm_backend.compile_graph(g)
    # A gather from a known 1-D value (a shape), taken when lowered: the same error.
    g = Graph("shape_gather_outside")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 4)))
    dim = b.op("Gather", b.op("Shape", x), b.const(np.array([2], np.int64), "idx"), axis=0)
    g.outputs = [b.op("Reshape", x, b.op("Concat", dim, b.const(np.array([-1], np.int64), "rest"), axis=0))]
    with pytest.raises(LoweringError, match=r"\(Gather\): index 2 is outside an axis of 2"):
        tvm_backend.compile_graph(g)


def test_quant_moe_runs_the_chosen_experts_on_the_cpu_and_decomposes_elsewhere(monkeypatch):
    """On the CPU each QuantMoE case is two moe_gemv kernels (one a projection, the chosen
    experts only); without panels (CUDA) prepare decomposes it: a QuantLinear per expert projection."""
    from graphopt.backends.tvm import quant_panels
    from graphopt.backends.tvm.lowering import prepare

    built = []
    make = quant_panels.moe_gemv_source
    monkeypatch.setattr(quant_panels, "moe_gemv_source", lambda **kw: built.append(kw) or make(**kw))
    for case in (c for c in CASES if c.op == "QuantMoE"):
        built.clear()
        g, _ = case.graph()
        tvm_backend.compile_graph(g, options={"quant_accuracy_level": "0"})
        assert [kw["per_choice"] for kw in built] == [False, True], case.id
        assert [n.op_type for n in prepare(g, pack_weights=True).nodes] == ["QuantMoE"]
        assert [n.op_type for n in prepare(g).nodes].count("QuantLinear") == 2 * 4


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_choice", [True, False])
def test_quant_moe_kernel_sources_parse_on_any_cpu(symmetric, per_choice):
    """The generated TVMScript of both QuantMoE kernels parses (indentation, buffers, indices),
    where the CPU runs neither the VNNI one nor (without VNNI) the test below."""
    from graphopt.backends.tvm import quant_panels

    dims = dict(experts=3, n_panels=2, n_blocks=2, block_size=32, symmetric=symmetric, choices=2,
                per_choice=per_choice)
    vnni = quant_panels.prim_func(quant_panels.moe_gemv_vnni_source(**dims))
    plain = quant_panels.prim_func(quant_panels.moe_gemv_source(k=48, bits=4, **dims))  # K padded to 2 blocks
    for func, n_params in ((vnni, 8), (plain, 6)):  # with zero points
        assert len(func.params) == n_params - symmetric and func.attrs[quant_panels.ATTR] == 1


def test_quant_moe_with_x_rounded_to_int8_where_the_cpu_has_vnni(monkeypatch):
    """The default arithmetic (quant_accuracy_level auto): 4-bit experts take the int8 VNNI GEMV
    where the CPU has it, each projection's input rounded to int8 per block of 32 (an element
    moves by at most its block's max|.| / 254); 8-bit experts keep the float arithmetic. X is
    fed already rounded (rounding it again changes nothing), so the one error left is the down
    projection's input rounded: bounded per output by sum over blocks of that step times
    sum |w| over the block, weighted by the router, as the expert's own numpy computes it."""
    from graphopt.backends.tvm import quant_panels
    from graphopt.ops.moe import activate_np
    from graphopt.ops.quant_moe import dequantized_experts, quant_moe_parts

    if not quant_panels.vnni_available():
        pytest.skip("this CPU has no AVX-512 VNNI: the float path (test_rule_matches_reference) is the only one")
    built = []
    make = quant_panels.moe_gemv_vnni_source
    monkeypatch.setattr(quant_panels, "moe_gemv_vnni_source", lambda **kw: built.append(kw) or make(**kw))

    def block_max(v: np.ndarray) -> np.ndarray:  # [.., K] -> [.., K / 32]: each block's max |v| (K padded)
        v = np.pad(np.abs(v), [(0, 0)] * (v.ndim - 1) + [(0, -v.shape[-1] % 32)])
        return v.reshape(v.shape[:-1] + (-1, 32)).max(-1)

    def rounded(x: np.ndarray) -> np.ndarray:
        step = np.repeat(block_max(x) / np.float32(127), 32, axis=-1)[..., :x.shape[-1]]
        return (np.rint(x / np.where(step > 0, step, 1)) * step).astype(np.float32)

    for case in (c for c in CASES if c.op == "QuantMoE"):
        built.clear()
        g, feeds = case.graph()
        feeds = dict(feeds, x0=rounded(feeds["x0"]))
        want = list(run_reference(g, feeds).values())[0].astype(np.float64)
        got = list(tvm_backend.compile_graph(g).run(feeds).values())[0]
        assert len(built) == (2 if case.attrs["bits"] == 4 else 0), case.id
        node = g.nodes[0]
        p = {k: (None if v is None else v.const_value) for k, v in quant_moe_parts(node).items()}
        up, down = dequantized_experts(node, p)
        alpha, beta, limit = (case.attrs.get(k, d) for k, d in (("alpha", 1.0), ("beta", 0.0), ("limit", 0.0)))
        inner = case.attrs["inner"]
        x, index, weights = (feeds[f"x{i}"].reshape(-1, feeds[f"x{i}"].shape[-1]) for i in range(3))
        bound = np.zeros((len(x), down.shape[1]))
        for t in range(len(x)):
            for e, w in zip(index[t], weights[t]):
                if not 0 <= e < len(up):
                    continue  # chooses nothing
                h = up[e].astype(np.float64) @ x[t] + (0 if p["up_bias"] is None else p["up_bias"][e])
                gate, u = h[:inner], h[inner:]
                if limit:
                    gate, u = np.minimum(gate, limit), np.clip(u, -limit, limit)
                act = gate / (1 + np.exp(-alpha * gate)) if alpha != 1.0 else activate_np(gate, "silu")
                steps = block_max(act * (u + beta)) / 254  # [inner / 32]
                sums = np.pad(np.abs(down[e]), [(0, 0), (0, -inner % 32)]).reshape(down.shape[1], -1, 32).sum(-1)
                bound[t] += w * (sums @ steps)  # [hidden]
        bound = bound.reshape(want.shape) + 1e-5 * np.abs(want).max()  # and float32's reordering
        excess = np.abs(got - want) - (bound if case.attrs["bits"] == 4 else 1e-5 * np.abs(want).max())
        assert excess.max() <= 0, (case.id, excess.max())


@pytest.mark.parametrize("largest", [1, 0])
def test_topk_of_a_whole_symbolic_axis_is_a_stable_sort(largest):
    """TopK with k the axis' own (symbolic) length, as JetMoE's router sorts its tokens: the full
    sort, ties (there are some) in index order as ONNX asks, at two lengths of one build."""
    g = Graph("topk_whole_axis")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT32, ("tokens", 3)))
    values, indices = b.op("TopK", x, b.op("Shape", x, start=0, end=1), n_out=2, axis=0, largest=largest)
    g.outputs = [values, indices]
    compiled = tvm_backend.compile_graph(g)
    for tokens in (7, 12):
        feeds = {"x": RNG.integers(0, 4, (tokens, 3)).astype(F32)}  # few values: ties
        want, got = run_reference(g, feeds), compiled.run(feeds)
        for name in want:
            assert_close(got[name], want[name], what=f"{name} at {tokens} tokens")


def test_moe_runs_the_chosen_experts_only_where_the_panels_fit(monkeypatch):
    """The MoE cases whose projections fill whole panels are built with moe_panels' GEMV (one per
    projection: the chosen experts only); the small ones keep the dense form."""
    from graphopt.backends.tvm import moe_panels

    built = []
    make = moe_panels.gemv_func
    monkeypatch.setattr(moe_panels, "gemv_func", lambda **kw: built.append(kw) or make(**kw))
    for case in (c for c in CASES if c.op == "MoE"):
        built.clear()
        g, _ = case.graph()
        tvm_backend.compile_graph(g)
        assert len(built) == (2 if case.id.startswith("sparse") else 0), case.id


def test_every_rule_has_a_case():
    from graphopt.registry import _LOWERINGS

    ruled = {(dom, op) for (backend, dom, op) in _LOWERINGS if backend == "tvm"}
    covered = {(c.domain, c.op) for c in CASES}
    assert ruled - covered == set(), f"TVM rules without a test case: {sorted(ruled - covered)}"


def test_every_graphopt_op_has_a_rule():
    from graphopt.registry import all_graphopt_ops, get_lowering

    missing = [d.name for d in all_graphopt_ops() if get_lowering("tvm", d.domain, d.name) is None]
    assert not missing, f"graphopt ops without a TVM rule (they fall back to decomposition): {missing}"


@pytest.mark.parametrize("transposed", [False, True])
def test_a_matmul_over_one_term_fused_with_a_residual_add_is_right(transposed):
    """An MLP pruned to one channel: x @ Wup [32, 1], then @ Wdown [1, 32] plus x. The K = 1
    matmul fused with the residual Add computed wrong values on TVM (max error 3.8 where the
    outputs are about 5), silently; it is lowered as the product it is."""
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.ir import Graph, TensorType

    rng = np.random.default_rng(0)
    g = Graph("mlp1")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", "seq", 32)))
    b = Builder(g)
    up = g.add_initializer("up", rng.standard_normal((32, 1)).astype(np.float32))
    down = rng.standard_normal((1, 32)).astype(np.float32)
    h = b.MatMul(x, up)
    y = (b.Gemm(b.Reshape(h, g.add_initializer("flat", np.array([-1, 1], np.int64))),
                g.add_initializer("downT", np.ascontiguousarray(down.T)), transB=1) if transposed
         else b.MatMul(h, g.add_initializer("down", down)))
    if transposed:
        y = b.Reshape(y, b.Shape(x))
    g.outputs = [b.Add(x, y)]
    feeds = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32)}
    want = feeds["x"] + (feeds["x"] @ up.const_value) @ down
    got = tvm_backend.compile_graph(g).run(feeds)[g.outputs[0].name]
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="x + (x @ up) @ down")
