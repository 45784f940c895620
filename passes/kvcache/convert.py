"""rewrite-kv-cache on a decoder exported with a cache already: recognize it, move it to a layout.

A Hugging Face Optimum-style export (torch.onnx of a model run with `use_cache`) takes
`past_key_values.{i}.key|value [batch, kv_heads, past_seq, head]` and returns
`present.{i}.key|value`, each the Concat of the past and the step's keys/values that the
fused attention reads:

    %present.0.key = Concat(%past_key_values.0.key, %k_new, axis=2)               (a graph output)
    %a = graphopt.Attention(%q, %present.0.key, %present.0.value, %mask)

becomes the cache-aware attention in the chosen layout, the past and present in its shape:

    %a, %present.0.key, %present.0.value = graphopt.Attention(%q, %k_new, %v_new, %mask,
                                               %past_key_values.0.key, %past_key_values.0.value)

The model's own mask and positions stay: its mask's last dimension is past + new, which is
what the static and paged layouts read as the valid length. A Shape of a past (the model's
way to find past_seq) reads [batch, kv_heads, attention_mask's length - seq, head] instead,
so that it means the same in a layout whose buffer is not past_seq long. Anything else that
reads a past, or a present not made so, is refused.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.dtypes import DType
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, TensorType, Value
from graphopt.ops.attention import attention_operands, reads_a_cache, sinks_of
from graphopt.pass_manager import PassError

PAST, PRESENT = "past_key_values.", "present."
BLOCK_TABLE = "block_table"


def cache_shape(layout: str, kv_heads: int, seq, head: int, max_positions: int = 0, block_size: int = 16,
                batch="batch") -> tuple:
    """The shape of a past or present in `layout` (static: the whole buffer, whatever `seq`;
    paged: the pool of blocks)."""
    if layout == "paged":
        return ("num_blocks", block_size, kv_heads, head)
    if layout == "static":
        return (batch, kv_heads, max_positions, head)
    return (batch, seq, kv_heads, head) if layout == "BSNH" else (batch, kv_heads, seq, head)


def _dim_names(ids: Value, past: Value) -> tuple:
    """(batch, seq, past_seq) as the export names them (input_ids' dims and the past's length),
    so that the rewritten cache's dims are the dims the rest of the graph speaks of: a backend
    that relates dims by name (TVM) must see one batch, not the export's `batch_size` and
    a `batch` of our own. Unnamed or fixed dims keep graphopt's names."""
    shape = ids.type.shape if ids.type is not None and ids.type.rank == 2 else ("batch", "seq")
    batch, seq = (d if isinstance(d, str) and d else default for d, default in zip(shape, ("batch", "seq")))
    past_len = past.type.shape[2] if past.type is not None and past.type.rank == 4 else None
    past_len = past_len if isinstance(past_len, str) and past_len and "+" not in past_len else "past_seq"
    return batch, seq, past_len


class KVCacheError(PassError):
    """The graph is not a decoder rewrite-kv-cache can rewrite (names the node and the reason)."""


def _fail(reason: str) -> KVCacheError:
    return KVCacheError(f"rewrite-kv-cache: {reason}")


def has_cache(graph: Graph) -> bool:
    return any(v.name.startswith(PAST) for v in graph.inputs if not v.is_initializer)


def convert_cache(graph: Graph, layout: str, max_positions: int, block_size: int) -> int:
    """Rewrite the exported cache of `graph` into `layout`; returns the attentions rewritten."""
    inputs = {v.name: v for v in graph.inputs if not v.is_initializer}
    outputs = {v.name: v for v in graph.outputs}
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if ids is None or mask is None:
        raise _fail(f"a decoder with a cache takes input_ids and attention_mask; the graph takes {sorted(inputs)}")
    if layout == "static" and not max_positions:
        raise _fail("the static layout needs the buffer's length: give rewrite-kv-cache{max-positions=N}")
    layers = 0
    while f"{PAST}{layers}.key" in inputs:
        layers += 1
    b = Builder(graph, before=graph.nodes[0], created_by="rewrite-kv-cache", name_prefix="kv_cache")
    names = _dim_names(ids, inputs[f"{PAST}0.key"]) if f"{PAST}0.key" in inputs else ("batch", "seq", "past_seq")
    table = graph.add_input(BLOCK_TABLE, TensorType(DType.INT32, (names[0], "max_blocks"))) if layout == "paged" else None
    past_len = b.Sub(b.Shape(mask, start=1, end=2), b.Shape(ids, start=1, end=2))
    for i in range(layers):
        pasts = [inputs.get(f"{PAST}{i}.{kind}") for kind in ("key", "value")]
        presents = [outputs.get(f"{PRESENT}{i}.{kind}") for kind in ("key", "value")]
        if None in pasts or None in presents:
            raise _fail(f"layer {i}: expected {PAST}{i}.key/value inputs and {PRESENT}{i}.key/value outputs")
        news = [_appended(p, present) for p, present in zip(pasts, presents)]
        attention = _the_attention(presents)
        _rewire_shapes(b, pasts, past_len, ids)
        _rewrite(graph, attention, pasts, presents, news, layout, max_positions, block_size, table, names)
    return layers


