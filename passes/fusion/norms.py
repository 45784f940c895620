"""fuse-layer-norm, fuse-rms-norm, fuse-skip-norm.

Decomposed norms are recognised the way activations are: the reduction region around a
ReduceMean over the last axis is evaluated on a probe tensor and compared with LayerNorm /
RMSNorm (the epsilon is read off the probe, then checked). A following Mul by a constant
vector (and Add of one, for LayerNorm) becomes the scale (and bias). A residual Add feeding
a norm becomes graphopt.SkipNorm, whose second output is the residual stream.
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Rewriter, constant_value, remove_dead, replace_value

from .activations import ELEMENTWISE, _sources, closure, evaluate_region

NORM_OPS = ELEMENTWISE | {"ReduceMean"}


def _last_axis_mean(n: Node) -> bool:
    if n.op_type != "ReduceMean" or n.attr("keepdims", 1) != 1:
        return False
    x = n.inputs[0]
    rank = x.type.rank if x.type is not None else None
    axes = constant_value(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
    return rank is not None and axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, rank - 1)


def _accept(n: Node) -> bool:
    return n.op_type != "ReduceMean" or _last_axis_mean(n)


def _fit_epsilon(kind: str, probe: np.ndarray, got: np.ndarray, candidates: list[float]) -> float | None:
    """The epsilon among the region's scalar constants that makes `got` the normalization
    of `probe` (the probe is small, so a wrong epsilon shows)."""
    centered = probe - probe.mean(-1, keepdims=True) if kind == "layer" else probe
    ms = (centered ** 2).mean(-1, keepdims=True)
    for eps in candidates:
        want = centered / np.sqrt(ms + eps)
        if np.allclose(got, want, rtol=1e-5, atol=1e-6):
            return eps
    return None


def _scalar_constants(nodes: list[Node]) -> list[float]:
    out = []
    for n in nodes:
        if n.op_type == "Add":
            for v in n.inputs:
                c = None if v is None else constant_value(v)
                if c is not None and c.size == 1 and c.dtype.kind == "f":
                    out.append(float(c.reshape(())))
    return out


def _probe(x: Value) -> np.ndarray | None:
    shape = x.type.shape if x.type is not None else None
    if not shape or not isinstance(shape[-1], int):
        return None
    rng = np.random.default_rng(0)
    # small values, so that the epsilon matters and a wrong one shows
    return rng.standard_normal((4, shape[-1])).reshape((1,) * (len(shape) - 2) + (4, shape[-1])) * 1e-3


def match_norm(seed: Node):
    """(kind, x, normalized value, eps, nodes) for a decomposed norm around `seed`, or a reason."""
    if not _last_axis_mean(seed):
        return "not a mean over the last axis"
    for x in _sources(seed, ops=NORM_OPS):
        region = closure(x, ops=NORM_OPS, accept=_accept)
        if region is None or seed not in region[1]:
            continue
        y, nodes = region
        probe = _probe(x)
        if probe is None:
            return "the normalized dimension is not static"
        got = evaluate_region(x, y, nodes, probe)
        if got is None or got.shape != probe.shape:
            continue
        # no Add at all: the norm of epsilon 0 (Helium's RMSNorm, rms_norm_eps 1e-8, exports through
        # torch.onnx's dynamo path with no Add before the Sqrt)
        candidates = _scalar_constants(nodes) or ([] if any(n.op_type == "Add" for n in nodes) else [0.0])
        for kind in ("layer", "rms"):
            eps = _fit_epsilon(kind, probe, got, candidates)
            if eps is not None:
                return kind, x, y, eps, nodes
    return "the region around it is neither LayerNorm nor RMSNorm"


def _affine(y: Value, dim: int):
    """Constant scale (and bias) applied right after the norm: (scale, bias, nodes, out)."""
    def const_vec(v):
        c = constant_value(v)
        return c if c is not None and c.shape == (dim,) else None

    nodes, scale, bias, out = [], None, None, y
    if len(out.uses()) == 1 and not out.is_graph_output:
        n = out.uses()[0][0]
        if n.op_type == "Mul" and n.domain == "":
            other = n.inputs[1] if n.inputs[0] is out else n.inputs[0]
            if const_vec(other) is not None:
                scale, out = other, n.outputs[0]
                nodes.append(n)
    if scale is not None and len(out.uses()) == 1 and not out.is_graph_output:
        n = out.uses()[0][0]
        if n.op_type == "Add" and n.domain == "":
            other = n.inputs[1] if n.inputs[0] is out else n.inputs[0]
            if const_vec(other) is not None:
                bias, out = other, n.outputs[0]
                nodes.append(n)
    return scale, bias, nodes, out


def _fuse_norms(graph: Graph, want: str, result: PassResult) -> None:
    for seed in list(graph.nodes):
        if seed.graph is not graph or seed.op_type != "ReduceMean" or seed.domain != "":
            continue
        m = match_norm(seed)
        if isinstance(m, str):
            result.details.append({"fusion": f"{want}-norm", "node": seed.name, "op": seed.op, "reason": m})
            continue
        kind, x, y, eps, nodes = m
        if kind != want:
            continue
        dim = x.type.shape[-1]
        scale, bias, affine_nodes, out = _affine(y, dim)
        rw = Rewriter(graph, out.producer(), f"fuse-{want}-norm")
        dt = x.type.dtype.np_dtype
        if scale is None:
            scale = rw.const(np.ones(dim, dt), "norm_scale")
        if want == "layer":
            if bias is None:
                bias = rw.const(np.zeros(dim, dt), "norm_bias")
            new = rw.LayerNormalization(x, scale, bias, axis=-1, epsilon=eps)
        else:
            new = rw.op("RMSNorm", x, scale, domain=GRAPHOPT_DOMAIN, axis=-1, epsilon=eps)
            if bias is not None:
                new = rw.Add(new, bias)
        replace_value(graph, out, new)
        remove_dead(graph, nodes + affine_nodes)
        result.count(f"{want}-norm")


@register_pass("fuse-layer-norm")
class FuseLayerNorm(Pass):
    """Fuse a decomposed LayerNorm (mean, subtract, variance, sqrt, divide, scale, shift)
    into `LayerNormalization`.

    Before:  %m = ReduceMean(%x) ... %n = Div(%d, Sqrt(Add(%var, @eps)))     After:
             %y = Add(Mul(%n, @gamma), @beta)                                  %y = LayerNormalization(%x, @gamma, @beta)
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        _fuse_norms(graph, "layer", result)
        return result


