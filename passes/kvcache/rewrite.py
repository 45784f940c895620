"""rewrite-kv-cache: a full-sequence decoder -> one graph for prefill and decode.

Before (what the fusion pipeline makes of a decoder):

    graph(%input_ids: i64[batch, seq], %attention_mask: i64[batch, seq]) -> (%logits)
      %cos = Cos(Mul(Cast(Unsqueeze(Range(0, seq))), @inv_freq))          (positions 0..seq-1)
      %mask = Where(causal_and_padding(%attention_mask), 0, -inf)          f32[batch, 1, seq, seq]
      %a = graphopt.Attention(%q, %k, %v, %mask) {num_heads=4, kv_num_heads=2}

After:

    graph(%input_ids: i64[batch, seq], %attention_mask: i64[batch, "past_seq + seq"],
          %past_key_values.0.key: f32[batch, 2, past_seq, 8], %past_key_values.0.value: ...)
          -> (%logits, %present.0.key: f32[batch, 2, "past_seq + seq", 8], %present.0.value, ...)
      %position_ids = Slice(CumSum(%attention_mask, exclusive), -seq:)       (left padding works)
      %q_rot = graphopt.RotaryEmbedding(%q, @cos_table, @sin_table, %position_ids)   (max_positions rows)
      %bias = Where(real(%attention_mask) and past_seq + i >= j, 0, lowest)  built once, not per layer
      %a, %present.0.key, %present.0.value = graphopt.Attention(%q, %k, %v, %bias,
                                                 %past_key_values.0.key, %past_key_values.0.value)

How the positions are found: every value that is computed from the input *shapes* and the
weights only (never from token ids) and that the rest of the model reads is run at two
sequence lengths. One that is a per-position table (its rows at length 3 are the first rows
at length 5, as a position embedding or a rotary cos/sin cache) is evaluated once at
`max-positions` and replaced by a Gather of that table at the new position ids (a rotary
embedding takes the table and the position ids itself). Anything
else that depends on the sequence length (other than shape arithmetic) is refused, as is
attention that is not causal: the pass never guesses.

Preconditions (checked): an `input_ids [batch, seq]` input, one output (the logits), every
attention fused into graphopt.Attention, 3-D or 4-D (no Softmax left) and none with a cache yet.
Options: `layout` (BNSH: the cache is [batch, kv_heads, seq, head_size], on every backend;
BSNH: [batch, seq, kv_heads, head_size], on TVM; static: a [batch, kv_heads, max-positions,
head_size] buffer that past and present share, on ORT and TVM, where the attention mask's length is the
valid length; paged: a pool of [num_blocks, block-size, kv_heads, head_size] blocks per cache that
past and present share, and one `block_table [batch, max_blocks]` input (int32) for all layers that
places position p of row r at block block_table[r, p // block-size], slot p % block-size, the mask's
length again the valid length; only the key/value heads are cached, grouped-query attention stays
grouped), `max-positions` (0: what the frontend recorded, the model's maximum context) and
`block-size` (paged: positions per block, 16).

A decoder exported with a cache already (Optimum-style past_key_values inputs and present
outputs, its attention fused) is recognized and its cache moved to the layout instead
(passes/kvcache/convert.py).
"""
from __future__ import annotations

import numpy as np

from graphopt.dtypes import DType
from graphopt.errors import UserError
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, TensorType, Value
from graphopt.manifest import KV_LAYOUTS
from graphopt.ops.attention import attention_operands, reads_a_cache, sinks_of
from graphopt.pass_manager import Pass, PassContext, PassResult, register_pass
from graphopt.builder import Builder
from graphopt.passes.cleanup.dce import EliminateDeadCode
from graphopt.passes.kvcache.convert import BLOCK_TABLE, KVCacheError, cache_shape, convert_cache, has_cache
from graphopt.registry import run_reference

INPUT_IDS, MASK, LOGITS, POSITION_IDS = "input_ids", "attention_mask", "logits", "position_ids"
PAST_SEQ, TOTAL_SEQ = "past_seq", "past_seq + seq"
LAYOUTS = KV_LAYOUTS
# layout -> the backends that run it (None: the pass runs without a backend, e.g. in tests)
IMPLEMENTED_LAYOUTS = {"BNSH": ("onnxruntime", "tvm", None), "BSNH": ("tvm", None), "static": ("onnxruntime", "tvm", None),
                       "paged": ("onnxruntime", "tvm", None)}
# metadata_props keys: what the artifact's manifest and the Generator read back
META_LAYOUT, META_MAX_POSITIONS, META_LAYERS = "graphopt.kv_layout", "graphopt.max_positions", "graphopt.kv_layers"
META_BLOCK_SIZE = "graphopt.kv_block_size"
# a per-position table switched by the length (LongRoPE): the length from which the cache built
# before it must be recomputed (the Generator re-prefills there, as transformers does)
META_RECOMPUTE_AT = "graphopt.recompute_cache_at"
_INT64_MAX = np.iinfo(np.int64).max
_PROBE_SEQ = (3, 5)

# (op, input index) slots that take shape arithmetic, not data: a value read only there may
# depend on the sequence length (it is recomputed from input_ids' shape at run time).
_SHAPE_SLOTS = {"Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Tile": {1}, "Unsqueeze": {1},
                "Squeeze": {1}, "Split": {1}, "Pad": {1, 2, 3}, "ConstantOfShape": {0}, "Range": {0, 1, 2},
                "CumSum": {1}, "TopK": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}}


def _fail(reason: str) -> KVCacheError:
    return KVCacheError(f"rewrite-kv-cache: {reason}")


