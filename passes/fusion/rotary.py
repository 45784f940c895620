"""fuse-rotary: x * cos + rotate_half(x) * sin -> graphopt.RotaryEmbedding.

Also the spelling on halves (GPT-OSS's): x1, x2 = the halves of x; Concat(x1 * cos - x2 * sin,
x2 * cos + x1 * sin) with half-size caches, which are the op's as they are.

A partial rotary (GPT-NeoX, Phi-2, StableLM, GPT-J, CodeGen, Persimmon: only the first R entries
of each head rotate) is the op on a Slice of the head, concatenated with the rest:
Concat(RotaryEmbedding(x[..., :R]), x[..., R:]) becomes RotaryEmbedding(x) with
rotary_embedding_dim=R, so that the whole head is one tensor again (attention-to-3d needs it).

The rotation is checked by running its slice on probe tensors (any Slice/Neg/Concat
spelling); the caches must be Cos/Sin of one frequency tensor duplicated along the last
axis (Concat(f, f)), as Hugging Face models build them, so that the half-size caches the op
takes are Cos(f) and Sin(f).

The interleaved rotation (GPT-J's and CodeGen's rotate_every_two, Cohere's rotate_half: pairs
(x[2i], x[2i+1]) rotate) becomes the op with interleaved=1. Its caches repeat each entry twice
(repeat_interleave) and are found upstream by probing: a [batch, seq, rot/2] tensor c with
cache = repeat(unsqueeze(c)) (GPT-J: rows gathered from a constant table) or Trig(repeat(
unsqueeze(c))) (Cohere: c the angles). The heads axis the cache is unsqueezed at says the
layout: BNSH (Cohere) as is; BSNH (GPT-J and CodeGen rotate before their permute) between
Transposes, the permute after it absorbed. A partial rotary there (the rotated part concatenated
with the rest of the head) is taken in the same step.
"""
from __future__ import annotations

import numpy as np

from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.layout import LAYOUT_OPS, computes, layout_ancestors, rotate_half, rotate_pairs
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.pattern import Fail, Rewriter, constant_value, remove_dead, replace_value


class _NoMatch(Exception):
    """Raised inside the matcher to leave early; `match_rotary` turns it into a `Fail`."""


def _half_freqs(cache4: Value, trig: str) -> tuple[Value, list[Node]]:
    """cache4 = Unsqueeze(Trig(Concat(f, f)), axis 1) -> (f, nodes)."""
    n = cache4.producer()
    nodes = []
    if n is not None and n.op_type == "Unsqueeze":
        axes = constant_value(n.inputs[1]) if len(n.inputs) > 1 else None
        if axes is None or axes.reshape(-1).tolist() not in ([1], [-3]):
            raise _NoMatch("the cos/sin cache is unsqueezed on an axis other than the heads axis")
        nodes.append(n)
        n = n.inputs[0].producer()
    else:
        raise _NoMatch("the cos/sin cache is not a [batch, seq, head] tensor unsqueezed at the heads axis")
    if n is None or n.op_type != trig:
        raise _NoMatch(f"the cache is not computed by {trig}")
    nodes.append(n)
    cat = n.inputs[0].producer()
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] \
            or cat.attr("axis") not in (-1, (cat.outputs[0].type.rank or 0) - 1):
        raise _NoMatch(f"the {trig} cache is not of frequencies duplicated along the last axis")
    nodes.append(cat)
    return cat.inputs[0], nodes


_KEEPS_LAST_AXIS = {"Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Gather", "Reshape"}