@register_pass("fuse-rms-norm")
class FuseRMSNorm(Pass):
    """Fuse a decomposed RMSNorm (x * rsqrt(mean(x^2) + eps) * w, in any spelling) into
    graphopt.RMSNorm.

    Before:  %p = Pow(%x, @two); %m = ReduceMean(%p); %r = Reciprocal(Sqrt(Add(%m, @eps)))
             %y = Mul(@w, Mul(%x, %r))                      After:  %y = graphopt.RMSNorm(%x, @w)
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        _fuse_norms(graph, "rms", result)
        return result


@register_pass("fuse-skip-norm")
class FuseSkipNorm(Pass):
    """Fuse a residual Add feeding a LayerNorm or RMSNorm into graphopt.SkipNorm; the Add's
    other users read SkipNorm's second output (the residual stream).

    Before:  %s = Add(%x, %res)                      After:  %y, %s = graphopt.SkipNorm(%x, %res, @g, @b)
             %y = LayerNormalization(%s, @g, @b)                         {norm="layer"}
    """

    category = "fusion"
    requires = ("fuse-layer-norm|fuse-rms-norm",)  # it fuses a residual Add into a norm already fused

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for norm in list(graph.nodes):
            if norm.graph is not graph:
                continue
            is_ln = norm.op_type == "LayerNormalization" and norm.domain == ""
            is_rms = norm.op_type == "RMSNorm" and norm.domain == GRAPHOPT_DOMAIN
            if not (is_ln or is_rms):
                continue
            s = norm.inputs[0]
            add = s.producer()
            if add is None or add.op_type != "Add" or add.domain != "":
                continue
            a, b = add.inputs
            if a.type is None or b.type is None or a.type != b.type or a.type.rank is None or a.type.rank < 2:
                # SkipNorm broadcasts like Add, so this would still be right; but fused kernels
                # need equal shapes, and unequal ones mean this is not a residual connection.
                result.near_miss("skip-norm", add, f"the two sides of the residual Add are typed {a.type} and {b.type}")
                continue
            if is_ln and (norm.attr("axis", -1) not in (-1, a.type.rank - 1) or len(norm.outputs) > 1):
                continue
            if is_rms and norm.attr("axis", -1) not in (-1, a.type.rank - 1):
                continue
            rw = Rewriter(graph, norm, "fuse-skip-norm")
            gamma = norm.inputs[1]
            beta = norm.inputs[2] if is_ln and len(norm.inputs) > 2 else None
            eps = norm.attr("epsilon", 1e-5)
            ins = [a, b, gamma] + ([beta] if beta is not None else [])
            keep_sum = len(s.uses()) > 1 or s.is_graph_output
            outs = rw.op("SkipNorm", *ins, domain=GRAPHOPT_DOMAIN, n_out=2 if keep_sum else 1,
                         norm="layer" if is_ln else "rms", epsilon=eps)
            y, new_sum = (outs if keep_sum else (outs, None))
            replace_value(graph, norm.outputs[0], y)
            if keep_sum:
                replace_value(graph, s, new_sum)
            remove_dead(graph, [norm, add])
            result.count("layer" if is_ln else "rms")
        return result