def _check_known_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise UserError(f"rewrite-kv-cache: unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def check_layout(layout: str, backend: str | None = None) -> None:
    """Refuse a layout that is unknown or not implemented, in one line naming layout and backend."""
    _check_known_layout(layout)
    if backend not in IMPLEMENTED_LAYOUTS.get(layout, ()):
        where = f"the {backend} backend" if backend else "any backend"
        ok = [name for name, backends in IMPLEMENTED_LAYOUTS.items() if backend in backends]
        raise UserError(f"rewrite-kv-cache: layout {layout!r} is not implemented for {where} "
                        f"(implemented: {', '.join(ok)})")


@register_pass("rewrite-kv-cache")
class RewriteKVCache(Pass):
    """Give a fused decoder a KV cache: past/present key and value per layer, positions
    from the attention mask, one graph for prefill and decode.

    Before:  %a = graphopt.Attention(%q, %k, %v, %causal_mask)
    After:   %a, %present.0.key, %present.0.value =
                 graphopt.Attention(%q, %k, %v, %bias, %past_key_values.0.key, %past_key_values.0.value)
    """

    changes_outputs = True  # the first output becomes `logits`, the presents are added

    layout: str = "BNSH"
    max_positions: int = 0
    block_size: int = 16

    def __post_init__(self) -> None:  # checked when the pipeline is parsed, before any model load
        _check_known_layout(self.layout)
        if self.max_positions < 0 or 0 < self.max_positions < max(_PROBE_SEQ):
            raise UserError(f"rewrite-kv-cache: max-positions {self.max_positions}: give at least {max(_PROBE_SEQ)} "
                            "positions (or 0: the model's own context)")
        if self.layout == "paged" and self.block_size <= 0:
            raise UserError(f"rewrite-kv-cache: block-size {self.block_size}: must be positive")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        check_layout(self.layout, ctx.hints.get("backend"))
        max_pos = self.max_positions or int(graph.metadata.metadata_props.get(META_MAX_POSITIONS, 0) or 0)
        _position_ids_from_mask(graph)
        if has_cache(graph):  # exported with a cache: recognized and moved to the layout
            if self.layout in ("static", "paged") and not max_pos:
                raise _fail(f"the {self.layout} layout needs the maximum context, which the graph does not record: "
                            "give it (graphopt optimize --max-positions N, or rewrite-kv-cache{max-positions=N})")
            result = PassResult()
            layers = convert_cache(graph, self.layout, max_pos, self.block_size)
            result.count("attention", layers)
            EliminateDeadCode().run(graph, ctx)
            self._record(graph, max_pos, layers)
            return result
        site = _read_decoder(graph)
        if max_pos < max(_PROBE_SEQ):
            raise _fail("the model's maximum context is unknown: give rewrite-kv-cache{max-positions=N}")
        result = PassResult()
        hint = int(graph.metadata.metadata_props.get(META_SLIDING_WINDOW, 0) or 0)
        if _WINDOW_PROBE_MAX < hint < max_pos:
            # probing the masks past so wide a window would take [hint, hint] arrays (GBs): the
            # artifact serves up to the window instead, where no window can hide a key
            max_pos = hint
            result.count("max-positions-capped-at-the-window")
        windows = _check_causal(graph, site, max_pos)
        tables = _positional_values(graph, site, max_pos)
        switches = sorted({table[2] for _, _, table in tables if table[2] is not None})
        if len(switches) > 1:
            raise _fail(f"its position tables switch at {len(switches)} different lengths ({switches})")

        old_mask = site.mask_input
        if old_mask is not None:
            graph.rename_value(old_mask, graph.fresh_name("attention_mask_full_sequence"))
        b = _Builder(graph)
        mask = graph.add_input(graph.fresh_name("attention_mask_with_past"), TensorType(site.mask_dtype,
                                                                                      ("batch", TOTAL_SEQ)))
        graph.rename_value(mask, MASK)  # (a renamed value's old name is otherwise never handed out again)
        past, total = b.lengths(site.input_ids, mask)
        position_ids = b.position_ids(mask, past)
        biases = {w: b.causal_bias(mask, past, total, site.dtype, *w) for w in sorted(set(windows), key=str)}

        presents = []
        table = None
        if self.layout == "paged":
            table = graph.add_input(BLOCK_TABLE, TensorType(DType.INT32, ("batch", "max_blocks")))
        for i, (node, window) in enumerate(zip(site.attentions, windows)):
            presents += _rewrite_attention(graph, node, i, biases[window], self.layout, max_pos, self.block_size, table)
            result.count("attention" if window[0] is None else "sliding-window-attention")
            if window[1] is not None:
                result.count("alibi-attention")
        by_switch = {None: position_ids}

        def positions(switch: int | None) -> Value:  # the rows to read of a table with that switch
            if switch not in by_switch:
                by_switch[switch] = b.switched_positions(position_ids, switch)
                result.count("position-tables-switched-by-length")
            return by_switch[switch]
        moved = _rotary_with_positions(graph, tables, positions, b)
        result.count("rotary-position-ids", len(moved) // 2)
        for v, uses, table in tables:
            rest = [(user, index) for user, index in uses if (id(user), index) not in moved]
            if not rest:
                continue
            new = b.gather_positions(table, positions(table[2]), v)
            for user, index in rest:
                user.set_input(index, new)
            result.count("position-tables")

        EliminateDeadCode().run(graph, ctx)
        if old_mask is not None:
            result.count("positions-from-the-mask", _mask_per_position(graph, old_mask, mask, site.input_ids, past))
            _retire_input(graph, old_mask, site.input_ids)
        logits = graph.outputs[0]
        if logits.name != LOGITS:
            graph.rename_value(logits, LOGITS)
        graph.outputs = [logits] + presents
        pasts = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
        graph.inputs = [site.input_ids, mask] + pasts + [
            v for v in graph.inputs if v is not site.input_ids and v is not mask and v not in pasts]
        self._record(graph, max_pos, len(site.attentions))
        if switches:
            graph.metadata.metadata_props[META_RECOMPUTE_AT] = str(switches[0])
        return result

    def _record(self, graph: Graph, max_pos: int, layers: int) -> None:
        """What the manifest and the Generator read back."""
        props = graph.metadata.metadata_props
        props[META_LAYOUT], props[META_MAX_POSITIONS], props[META_LAYERS] = self.layout, str(max_pos), str(layers)
        if self.layout == "paged":
            props[META_BLOCK_SIZE] = str(self.block_size)


# --------------------------------------------------------------------------------------
# Reading the decoder


class _Decoder:
    def __init__(self, input_ids: Value, mask_input: Value | None, attentions: list[Node]):
        self.input_ids, self.mask_input, self.attentions = input_ids, mask_input, attentions
        self.dtype = attentions[0].inputs[0].type.dtype
        self.mask_dtype = mask_input.type.dtype if mask_input is not None else input_ids.type.dtype


def _read_decoder(graph: Graph) -> _Decoder:
    by_name = {v.name: v for v in graph.inputs if not v.is_initializer}
    ids = by_name.get(INPUT_IDS)
    if ids is None or ids.type.shape is None or len(ids.type.shape) != 2 or ids.type.dtype.is_float:
        raise _fail(f"expected an integer input {INPUT_IDS!r} [batch, seq], the graph takes {sorted(by_name)}")
    if tuple(ids.type.shape) != ("batch", "seq"):
        raise _fail(f"input {INPUT_IDS!r} is {ids.type}, expected dimensions [batch, seq]")
    if any(n.startswith("past_key_values.") for n in by_name):
        raise _fail("the graph has a KV cache already (rewriting one layout into another is not implemented)")
    other = sorted(set(by_name) - {INPUT_IDS, MASK})
    if other:
        raise _fail(f"unexpected input {other[0]!r}: a decoder takes {INPUT_IDS} (and {MASK})")
    mask = by_name.get(MASK)
    if mask is not None and (mask.type.shape is None or tuple(mask.type.shape) != ("batch", "seq")):
        raise _fail(f"input {MASK!r} is {mask.type}, expected [batch, seq]")
    if len(graph.outputs) != 1 or graph.outputs[0].type.rank != 3:
        raise _fail("expected one output, the logits [batch, seq, vocab]")
    for n in graph.nodes:
        if n.domain == "" and n.op_type == "Softmax" and _over_positions(n):
            raise _fail(f"attention is not fused: Softmax node {n.name!r} remains (run the fusion pipeline, "
                        "fuse-attention, first)")
    attentions = [n for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN and n.op_type == "Attention"]
    if not attentions:
        raise _fail("no graphopt.Attention in the graph (run the fusion pipeline, fuse-attention, first)")
    for n in attentions:
        if reads_a_cache(n) or len(n.outputs) > 1:
            raise _fail(f"attention node {n.name!r} has a cache already")
        _check_heads(n, ids.type.shape)
    return _Decoder(ids, mask, attentions)


def _over_positions(softmax: Node) -> bool:
    """A Softmax whose axis is not a fixed size: over positions, an attention's. A router's
    over a mixture's experts (a static count) is per token and needs no cache."""
    t = softmax.inputs[0].type
    if t is None or t.shape is None:
        return True
    axis = softmax.attr("axis", -1)
    return not isinstance(t.shape[axis], int)


def _check_heads(n: Node, batch_seq: tuple) -> None:
    """A 3-D attention ([batch, seq, heads * head]) or a 4-D one ([batch, heads, seq, head],
    what attention-to-3d leaves where the heads are not a plain split of a projection: a norm
    per head, a partial rotary, a fused QKV whose heads interleave Q, K and V): self-attention
    over [batch, seq] with static key/value heads."""
    q, k, v = n.inputs[:3]
    shapes = [t.type.shape if t.type is not None else None for t in (q, k, v)]
    if any(s is None or len(s) not in (3, 4) or len(s) != len(shapes[0]) for s in shapes):
        raise _fail(f"attention node {n.name!r}: Q, K and V are not all [batch, seq, hidden] or all "
                    "[batch, heads, seq, head]")
    if len(shapes[0]) == 3:
        if n.attr("num_heads", 0) % (n.attr("kv_num_heads", 0) or n.attr("num_heads", 0) or 1):
            raise _fail(f"attention node {n.name!r}: num_heads is not a multiple of kv_num_heads")
        if not all(isinstance(s[2], int) for s in shapes[1:]):
            raise _fail(f"attention node {n.name!r}: the key's hidden size is not static")
        if any(tuple(s[:2]) != tuple(batch_seq) for s in shapes):
            raise _fail(f"attention node {n.name!r} is not self-attention over [batch, seq]")
        return
    if not all(isinstance(s[1], int) and isinstance(s[3], int) for s in shapes):
        raise _fail(f"attention node {n.name!r}: its heads or head size are not static")
    if shapes[0][1] % shapes[1][1] or shapes[1][1] != shapes[2][1]:
        raise _fail(f"attention node {n.name!r}: {shapes[0][1]} query heads over {shapes[1][1]} key and "
                    f"{shapes[2][1]} value heads")
    if any((s[0], s[2]) != tuple(batch_seq) for s in shapes):
        raise _fail(f"attention node {n.name!r} is not self-attention over [batch, seq]")


def _kv_heads(node: Node) -> tuple[int, int, int]:
    """(key/value heads, key head size, value head size) of a 3-D or 4-D attention."""
    k, v = node.inputs[1:3]
    if k.type.rank == 4:
        return k.type.shape[1], k.type.shape[3], v.type.shape[3]
    nkv = node.attr("kv_num_heads", 0) or node.attr("num_heads")
    return nkv, k.type.shape[2] // nkv, v.type.shape[2] // nkv


def _cone(targets: list[Value]) -> set[int]:
    """The ids of the nodes that `targets` are computed from."""
    needed, stack, seen = set(), list(targets), set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        n = v.producer()
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            stack.extend(n.inputs)
    return needed


def evaluate(graph: Graph, targets: list[Value], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run only the nodes `targets` depend on, with the reference kernels."""
    needed = _cone(targets)
    env: dict[int, np.ndarray] = {}
    for v in graph.inputs:
        if v.name in feeds:
            env[id(v)] = feeds[v.name]

    def value(v: Value | None):
        if v is None:
            return None
        if id(v) in env:
            return env[id(v)]
        if v.const_value is not None:
            return np.asarray(v.const_value)
        raise _fail(f"cannot evaluate {v.name!r}: no value for it")

    for node in graph.nodes:
        if id(node) not in needed:
            continue
        with np.errstate(all="ignore"):
            outs = run_reference(node, [value(v) for v in node.inputs])
        for v, r in zip(node.outputs, outs):
            if v is not None:
                env[id(v)] = np.asarray(r)
    return [value(t) for t in targets]


def _feeds(graph: Graph, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Inputs of the original graph at one binding: no padding, token 0."""
    return {v.name: np.ones((batch, seq), v.type.dtype.np_dtype) if v.name == MASK
            else np.zeros((batch, seq), v.type.dtype.np_dtype)
            for v in graph.inputs if not v.is_initializer}


# How long the masks are probed without a hint: a sliding window narrower than this is seen.
_WINDOW_PROBE = 64
# The longest probe a config's sliding_window may ask for (a [4097, 4097] mask: Mistral's 4096);
# a wider window below the context caps max-positions at the window instead.
_WINDOW_PROBE_MAX = 4096
META_SLIDING_WINDOW = "graphopt.sliding_window"  # the frontend's hint (a Hugging Face config's)


def _check_causal(graph: Graph, site: _Decoder, max_pos: int) -> list[tuple[int | None, tuple | None]]:
    """Every attention must be causal: its own flag, or a mask that is 0 on and below the
    diagonal and (nearly) -inf above it when nothing is padded, or causal within a sliding
    window (query i sees keys i - window < j <= i, as Mistral's, Phi-3's and Gemma's local
    layers do). The masks are probed at `_WINDOW_PROBE` positions, or one more than the
    window the frontend recorded (a window wider than the probe looks causal at it); a
    window the context cannot exceed is no window. A mask whose visible part is not 0 may be
    ALiBi's linear bias (BLOOM, MPT, Falcon): `slope[h] * j` plus anything constant along a
    row, which softmax ignores (`_alibi_slopes`). Returns each attention's (window, slopes):
    window None is causal, slopes None is no bias."""
    masks = {}
    for n in site.attentions:
        if len(n.inputs) > 3 and n.inputs[3] is not None:
            masks.setdefault(id(n.inputs[3]), (n.inputs[3], n))
        elif not n.attr("causal", 0):
            raise _fail(f"attention node {n.name!r} is not causal (no mask, causal=0): not a decoder")
    if not masks:
        return [None] * len(site.attentions)
    hint = int(graph.metadata.metadata_props.get(META_SLIDING_WINDOW, 0) or 0)
    seq = min(max_pos, max(_WINDOW_PROBE, hint + 1 if hint < max_pos else 0))  # at most _WINDOW_PROBE_MAX + 1
    values = evaluate(graph, [m for m, _ in masks.values()], _feeds(graph, 1, seq))
    i, j = np.indices((seq, seq))
    window_of = {}
    for (mask, node), value in zip(masks.values(), values):
        if value.dtype == np.bool_:
            value = np.where(value, 0.0, -np.inf)
        if value.ndim < 2:
            raise _fail(f"attention node {node.name!r}: its mask {mask.name!r} is not [.., seq, seq]")
        square = np.broadcast_to(value, value.shape[:-2] + (seq, seq)).reshape(-1, seq, seq)
        hidden = (square <= -1e4).all(axis=0)
        visible = (square > -1e4).all(axis=0)
        window = int(visible[-1].sum())  # the last query's keys: all of them unless windowed
        want = (j <= i) & (i - j < window)
        if not ((visible == want) & (hidden == ~want)).all() or node.attr("causal", 0) not in (0, 1):
            raise _fail(f"attention node {node.name!r}: its mask {mask.name!r} is neither causal nor causal within "
                        "a sliding window (an encoder?)")
        slopes = None
        if (square[:, want] != 0).any():
            slopes = _alibi_slopes(graph, node, mask, value, want)
        window_of[id(mask)] = (None if window >= seq else window, slopes)
    return [window_of[id(n.inputs[3])] if len(n.inputs) > 3 and n.inputs[3] is not None else (None, None)
            for n in site.attentions]


def _alibi_slopes(graph: Graph, node: Node, mask: Value, value: np.ndarray, visible: np.ndarray) -> tuple:
    """Each query head's ALiBi slope when the mask's visible part, probed without padding
    (`value`) and again with the first keys padded, is `slope[h] * j` plus a constant per row
    (what softmax ignores; BLOOM counts j from the first real token, MPT from the last key,
    both that); else the pass fails naming the mask."""
    heads = node.attr("num_heads", 0) or (node.inputs[0].type.shape[1] if node.inputs[0].type.rank == 4 else 0)

    def fail(why: str) -> KVCacheError:
        return _fail(f"attention node {node.name!r}: its mask {mask.name!r} adds a bias to the scores that is not "
                     f"ALiBi's slope per head times the key's position ({why})")
    seq = visible.shape[0]
    lead = value.shape[:-2]
    if len(lead) > 2 or any(d != 1 for d in lead[:-1]) or (lead and lead[-1] not in (1, heads)):
        raise fail(f"a [{', '.join(map(str, value.shape))}] mask, not [1, heads or 1, seq, seq]")

    def per_head(v: np.ndarray) -> np.ndarray:  # [heads or 1, seq, seq], float64
        if v.shape[:-2] != lead:
            raise fail(f"a [{', '.join(map(str, v.shape))}] mask with padding, [{', '.join(map(str, value.shape))}] "
                       "without")
        return np.broadcast_to(v, (1,) * (2 - len(lead)) + lead + (seq, seq)).reshape(-1, seq, seq).astype(np.float64)
    bias = per_head(value)
    steps = np.diff(bias, axis=-1)  # [h, i, j]: bias at j + 1 minus bias at j
    both = visible[:, 1:] & visible[:, :-1]
    slopes = np.array([np.median(steps[h][both]) for h in range(bias.shape[0])])
    scale = max(1.0, float(np.abs(bias[:, visible]).max()))
    if not np.allclose(steps[:, both], slopes[:, None], rtol=0, atol=1e-5 * scale):
        raise fail("it is not linear in the key's position")
    # with the first keys padded the real keys' bias must be the same up to a per-row constant
    pad = max(1, seq // 4)
    feeds = _feeds(graph, 1, seq)
    feeds[MASK][:, :pad] = 0
    padded = evaluate(graph, [mask], feeds)[0]
    padded = per_head(np.where(padded, 0.0, -np.inf) if padded.dtype == np.bool_ else padded)
    rows = visible & (np.arange(seq)[None, :] >= pad) & (np.arange(seq)[:, None] >= pad)
    both = rows[:, 1:] & rows[:, :-1]
    if (padded[:, rows] <= -1e4).any() or (padded[:, ~visible] > -1e4).any() \
            or not np.allclose(np.diff(padded, axis=-1)[:, both], slopes[:, None], rtol=0,
                               atol=1e-5 * scale):
        raise fail("it changes with left padding")
    return tuple(float(x) for x in np.broadcast_to(slopes, (heads,)))


def _shape_only(graph: Graph) -> set[int]:
    """Ids of the values computed from input shapes and weights only, never from input data."""
    data = {id(v) for v in graph.inputs if not v.is_initializer}
    out = set()
    for n in graph.nodes:
        if n.domain == "" and n.op_type in ("Shape", "Size"):
            out.update(id(v) for v in n.outputs if v is not None)
        elif any(v is not None and id(v) in data for v in n.inputs):
            data.update(id(v) for v in n.outputs if v is not None)
        else:
            out.update(id(v) for v in n.outputs if v is not None)
    return out


def _shape_nodes_reading(v: Value, source: Value | None) -> list[Node]:
    """The Shape (Size) nodes in `v`'s computation that read `source`."""
    found, seen, todo = [], set(), [v]
    while todo:
        n = todo.pop().producer()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.domain == "" and n.op_type in ("Shape", "Size"):
            if source is not None and n.inputs[0] is source:
                found.append(n)
            continue
        todo.extend(i for i in n.inputs if i is not None)
    return found


def _one_fill(*arrays: np.ndarray) -> bool:
    """Every element of every array is the same value (a tensor of zeros at any shape)."""
    first = [a.flat[0] for a in arrays if a.size]
    return bool(first) and all(a.size == 0 or np.all(a == first[0]) for a in arrays)


def _live_without_masks(graph: Graph, site: _Decoder) -> set[int]:
    """Ids of the nodes the outputs need once the attention masks are no longer read."""
    live_values = {id(v) for v in graph.outputs}
    live = set()
    for node in reversed(graph.nodes):
        if any(v is not None and id(v) in live_values for v in node.outputs):
            live.add(id(node))
            ins = node.inputs[:3] if node in site.attentions else node.inputs
            live_values.update(id(v) for v in ins if v is not None)
    return live


def _positional_values(graph: Graph, site: _Decoder, max_pos: int):
    """[(value, its data uses, table [max_pos, ...])] for every per-position table the model
    reads; refuses any other sequence-dependent value it reads. A constant fill sized by the
    tokens is left in place; where its size is read off the attention mask, those Shape nodes
    are pointed at input_ids (the same shape here, the step's once cached): the one change this
    makes to `graph`."""
    shape_only = _shape_only(graph)
    live = _live_without_masks(graph, site)
    frontier: dict[int, tuple[Value, list]] = {}
    for n in graph.nodes:
        if id(n) not in live:
            continue  # only the old mask reads it: it goes
        if not any(v is not None and id(v) not in shape_only and v.const_value is None for v in n.inputs):
            continue  # n itself is shape-only
        if n.domain == "" and n.op_type in ("Shape", "Size"):
            continue
        for i, v in enumerate(n.inputs):
            if v is None or id(v) not in shape_only or v.producer() is None:
                continue
            if n in site.attentions and i == 3:
                continue  # the old mask: replaced
            if n.domain == "" and i in _SHAPE_SLOTS.get(n.op_type, ()):
                continue
            frontier.setdefault(id(v), (v, []))[1].append((n, i))
    for v in graph.outputs:
        if id(v) in shape_only:
            raise _fail(f"output {v.name!r} does not depend on the tokens")
    values = [v for v, _ in frontier.values()]
    if not values:
        return []
    s1, s2 = _PROBE_SEQ
    at_s1 = evaluate(graph, values, _feeds(graph, 1, s1))
    at_s2 = evaluate(graph, values, _feeds(graph, 1, s2))
    at_b2 = evaluate(graph, values, _feeds(graph, 2, s1))
    positional = []
    for (v, uses), a1, a2, ab in zip(frontier.values(), at_s1, at_s2, at_b2):
        if _one_fill(a1, a2, ab):
            # zeros (ones, ...) as many as the step's tokens: as valid in a step (a router's scatter
            # target). The exporter may have sized it by the mask, whose [batch, seq] is the tokens'
            # here but [batch, past + seq] once cached: sized by input_ids instead, the same now.
            for n in _shape_nodes_reading(v, site.mask_input):
                n.set_input(0, site.input_ids)
            continue
        if a1.shape != ab.shape:
            raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}) depends on the batch size but not on the tokens")
        if a1.shape == a2.shape:
            if not np.array_equal(a1, a2, equal_nan=True):
                raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}) depends on the sequence length")
            continue  # a constant the folder left
        axes = [ax for ax in range(a1.ndim) if a1.shape[ax] == s1 and a2.shape[ax] == s2]
        others = all(a1.shape[ax] == a2.shape[ax] for ax in range(a1.ndim) if ax not in axes)
        if len(axes) != 1 or not others:
            raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}) depends on the sequence length, but not as "
                        "one table row per position")
        ax = axes[0]
        if ax == 0 or any(d != 1 for d in a1.shape[:ax]):
            raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}): a per-position table of shape "
                        f"{list(a1.shape)} (sequence axis {ax}) is not [1.., seq, ...]")
        if not np.array_equal(np.take(a2, range(s1), axis=ax), a1, equal_nan=True):
            raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}) depends on the sequence length, but its rows "
                        "are not a function of the position alone")
        (table,) = evaluate(graph, [v], _feeds(graph, 1, max_pos))
        if table.shape[ax] != max_pos:
            raise _fail(f"max-positions {max_pos} is past the model's {table.shape[ax]} positions (the rows of "
                        f"{v.name!r}): give max-positions <= {table.shape[ax]}")
        switch = None
        if not _same_rows(table, a2, s2, ax):
            # e.g. Phi-3's LongRoPE: other frequencies once the sequence is longer than the
            # original context: the short table up to that length, the long one after it
            switch = _length_switch(graph, v, ax, a2, table, max_pos)
            if switch is None:
                raise _fail(f"{v.name!r} (read by {uses[0][0].name!r}): its rows for the first positions change "
                            f"when the sequence grows to {max_pos} (a position encoding that depends on the "
                            "length, other than one switch from one table to another at a fixed length)")
            table, switch = switch
        positional.append((v, uses, np.ascontiguousarray(table.reshape(table.shape[ax:])), ax, switch))
    return [(v, uses, (table, ax, switch)) for v, uses, table, ax, switch in positional]


