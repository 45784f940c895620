"""The ONNX Runtime lowering: graphopt ops become ORT kernels where a rule says so, core ops
(opset 20) everywhere else, through the shared driver (`graphopt.lowering`).

A rule is registered per op with `graphopt.registry.register_lowering("onnxruntime", domain,
op)` and called as `rule(ctx, b, node)` with a `LoweringContext` (below); it returns the new
outputs or a string saying why it declines, in which case what it built is rolled back and
the node decomposed. Rules for core ops (`Gelu`) run last, once.

Lowered graphs hold `com.microsoft` nodes and ORT's own ONNX-domain ops
(`SimplifiedLayerNormalization`), which the IR's registry does not know: they are written to
ONNX as they are and never `verify()`d. Each com.microsoft node is built with explicit output
types (`output_types=[...]`), so that core ops built after it still get inferred types.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.lowering import LoweringReport, lower_graphopt_ops, lower_node  # noqa: F401  (LoweringReport: this backend's API)
from graphopt.registry import get_lowering

from graphopt.backends.onnxruntime.kernels import MS_DOMAIN, has_kernel

BACKEND = "onnxruntime"
_CREATED_BY = "lower-onnxruntime"


class LoweringContext:
    """Per-lowering state handed to every rule: the target, the kernel registry, and shape
    values shared between rules (one `Shape` per symbolic dimension, not one per layer)."""

    def __init__(self, graph: Graph, target: str, options: dict | None = None):
        self.graph = graph
        self.target = target
        # attention_kernel: "auto" (the measured choice), "gqa" or "mha" (that kernel where it
        # runs the site, else the decomposition), "onnx" (opset-23 Attention), "decompose".
        # skip_norm: "auto" (per target), "fused" (Skip*LayerNormalization), "split" (Add + norm).
        self.options = {"attention_kernel": "auto", "skip_norm": "auto", **(options or {})}
        self._dims: dict[object, Value] = {}
        # nodes of the input graph whose outputs a rule stopped reading (a Split that a kernel
        # now does itself): removed after lowering if nothing else reads them
        self.maybe_dead: list[Node] = []
        # the bit widths of the graph's weight-quantized linears, read before any rule rewrites
        # a node (a rule deciding by the whole model must not see it half lowered)
        self.weight_bits = {n.attr("bits", 4) for n in graph.nodes
                            if n.domain == GRAPHOPT_DOMAIN and n.op_type == "QuantLinear"}

    def generation_graph(self) -> bool:
        """A decoder that rewrite-kv-cache made (its metadata names the cache layout): run as
        prefill then one-token steps."""
        return "graphopt.kv_layout" in self.graph.metadata.metadata_props

    def has_kernel(self, domain: str, op: str, dtype) -> bool:
        return has_kernel(self.target, domain, op, dtype)

    def dim(self, b: Builder, value: Value, axis: int) -> Value:
        """A 1-D int64 tensor holding `value.shape[axis]`. For a symbolic dimension that a
        graph input also carries, the Shape is taken of that input, once per graph."""
        shape = value.type.shape if value.type is not None else None
        d = shape[axis] if shape is not None else None
        if isinstance(d, int):
            return b.const(np.array([d], np.int64), "dim")
        if isinstance(d, str):
            for inp in self.graph.inputs:
                s = inp.type.shape if inp.type is not None else None
                if s is not None and d in s:
                    key = ("symbol", d)
                    if key not in self._dims:
                        # Built outside the rule's builder: a declining rule must not take it along.
                        first = Builder(self.graph, before=self.graph.nodes[0] if self.graph.nodes else None,
                                        created_by=_CREATED_BY)
                        i = s.index(d)
                        self._dims[key] = first.Shape(inp, start=i, end=i + 1)
                    return self._dims[key]
        a = axis % len(shape) if shape is not None else axis
        return b.Shape(value, start=a, end=a + 1)


def lower_graph(graph: Graph, target: str, report: LoweringReport | None = None,
                options: dict | None = None) -> Graph:
    """Lower `graph` (in place) for ONNX Runtime on `target`; returns it."""
    report = report if report is not None else LoweringReport()
    ctx = LoweringContext(graph, target, options)
    used_before = {name for name, v in graph.initializers.items() if v.uses()}

    emitted: set[int] = set()

    def note_kernels(node: Node, b: Builder) -> None:
        emitted.update(id(n) for n in b.nodes
                       if n.domain == MS_DOMAIN or (n.domain == "" and n.op_type in _ORT_ONNX_DOMAIN_OPS))

    lower_graphopt_ops(graph, BACKEND, ctx, report, on_lowered=note_kernels)
    for node in [n for n in graph.nodes if n.domain == "" and get_lowering(BACKEND, "", n.op_type)]:
        lower_node(BACKEND, ctx, node, report, on_lowered=note_kernels)
    _remove_dead_lowering_nodes(graph, ctx.maybe_dead)
    # the kernels the rules emitted that the lowered graph still runs (counted as emitted, a
    # RotaryEmbedding that a GroupQueryAttention's rule then took in was listed too)
    report.kernels.update(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.nodes
                          if id(n) in emitted)
    _bias_every_layer_norm(graph)
    for name in used_before:  # weights a rule replaced (a weight stored transposed)
        v = graph.initializers.get(name)
        if v is not None and not v.uses() and not v.is_graph_output and not v.is_graph_input:
            graph.remove_initializer(name)
    graph.opset.pop(GRAPHOPT_DOMAIN, None)
    if any(n.domain == MS_DOMAIN for n in graph.nodes):
        graph.opset[MS_DOMAIN] = 1
    return graph


# Default-domain ops a rule may emit that the report counts as kernels (besides com.microsoft
# ones): ORT's own SimplifiedLayerNormalization, LayerNormalization (split SkipNorm) and
# ONNX's opset-23 Attention.
_ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization", "LayerNormalization", "Attention"})


def _bias_every_layer_norm(graph: Graph) -> None:
    """A LayerNormalization without a bias gets zeros. ORT 1.32's SkipLayerNormFusion (an extended
    optimizer: graphopt's own sessions disable it, onnxruntime-genai's do not) crashes the process
    on an Add + LayerNormalization without one (DBRX's norms have none): measured, segmentation
    fault at session creation; with a zero bias it fuses as usual."""
    zeros: dict[tuple, Value] = {}
    for n in list(graph.nodes):
        if n.domain != "" or n.op_type != "LayerNormalization" or (len(n.inputs) > 2 and n.inputs[2] is not None):
            continue
        scale = n.inputs[1]
        if scale.type is None or scale.type.shape is None or not all(isinstance(d, int) for d in scale.type.shape):
            continue
        key = (tuple(scale.type.shape), scale.type.dtype)
        if key not in zeros:
            zeros[key] = Builder(graph, before=n, created_by=_CREATED_BY).const(
                np.zeros(key[0], scale.type.dtype.np_dtype), "layer_norm_zero_bias")
        if len(n.inputs) > 2:
            n.set_input(2, zeros[key])
        else:
            n.append_input(zeros[key])


def _remove_dead_lowering_nodes(graph: Graph, maybe_dead: list[Node] = ()) -> None:
    """Shape nodes shared through `LoweringContext.dim` that no rule ended up using, and the
    nodes rules marked as perhaps no longer read."""
    marked = {id(n) for n in maybe_dead}
    for n in reversed(list(graph.nodes)):
        if (n.meta.created_by == _CREATED_BY or id(n) in marked) and not any(
                v is not None and (v.uses() or v.is_graph_output) for v in n.outputs):
            graph.remove_node(n)