def _halves_from_constant(cache: Value, head: int) -> tuple[Value, list[Node]] | None:
    """When `cache` is a constant table with equal halves along the last axis (cat(f, f)),
    sliced or gathered along other axes only, return (cache, []): its first half is then the
    half-size cache. Covers models that precompute cos/sin tables as buffers."""
    shape = cache.type.shape if cache.type is not None else None
    if shape is None or len(shape) < 2 or any(d != 1 for d in shape[:-2]):
        return None  # a per-batch table: its rows cannot be flattened into one cache
    v = cache
    for _ in range(6):
        c = constant_value(v)
        if c is not None:
            if c.shape[-1:] != (head,) or not np.array_equal(c[..., : head // 2], c[..., head // 2:]):
                return None
            return cache, []
        n = v.producer()
        if n is None or n.domain != "" or n.op_type not in _KEEPS_LAST_AXIS or n.inputs[0] is None:
            return None
        rank = v.type.rank if v.type is not None else None
        if n.op_type == "Slice":
            axes = constant_value(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else None
            in_rank = n.inputs[0].type.rank if n.inputs[0].type is not None else None
            if axes is None or in_rank is None or any(int(a) % in_rank == in_rank - 1 for a in axes.reshape(-1)):
                return None
        elif n.op_type == "Gather":
            in_rank = n.inputs[0].type.rank if n.inputs[0].type is not None else None
            if in_rank is None or n.attr("axis", 0) % in_rank == in_rank - 1:
                return None
        elif n.op_type == "Reshape":
            if rank is None or n.inputs[0].type is None or n.inputs[0].type.shape is None \
                    or v.type.shape[-1] != n.inputs[0].type.shape[-1]:
                return None
        v = n.inputs[0]
    return None


def match_rotary(add: Node):
    """(x, frequencies, covered nodes) for x * cos + rotate_half(x) * sin at `add`, or a `Fail`."""
    try:
        return _match_rotary(add)
    except _NoMatch as e:
        return Fail(str(e), add)


def _rotation_terms(add: Node, rotation):
    """(x, cos, sin, the two Muls) for each way `add` reads as x * cos + rotation(x) * sin, x 4-D
    with a static, even head (the rotation checked on probes)."""
    for mul_x, mul_r in ((0, 1), (1, 0)):
        a, b = add.inputs[mul_x].producer(), add.inputs[mul_r].producer()
        if a is None or b is None or a.op_type != "Mul" or b.op_type != "Mul":
            continue
        for xi in (0, 1):
            x, cos4 = a.inputs[xi], a.inputs[1 - xi]
            if x.type is None or x.type.rank != 4 or not isinstance(x.type.shape[-1], int) or x.type.shape[-1] % 2:
                continue
            for ri in (0, 1):
                rot, sin4 = b.inputs[ri], b.inputs[1 - ri]
                if rot is not x and computes(x, rot, rotation, data_ops=frozenset({"Neg"})):
                    yield x, cos4, sin4, [a, b]


def _match_rotary(add: Node):
    for x, cos4, sin4, muls in _rotation_terms(add, rotate_half):
        head = x.type.shape[-1]
        tables = _halves_from_constant(cos4, head), _halves_from_constant(sin4, head)
        if tables[0] is not None and tables[1] is not None:
            return x, (cos4, sin4), [add, *muls]
        fc, cos_nodes = _half_freqs(cos4, "Cos")
        fs, sin_nodes = _half_freqs(sin4, "Sin")
        if fc is not fs:
            raise _NoMatch("cos and sin are of different frequency tensors")
        return x, fc, [add, *muls] + cos_nodes + sin_nodes
    raise _NoMatch("not x * cos + rotate_half(x) * sin")


def _halves_of(a: Value, b: Value) -> Value | None:
    """x when `a` and `b` are the first and second halves of x's last axis, however sliced
    (checked on probe tensors, as the rotate_half above); else None."""
    def half(i: int):
        return lambda t: np.split(t, 2, axis=-1)[i]
    p = a.producer()
    if p is None or not p.inputs or p.inputs[0] is None:
        return None
    for x in [p.inputs[0]] + layout_ancestors(p.inputs[0]):  # what the Split / Slice cut, or above it
        if x.type is not None and x.type.rank == 4 and isinstance(x.type.shape[-1], int) and x.type.shape[-1] % 2 == 0 \
                and computes(x, a, half(0)) and computes(x, b, half(1)):
            return x
    return None


def _mul_of(v: Value, a: Value) -> Value | None:
    """The other factor when `v` = Mul(a, other) or Mul(other, a); else None."""
    n = v.producer()
    if n is None or n.domain != "" or n.op_type != "Mul":
        return None
    return n.inputs[1] if n.inputs[0] is a else n.inputs[0] if n.inputs[1] is a else None


def match_rotary_halves(cat: Node):
    """(x, cos, sin [batch, seq, head / 2], covered nodes) for Concat(x1 * cos - x2 * sin,
    x2 * cos + x1 * sin) along the last axis, x1/x2 the halves of x, cos/sin unsqueezed at the
    heads axis; else a `Fail`."""
    rank = cat.outputs[0].type.rank if cat.outputs[0].type is not None else None
    if len(cat.inputs) != 2 or rank != 4 or cat.attr("axis", 0) % 4 != 3:
        return Fail("not a Concat of two halves along the last axis", cat)
    first, second = (v.producer() for v in cat.inputs)
    if first is None or second is None or first.op_type != "Sub" or second.op_type != "Add":
        return Fail("not Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)", cat)
    a, b = first.inputs  # x1 * cos, x2 * sin
    pa, pb = a.producer(), b.producer()
    if pa is None or pb is None or pa.op_type != "Mul" or pb.op_type != "Mul":
        return Fail("not Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)", cat)
    for x1, cos4 in ((pa.inputs[0], pa.inputs[1]), (pa.inputs[1], pa.inputs[0])):
        for x2, sin4 in ((pb.inputs[0], pb.inputs[1]), (pb.inputs[1], pb.inputs[0])):
            x = _halves_of(x1, x2)
            if x is None:
                continue
            c, d = second.inputs
            if not ((_mul_of(c, x2) is cos4 and _mul_of(d, x1) is sin4)
                    or (_mul_of(d, x2) is cos4 and _mul_of(c, x1) is sin4)):
                continue
            tables = []
            for t in (cos4, sin4):
                u = t.producer()
                axes = constant_value(u.inputs[1]) if u is not None and u.op_type == "Unsqueeze" else None
                if axes is None or axes.reshape(-1).tolist() not in ([1], [-3]) or u.inputs[0].type is None \
                        or u.inputs[0].type.rank != 3:
                    return Fail("the cos/sin caches are not [batch, seq, head / 2] unsqueezed at the heads axis", cat)
                tables.append(u.inputs[0])
            return x, tables[0], tables[1], [cat, first, second, pa, pb, c.producer(), d.producer()]
    return Fail("not Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin) over the halves of one tensor", cat)


_NOT_PAIRS = "not x * cos + rotate_pairs(x) * sin"
_BSNH = [0, 2, 1, 3]  # [batch, seq, heads, head] <-> [batch, heads, seq, head]


def match_rotary_pairs(add: Node):
    """(x, (cos, sin), heads axis, rotated part) for x * cos + rotate_pairs(x) * sin at `add`, where
    the caches repeat each entry twice (see the module doc); cos/sin: (c, trig) as `_pair_cache`
    finds them; the rotated part: (whole head, R, the Concat) when x = head[..., :R] is concatenated
    with head[..., R:], else None. Or a `Fail`."""
    for x, cos4, sin4, _ in _rotation_terms(add, rotate_pairs):
        half = x.type.shape[-1] // 2
        cos, sin = _pair_cache(cos4, half, "Cos"), _pair_cache(sin4, half, "Sin")
        if cos is None or sin is None:
            return Fail("the cos/sin caches are not [batch, seq, rot/2] tensors repeated pairwise "
                        "and unsqueezed at a heads axis", add)
        (axis, c, tc), (axis_s, s, ts) = cos, sin
        if axis != axis_s or (tc, ts) not in ((None, None), ("Cos", "Sin")) or (tc and c is not s):
            return Fail("cos and sin are not of one angle tensor, unsqueezed at one axis", add)
        return x, ((c, tc), (s, ts)), axis, _rest_of_head(add, x)
    return Fail(_NOT_PAIRS, add)


def _upstream(v: Value, limit: int = 8) -> list[Value]:
    """Values above `v` along first inputs through layout ops, Cos and Sin (nearest first)."""
    out = []
    for _ in range(limit):
        n = v.producer()
        if n is None or n.domain != "" or (n.op_type not in LAYOUT_OPS and n.op_type not in ("Cos", "Sin")) \
                or not n.inputs or n.inputs[0] is None:
            break
        v = n.inputs[0]
        out.append(v)
    return out


def _pair_cache(cache4: Value, half: int, trig: str) -> tuple[int, Value, str | None] | None:
    """(heads axis, c, None) when cache4 = repeat_interleave(unsqueeze(c, axis), 2) along the last
    axis, c [batch, seq, half]; (axis, c, trig) when cache4 = trig(that); else None."""
    np_trig = {"Cos": np.cos, "Sin": np.sin}[trig]
    for c in _upstream(cache4):
        if c.type is None or c.type.rank != 3 or c.type.shape[-1] != half or c.type.dtype.np_dtype.kind != "f":
            continue
        for axis in (1, 2):
            def spread(t, axis=axis):
                return np.repeat(np.expand_dims(t, axis), 2, axis=-1)
            if computes(c, cache4, spread):
                return axis, c, None
            if computes(c, cache4, lambda t, spread=spread: np_trig(spread(t)), data_ops=frozenset({trig})):
                return axis, c, trig
    return None


def _rest_of_head(add: Node, x: Value) -> tuple[Value, int, Node] | None:
    """(head, R, cat) when x = head[..., :R] and add's only use is cat = Concat(add, head[..., R:])
    along the last axis; else None (the rotation covers x whole)."""
    uses = add.outputs[0].uses()
    cut = x.producer()
    if len(uses) != 1 or add.outputs[0].is_graph_output or cut is None or cut.op_type != "Slice" or cut.domain != "":
        return None
    cat, index = uses[0]
    if cat.op_type != "Concat" or cat.domain != "" or len(cat.inputs) != 2 or index != 0 or cat.attr("axis", 0) % 4 != 3:
        return None
    head, r = cut.inputs[0], x.type.shape[-1]
    width = head.type.shape[-1] if head.type is not None and head.type.rank == 4 else None
    if not isinstance(width, int) or not r < width \
            or not (computes(head, x, lambda t: t[..., :r]) and computes(head, cat.inputs[1], lambda t: t[..., r:])):
        return None
    return head, r, cat


def _fuse_pairs(graph: Graph, add: Node, found, made: dict) -> None:
    """Replace the interleaved rotation `match_rotary_pairs` found by graphopt.RotaryEmbedding."""
    x, ((c, tc), (s, ts)), axis, rest = found
    rw = Rewriter(graph, add, "fuse-rotary")
    stop = {id(v) for v in (x, c, s)}  # the rotation's inputs: what it reads stays
    if tc is not None:  # Cos(c), Sin(c) made once per angle tensor, shared by Q and K (and layers)
        if id(c) not in made:
            made[id(c)] = (rw.Cos(c), rw.Sin(c))
        c, s = made[id(c)]
    head, rot, old = (x, 0, add) if rest is None else rest
    attrs = {"interleaved": 1, **({"rotary_embedding_dim": rot} if rot else {})}
    replaced = [old]
    if axis == 1:  # BNSH
        y = rw.op("RotaryEmbedding", head, c, s, domain=GRAPHOPT_DOMAIN, **attrs)
        replace_value(graph, old.outputs[0], y)
    else:  # BSNH: rotate the BNSH view; a permute to BNSH after it reads the op's output
        y = rw.op("RotaryEmbedding", rw.Transpose(head, perm=_BSNH), c, s, domain=GRAPHOPT_DOMAIN, **attrs)
        for user, _ in old.outputs[0].uses():
            if user.op_type == "Transpose" and user.domain == "" and list(user.attr("perm", [])) == _BSNH:
                replace_value(graph, user.outputs[0], y)
                replaced.append(user)
        if old.outputs[0].uses() or old.outputs[0].is_graph_output:
            replace_value(graph, old.outputs[0], rw.Transpose(y, perm=_BSNH))
    remove_dead(graph, replaced + _above(add, stop | {id(head)}))


def _above(node: Node, stop: set, limit: int = 32) -> list[Node]:
    """Nodes above `node` (breadth first, at most `limit`) up to the values in `stop`: what a
    fused rotation may leave dead (`remove_dead` keeps whatever is still read)."""
    out, queue = [], [node]
    while queue and len(out) < limit:
        n = queue.pop(0)
        out.append(n)
        queue += [v.producer() for v in n.inputs
                  if v is not None and id(v) not in stop and v.producer() is not None and v.producer() not in out]
    return out


def _first_half_3d(rw: Rewriter, table: Value, head: int) -> Value:
    """table [..., seq, head] (leading dims 1) -> its first half as a [1, seq, head/2] cache."""
    half = rw.Slice(table, rw.const(np.array([0], np.int64), "start"), rw.const(np.array([head // 2], np.int64), "end"),
                    rw.const(np.array([-1], np.int64), "axes"))
    return rw.Reshape(half, rw.const(np.array([1, -1, head // 2], np.int64), "cache_shape"))


@register_pass("fuse-rotary")
class FuseRotary(Pass):
    """Fuse rotary position embeddings (x * cos + rotate_half(x) * sin) into
    graphopt.RotaryEmbedding with half-size caches Cos(f), Sin(f).

    Before:  %c = Unsqueeze(Cos(Concat(%f, %f)), @1)      After:
             %r = Concat(Neg(Slice(%x, h/2:)), Slice(%x, :h/2))       %y = graphopt.RotaryEmbedding(%x, Cos(%f), Sin(%f))
             %y = Add(Mul(%x, %c), Mul(%r, %s))
    """

    category = "fusion"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        made: dict[int, tuple[Value, Value]] = {}  # frequencies -> (cos, sin), shared by q and k
        for add in list(graph.nodes):
            if add.graph is not graph or add.op_type != "Add" or add.domain != "":
                continue
            if not all(v is not None and v.producer() is not None and v.producer().op_type == "Mul" for v in add.inputs):
                continue
            found = match_rotary(add)
            if isinstance(found, Fail):
                pairs = match_rotary_pairs(add)
                if isinstance(pairs, Fail):
                    result.near_miss("rotary", found.node, pairs.reason if pairs.reason != _NOT_PAIRS else found.reason)
                else:
                    _fuse_pairs(graph, add, pairs, made)
                    result.count("rotary-interleaved")
                continue
            x, freqs, nodes = found
            rw = Rewriter(graph, add, "fuse-rotary")
            key = id(freqs) if not isinstance(freqs, tuple) else (id(freqs[0]), id(freqs[1]))
            if key not in made:
                if isinstance(freqs, tuple):  # tables with equal halves: keep the first half
                    made[key] = tuple(_first_half_3d(rw, t, x.type.shape[-1]) for t in freqs)
                else:
                    made[key] = (rw.Cos(freqs), rw.Sin(freqs))
            cos, sin = made[key]
            y = rw.op("RotaryEmbedding", x, cos, sin, domain=GRAPHOPT_DOMAIN)
            replace_value(graph, add.outputs[0], y)
            remove_dead(graph, nodes)
            result.count("rotary")
        for cat in list(graph.nodes):
            if cat.graph is not graph or cat.op_type != "Concat" or cat.domain != "" or len(cat.inputs) != 2 \
                    or not all(v.producer() is not None and v.producer().op_type in ("Sub", "Add") for v in cat.inputs):
                continue
            found = match_rotary_halves(cat)
            if isinstance(found, Fail):
                result.near_miss("rotary", found.node, found.reason)
                continue
            x, cos, sin, nodes = found
            y = Rewriter(graph, cat, "fuse-rotary").op("RotaryEmbedding", x, cos, sin, domain=GRAPHOPT_DOMAIN)
            replace_value(graph, cat.outputs[0], y)
            remove_dead(graph, nodes)
            result.count("rotary-halves")
        for cat in list(graph.nodes):
            if cat.graph is not graph or cat.op_type != "Concat" or cat.domain != "" or len(cat.inputs) != 2:
                continue
            found = _partial(cat)
            if found is None:
                continue
            x, rope, rot = found
            y = Rewriter(graph, cat, "fuse-rotary").op(
                "RotaryEmbedding", x, *rope.inputs[1:], domain=GRAPHOPT_DOMAIN,
                **{**{k: a.value for k, a in rope.attrs.items()}, "rotary_embedding_dim": rot})
            replace_value(graph, cat.outputs[0], y)
            remove_dead(graph, [cat, rope, *(v.producer() for v in (rope.inputs[0], cat.inputs[1]))])
            result.count("partial-rotary")
        return result


def _partial(cat: Node) -> tuple[Value, Node, int] | None:
    """(x, the RotaryEmbedding, R) when `cat` = Concat(RotaryEmbedding(x[..., :R]), x[..., R:]) along
    the last axis of a 4-D x, the op rotating its whole input (R even, less than the head size)."""
    first, rest = cat.inputs
    rope = first.producer()
    if rope is None or rope.domain != GRAPHOPT_DOMAIN or rope.op_type != "RotaryEmbedding" \
            or rope.attr("rotary_embedding_dim", 0) or len(first.uses()) != 1 or first.is_graph_output:
        return None
    part, cut = rope.inputs[0].producer(), rest.producer()
    if part is None or cut is None or part.op_type != "Slice" or cut.op_type != "Slice" \
            or part.inputs[0] is not cut.inputs[0]:
        return None
    x = part.inputs[0]
    rank = x.type.rank if x.type is not None else None
    head = x.type.shape[-1] if rank else None
    rot = rope.inputs[0].type.shape[-1] if rope.inputs[0].type is not None and rope.inputs[0].type.rank else None
    # 4-D only: on [batch, seq, heads * head] a cut of the last axis is not per head
    if rank != 4 or not isinstance(head, int) or not isinstance(rot, int) or rot % 2 or not 0 < rot < head \
            or cat.attr("axis", 0) % rank != rank - 1:
        return None
    if not (computes(x, rope.inputs[0], lambda t: t[..., :rot]) and computes(x, rest, lambda t: t[..., rot:])):
        return None
    return x, rope, rot