def _same_rows(table: np.ndarray, rows: np.ndarray, n: int, ax: int) -> bool:
    """The first `n` rows of `table` along `ax` are `rows`' first `n`."""
    return np.allclose(np.take(table, range(n), axis=ax), np.take(rows, range(n), axis=ax), rtol=1e-6, atol=1e-7,
                       equal_nan=True)


def _length_switch(graph: Graph, v: Value, ax: int, short_probe: np.ndarray, long: np.ndarray,
                   max_pos: int) -> tuple[np.ndarray, int] | None:
    """(the short table's rows then the long table's, the switch length T) when `v` reads one
    table of rows for every sequence up to T positions and another for every longer one
    (LongRoPE's short and long factors, Phi-3.5 and Phi-4-mini; transformers switches when the
    longest position reached passes the original context). T is found by bisection and the
    model is checked at lengths on both sides; None when `v` is not so."""
    n = short_probe.shape[ax]

    def at(length: int) -> np.ndarray:
        return evaluate(graph, [v], _feeds(graph, 1, length))[0]

    lo, hi = n, max_pos  # rows at lo match the short probe's, rows at hi do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _same_rows(at(mid), short_probe, n, ax) else (lo, mid)
    switch = lo
    short = at(switch)
    if any(not _same_rows(short, at(length), length, ax) for length in {n, (n + switch) // 2}):
        return None
    if any(not _same_rows(long, at(length), length, ax) for length in {switch + 1, (switch + 1 + max_pos) // 2}):
        return None
    return np.concatenate([short, long], axis=ax), switch


# --------------------------------------------------------------------------------------
# Building


class _Builder:
    """The per-step values, built once at the top of the graph and shared by every layer."""

    def __init__(self, graph: Graph, name_prefix: str = "kv_cache"):
        self.graph = graph
        self.b = Builder(graph, before=graph.nodes[0] if graph.nodes else None, created_by="rewrite-kv-cache",
                         name_prefix=name_prefix)

    def _i64(self, *xs, name="kv_const"):
        return self.b.const(np.array(xs, np.int64), name)

    def lengths(self, input_ids: Value, mask: Value) -> tuple[Value, Value]:
        """(past_seq [1], past_seq + seq as a scalar), built once and shared by the positions
        and the bias."""
        b = self.b
        total = b.Shape(mask, start=1, end=2)
        past = b.Sub(total, b.Shape(input_ids, start=1, end=2))
        return past, b.Squeeze(total, self._i64(0, name="kv_scalar_axis"))

    def position_ids(self, mask: Value, past: Value) -> Value:
        """Each token's position: how many real tokens precede it (left padding counts nothing;
        the exclusive CumSum is that count, never negative, so no clamp is needed)."""
        b = self.b
        m = mask if mask.type.dtype.np_dtype == np.int64 else b.Cast(mask, to=7)
        counted = b.CumSum(m, b.const(np.array(1, np.int64), "kv_seq_axis"), exclusive=1)
        # the last seq positions: from past_seq (not -seq: a negative start the TVM backend
        # cannot tell from a positive one when it is symbolic)
        pos = b.Slice(counted, past, self._i64(_INT64_MAX, name="kv_end"), self._i64(1, name="kv_axis"))
        pos.type = TensorType(pos.type.dtype, ("batch", "seq"))
        return pos

    def causal_bias(self, mask: Value, past: Value, total: Value, dt, window: int | None = None,
                    slopes: tuple | None = None) -> Value:
        """[batch, 1, seq, past_seq + seq]: 0 where query i (at past_seq + i) may attend key j
        (j <= past_seq + i and the key is not padding; with a sliding `window`, also
        j > past_seq + i - window), the type's lowest finite value elsewhere: one boolean, one Where.
        With ALiBi's `slopes` (one per head) the visible part is `slope[h] * (j - (past_seq + i))`
        instead of 0, [batch, heads, seq, past_seq + seq]: the model's bias up to a constant per
        row, never above 0 (small where it matters, as MPT's).

        Lowest, not -inf: a real query sees itself, so its row holds a 0 and the masked keys'
        weights underflow to exactly 0, as with -inf; a padded query (left padding: nothing
        real before it) would see no key at all, which with -inf is NaN in ORT's kernels and
        reaches the cache through the next layer's keys. With a finite bias no row is empty
        (such a row averages the values, as Hugging Face's own unmasking of empty rows does;
        its output is padding's, read by nobody), so the backends need no per-layer guard."""
        b = self.b
        cols = b.Range(b.const(np.array(0, np.int64), "kv_start"), total, b.const(np.array(1, np.int64), "kv_step"))
        places = b.Slice(cols, past, self._i64(_INT64_MAX, name="kv_end"), self._i64(0, name="kv_scalar_axis"))
        rows = b.Unsqueeze(places, self._i64(1, name="kv_col_axis"))  # seq, 1: the queries' places
        causal = b.LessOrEqual(cols, rows)  # seq, total
        if window is not None:  # and within the window: j > i - window
            first = b.Sub(rows, self._i64(window, name="kv_window"))
            causal = b.And(causal, b.Greater(cols, first))
        real = b.Cast(mask, to=DType.BOOL.onnx_type)
        real = b.Unsqueeze(real, self._i64(1, 2, name="kv_bias_axes"))  # batch, 1, 1, total
        seen = b.const(np.array(0, dt.np_dtype), "kv_bias_zero")
        if slopes is not None:  # heads, seq, total
            seen = b.Mul(b.Cast(b.Sub(cols, rows), to=dt.onnx_type),
                         b.const(np.array(slopes, dt.np_dtype).reshape(-1, 1, 1), "alibi_slopes"))
        bias = b.Where(b.And(real, causal), seen,
                       b.const(np.array(np.finfo(dt.np_dtype).min, dt.np_dtype), "kv_bias_lowest"))
        bias.type = TensorType(dt, ("batch", 1 if slopes is None else len(slopes), "seq", TOTAL_SEQ))
        return bias

    def switched_positions(self, position_ids: Value, switch: int) -> Value:
        """Rows of a table of `switch` short rows then the long ones: the position ids, moved
        past the short rows once the longest position any row reaches is `switch` or more (as
        transformers picks LongRoPE's factors, by the step's largest position id)."""
        b = self.b
        longest = b.ReduceMax(position_ids, keepdims=0)
        past = b.Cast(b.Greater(longest, b.const(np.array(switch - 1, np.int64), "kv_switch_last")),
                      to=DType.INT64.onnx_type)
        return b.Add(position_ids, b.Mul(past, b.const(np.array(switch, np.int64), "kv_switch")))

    def gather_positions(self, table_ax, position_ids: Value, old: Value) -> Value:
        table, ax, _ = table_ax
        b = self.b
        rows = b.Gather(b.const(table, f"{old.name}_table"), position_ids, axis=0)  # batch, seq, ...
        if ax > 1:  # [1, .., seq, ...]: the ones between batch and seq come back
            rows = b.Unsqueeze(rows, self._i64(*range(1, ax), name="kv_table_axes"))
        return rows


def _rotary_with_positions(graph: Graph, tables, positions, b: "_Builder") -> set:
    """A RotaryEmbedding whose cos/sin are both per-position tables takes the tables
    ([max_positions, rot/2]) and the position ids itself, as ORT's kernel does: no per-layer
    gather or flattening of caches. Returns the (node id, input index) uses it took over."""
    by_value = {id(v): table for v, _, table in tables}
    consts: dict[int, Value] = {}
    moved: set = set()
    for n in graph.nodes:
        if n.domain != GRAPHOPT_DOMAIN or n.op_type != "RotaryEmbedding" or len(n.inputs) != 3:
            continue
        cos, sin = (by_value.get(id(t)) for t in n.inputs[1:3])
        if cos is None or sin is None or cos[1] != 1 or sin[1] != 1 or cos[0].ndim != 2 or sin[0].ndim != 2 \
                or cos[2] != sin[2]:
            continue
        for index, (t, (table, _, _)) in ((1, (n.inputs[1], cos)), (2, (n.inputs[2], sin))):
            if id(t) not in consts:
                consts[id(t)] = b.b.const(table, f"{t.name}_table")
            n.set_input(index, consts[id(t)])
            moved.add((id(n), index))
        n.append_input(positions(cos[2]))
    return moved


def _rewrite_attention(graph: Graph, node: Node, layer: int, bias: Value, layout: str, max_pos: int,
                       block_size: int, table: Value | None) -> list[Value]:
    q, k, v = node.inputs[:3]
    nkv, head_k, head_v = _kv_heads(node)
    dt = k.type.dtype
    past = [graph.add_input(f"past_key_values.{layer}.{kind}",
                            TensorType(dt, cache_shape(layout, nkv, PAST_SEQ, head, max_pos, block_size)))
            for kind, head in (("key", head_k), ("value", head_v))]
    present_types = [TensorType(dt, cache_shape(layout, nkv, TOTAL_SEQ, head, max_pos, block_size))
                     for head in (head_k, head_v)]
    attrs = {name: a.value for name, a in node.attrs.items() if name not in ("causal", "kv_layout")}
    if layout != "BNSH":
        attrs["kv_layout"] = layout
    b = Builder(graph, before=node, created_by="rewrite-kv-cache")
    y, pk, pv = b.op("Attention", *attention_operands(q, k, v, bias, *past, table, sinks_of(node)),
                     domain=GRAPHOPT_DOMAIN, n_out=3,
                     output_types=[node.outputs[0].type, *present_types], causal=0, **attrs)
    node.outputs[0].replace_all_uses_with(y)
    graph.remove_node(node)
    graph.rename_value(pk, f"present.{layer}.key")
    graph.rename_value(pv, f"present.{layer}.value")
    return [pk, pv]


def _mask_per_position(graph: Graph, old: Value, mask: Value, input_ids: Value, past: Value) -> int:
    """A model that computes its own per-position values from the mask, other than the
    attention masks (OPT: its learned positions are `cumsum(mask) * mask - 1 + 2`), gets them
    computed from the mask with the past, its last `seq` positions sliced out where they meet
    the tokens' values. Only what the mask alone (and constants) computes is moved, and only
    when, on probe masks with left padding, a position's value computed from the mask up to it
    is its value in a longer sequence (a cached key must not change as the sequence grows)
    and the slice of the value computed with a past is what the full-sequence graph computes
    at those positions; a value whose sequence axis is not visible is left to `_retire_input`
    to refuse. Returns the number of values sliced."""
    shape_only = _shape_only(graph)
    consts = lambda v: v is None or v.const_value is not None or id(v) in shape_only  # noqa: E731
    pure: list[Node] = []  # nodes of the mask alone
    from_mask = {id(old)}
    for n in graph.nodes:
        if n.domain == "" and n.op_type in ("Shape", "Size"):
            continue
        ins = [v for v in n.inputs if v is not None]
        if any(id(v) in from_mask for v in ins) and all(id(v) in from_mask or consts(v) for v in ins):
            pure.append(n)
            from_mask.update(id(v) for v in n.outputs if v is not None)
    if not pure:
        return 0
    in_pure = {id(n) for n in pure}
    cuts = [v for n in pure for v in n.outputs if v is not None
            and (v.is_graph_output or any(id(u) not in in_pure for u, _ in v.uses()))]
    axes = [[ax for ax, d in enumerate(v.type.shape or ()) if d == "seq"] if v.type else [] for v in cuts]
    if not cuts or any(len(a) != 1 for a in axes):
        return 0
    s1, s2 = _PROBE_SEQ
    probe = np.ones((2, s2), old.type.dtype.np_dtype)
    probe[0, :2] = 0  # a left-padded row and a full one
    ids = lambda n: np.zeros((2, n), input_ids.type.dtype.np_dtype)  # noqa: E731
    want = evaluate(graph, cuts, {old.name: probe, input_ids.name: ids(s2)})
    # a cached position's value must not change as the sequence grows: computed from the
    # first s1 positions of the mask, it is the first s1 positions of the value at s2
    prefix = evaluate(graph, cuts, {old.name: probe[:, :s1], input_ids.name: ids(s1)})
    for v, (ax,), w, p in zip(cuts, axes, want, prefix):
        if not np.array_equal(np.take(w, range(s1), axis=ax), p, equal_nan=True):
            raise _fail(f"{v.name!r} is computed from the attention mask, but not one position at a time from "
                        "the mask before it (cannot compute it with a cache)")
    for n in pure:
        for i, v in enumerate(n.inputs):
            if v is old:
                n.set_input(i, mask)
        for v in n.outputs:
            if v is not None and v.type is not None and v.type.shape is not None:
                v.type = TensorType(v.type.dtype, tuple(TOTAL_SEQ if d == "seq" else d for d in v.type.shape))
    sliced = []
    for v, (ax,) in zip(cuts, axes):
        users = [(u, i) for u, i in v.uses() if id(u) not in in_pure]
        first = min((graph.nodes.index(u) for u, _ in users), default=len(graph.nodes) - 1)
        b = Builder(graph, before=graph.nodes[first], created_by="rewrite-kv-cache", name_prefix="kv_cache_mask")
        last = b.Slice(v, past, b.const(np.array([_INT64_MAX], np.int64), "kv_end"),
                       b.const(np.array([ax], np.int64), "kv_axis"))
        last.type = TensorType(v.type.dtype, tuple("seq" if d == TOTAL_SEQ else d for d in v.type.shape))
        for u, i in users:
            u.set_input(i, last)
        if v.is_graph_output:
            graph.outputs = [last if o is v else o for o in graph.outputs]
        sliced.append(last)
    # and the step's slice of the value computed with the past is the value at those positions
    got = evaluate(graph, sliced, {mask.name: probe, input_ids.name: ids(s1)})
    for v, (ax,), w, g in zip(cuts, axes, want, got):
        if not np.array_equal(np.take(w, range(s2 - s1, s2), axis=ax), g, equal_nan=True):
            raise _fail(f"{v.name!r}, computed from the attention mask, is not the same when computed with the "
                        "past (cannot compute it with a cache)")
    return len(sliced)


def _position_ids_from_mask(graph: Graph) -> None:
    """An exported `position_ids` input (Optimum lays a decoder out with one) is computed from
    the mask instead, as the artifact's signature has none: each token's count of real tokens
    before it (Hugging Face's `cumsum(mask) - 1` on real tokens; a pad's position is never
    read), of the mask's last `seq` columns when the mask covers a past."""
    by_name = {v.name: v for v in graph.inputs if not v.is_initializer}
    pos = by_name.get(POSITION_IDS)
    if pos is None:
        return
    ids, mask = by_name.get(INPUT_IDS), by_name.get(MASK)
    if ids is None or mask is None:
        raise _fail(f"input {POSITION_IDS!r} is computed from {MASK!r}, which the graph does not take")
    if pos.type is None or pos.type.shape is None or len(pos.type.shape) != 2 or pos.type.dtype.is_float:
        raise _fail(f"input {POSITION_IDS!r} is {pos.type}, expected integers [batch, seq]")
    b = _Builder(graph, "kv_cache_position_ids")  # (the convert path's nodes are kv_cache/...)
    past, _ = b.lengths(ids, mask)  # 0 on a full-sequence graph, whose mask has seq columns
    positions = b.position_ids(mask, past)
    if pos.type.dtype != DType.INT64:
        positions = b.b.Cast(positions, to=pos.type.dtype.onnx_type)
    positions.type = TensorType(pos.type.dtype, tuple(ids.type.shape))
    pos.replace_all_uses_with(positions)
    graph.inputs = [v for v in graph.inputs if v is not pos]


def _retire_input(graph: Graph, old: Value, input_ids: Value) -> None:
    """The full-sequence mask input goes; a Shape of it still read is the Shape of input_ids
    (the two had the same [batch, seq])."""
    for user, index in list(old.uses()):
        if user.domain == "" and user.op_type == "Shape":
            user.set_input(index, input_ids)
        else:
            raise _fail(f"node {user.name!r} ({user.op}) reads the attention mask other than through the "
                        "attention (cannot tell what it means with a cache)")
    graph.inputs = [v for v in graph.inputs if v is not old]


__all__ = ["RewriteKVCache", "check_layout", "evaluate", "KVCacheError"]