def _appended(past: Value, present: Value) -> Value:
    """The new keys/values of `present = Concat(past, new, axis=2)`."""
    n = present.producer()
    if n is None or n.domain != "" or n.op_type != "Concat" or len(n.inputs) != 2 or n.inputs[0] is not past:
        raise _fail(f"{present.name!r} is not Concat({past.name!r}, new keys/values) (a model exported with a cache "
                    "is rewritten after the fusion pipeline)")
    rank = past.type.rank if past.type is not None else None
    if rank != 4 or n.attr("axis") not in (2, -2):
        raise _fail(f"{present.name!r} does not append along the sequence axis of a [batch, heads, seq, head] past")
    return n.inputs[1]


def _the_attention(presents: list[Value]) -> Node:
    users = [{id(u): u for u, _ in p.uses()} for p in presents]
    k_users, v_users = users
    both = [u for key, u in k_users.items() if key in v_users]
    if len(k_users) != 1 or len(v_users) != 1 or len(both) != 1:
        raise _fail(f"{presents[0].name!r} and {presents[1].name!r} are not read by one attention alone "
                    "(run the fusion pipeline, fuse-attention, first)")
    n = both[0]
    if n.domain != GRAPHOPT_DOMAIN or n.op_type != "Attention" or reads_a_cache(n) \
            or len(n.outputs) > 1:
        raise _fail(f"node {n.name!r} ({n.op}) reads the cache; expected a fused graphopt.Attention without one")
    if n.inputs[1] is not presents[0] or n.inputs[2] is not presents[1]:
        raise _fail(f"attention node {n.name!r} does not take {presents[0].name!r} and {presents[1].name!r} "
                    "as its key and value")
    return n


def _rewire_shapes(b: Builder, pasts: list[Value], past_len: Value, ids: Value) -> None:
    """A Shape of a past reads [batch, kv_heads, past_seq, head] with past_seq from the mask."""
    for past in pasts:
        readers = [(u, i) for u, i in past.uses() if not (u.domain == "" and u.op_type == "Concat")]
        if not readers:
            continue
        _, heads, _, head = past.type.shape
        shape = b.Concat(b.Shape(ids, start=0, end=1), b.const(np.array([heads], np.int64), "kv_heads"), past_len,
                         b.const(np.array([head], np.int64), "kv_head_size"), axis=0)
        for user, index in readers:
            if user.domain != "" or user.op_type != "Shape":
                raise _fail(f"node {user.name!r} ({user.op}) reads {past.name!r} other than through its Shape "
                            "or the Concat that appends to it")
            start, end = user.attr("start", 0), user.attr("end", 4)
            sliced = b.Slice(shape, b.const(np.array([start], np.int64), "kv_start"),
                             b.const(np.array([end], np.int64), "kv_end"), b.const(np.array([0], np.int64), "kv_axis"))
            user.outputs[0].replace_all_uses_with(sliced)


def _rewrite(graph: Graph, node: Node, pasts, presents, news, layout: str, max_pos: int, block_size: int,
             table: Value | None, names: tuple) -> None:
    q, _, _, mask = (list(node.inputs) + [None])[:4]
    _, heads, _, head = pasts[0].type.shape
    batch, seq, past_len = names
    for past in pasts:
        past.type = TensorType(past.type.dtype, cache_shape(layout, heads, past_len, past.type.shape[3], max_pos,
                                                            block_size, batch))
    attrs = {name: a.value for name, a in node.attrs.items() if name != "kv_layout"}
    if layout != "BNSH":
        attrs["kv_layout"] = layout
    b = Builder(graph, before=node, created_by="rewrite-kv-cache")
    types = [TensorType(p.type.dtype, cache_shape(layout, heads, f"{past_len} + {seq}", p.type.shape[3], max_pos,
                                                  block_size, batch)) for p in pasts]
    y, pk, pv = b.op("Attention", *attention_operands(q, *news, mask, *pasts, table, sinks_of(node)),
                     domain=GRAPHOPT_DOMAIN, n_out=3, output_types=[node.outputs[0].type, *types], **attrs)
    node.outputs[0].replace_all_uses_with(y)
    graph.remove_node(node)
    for old, new in zip(presents, (pk, pv)):
        name = old.name
        concat = old.producer()
        old.replace_all_uses_with(new)
        graph.remove_node(concat)
        graph.rename_value(new, name)
