"""AWQ (Lin et al., 2023): activation-aware scaling before block-wise quantization.

A few input channels of a linear layer carry most of the activation's magnitude; their weights
matter most. AWQ multiplies each input channel k of the weight by s[k] (so its rounding error
shrinks relative to it) and divides the activation by the same s[k], which leaves the fp32
function unchanged:

    Y = X @ W^T = (X / s) @ (W * s)^T

    s = mean|X|^alpha (normalized so that max(s) * min(s) = 1), alpha searched on a grid over
    calibration activations to minimize || X W^T - X (Q(W * s) / s)^T ||^2 over the layers
    that read X (alpha = 0 is plain round-to-nearest, so the search never does worse on the
    calibration data).

1/s is folded into the op that produces X where that is exact -- a norm's scale (and bias),
the output columns of a linear layer without a nonlinear activation (relu commutes with a
positive scale), the up projection of a gated MLP -- and kept as an explicit
`Mul(X, 1/s)` where it is not (for example after attention). A tied LM head is not scaled:
its table is shared with the embedding Gather.

Scales depend on the calibration data and on every layer that reads X, not on which layers
the accuracy guard later keeps in float: they are searched over all eligible layers once.
"""
from __future__ import annotations

import numpy as np

from graphopt.builder import Builder
from graphopt.interpreter import run as interpret
from graphopt.ir import GRAPHOPT_DOMAIN, Graph, Node, Value
from graphopt.ops.quant_format import block_params, dequantize_blockwise, fit_block, num_blocks, quantize_blockwise, quantize_values
from graphopt.pattern import constant_value

G = GRAPHOPT_DOMAIN
GRID = 20             # alpha in 0, 1/20, ..., 19/20 (AWQ's grid)
MAX_TOKENS = 4096     # activation rows kept per scaled input for the search
CLIP_TOKENS = 512     # activation rows for the clip search (AWQ's n_sample_token)
CLIP_RATIOS = 1 - np.arange(GRID // 2) / GRID  # 1, 0.95, ..., 0.55: the block's range kept


def search_scale(x: np.ndarray, w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """x [T, K] activations, w_nk [N, K] the weights that read them -> (alpha, s [K] or None
    for alpha = 0, the output errors per alpha)."""
    x = np.asarray(x, np.float32)
    w_nk = np.asarray(w_nk, np.float32)
    ref = x @ w_nk.T
    mean_abs = np.abs(x).mean(axis=0).astype(np.float64)
    errors, best = [], (np.inf, 0.0, None)
    for alpha in np.arange(GRID) / GRID:
        s = np.maximum(mean_abs ** alpha, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        s = s.astype(np.float32)
        packed, scales, zp = quantize_blockwise(w_nk * s, bits, block_size, symmetric)
        w_hat = dequantize_blockwise(packed, scales, zp, bits, block_size, w_nk.shape[1]) / s
        err = float(np.mean((x @ w_hat.T - ref) ** 2))
        errors.append(err)
        if err < best[0]:
            best = (err, float(alpha), None if alpha == 0 else s)
    return best[1], best[2], errors


def search_clip(x: np.ndarray, w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """AWQ's clip search: per (output row, block), the fraction of the block's range to keep
    (1 = round to nearest) that minimizes the block's contribution to the output error on x
    [T, K]. Returns ratios [N, n_blocks]."""
    n, k = w_nk.shape
    nb = num_blocks(k, block_size)
    pad = nb * block_size - k
    wb = np.pad(np.asarray(w_nk, np.float32), ((0, 0), (0, pad))).reshape(n, nb, block_size)
    x = np.asarray(x, np.float32)
    if len(x) > CLIP_TOKENS:
        x = x[np.linspace(0, len(x) - 1, CLIP_TOKENS).astype(int)]
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(len(x), nb, block_size)
    best_err = np.full((n, nb), np.inf)
    best = np.ones((n, nb), np.float32)
    for ratio in CLIP_RATIOS:
        dw = wb - clipped_dequantize(wb, np.full((n, nb), ratio, np.float32), bits, symmetric)
        err = (np.einsum("tbi,nbi->tnb", xb, dw) ** 2).mean(axis=0)
        better = err < best_err
        best_err[better], best[better] = err[better], ratio
    return best


def clipped_params(w_blocks: np.ndarray, ratio: np.ndarray, bits: int, symmetric: bool):
    """Scales and zero points of blocks [..., block_size] whose range is cut to `ratio` [...]."""
    return block_params(w_blocks * ratio[..., None], bits, symmetric)


def clipped_dequantize(w_blocks: np.ndarray, ratio: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    scale, zp = clipped_params(w_blocks, ratio, bits, symmetric)
    center = np.float32(2 ** (bits - 1)) if zp is None else zp[..., None].astype(np.float32)
    q = quantize_values(w_blocks, scale[..., None], None if zp is None else zp[..., None], bits)
    return (q.astype(np.float32) - center) * scale[..., None]


def quantize_clipped(w_nk: np.ndarray, ratio: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """quant_format.quantize_rows with each block's range cut to `ratio` [N, n_blocks]."""
    n, k = w_nk.shape
    nb = num_blocks(k, block_size)
    blocks = np.pad(np.asarray(w_nk, np.float32), ((0, 0), (0, nb * block_size - k))).reshape(n, nb, block_size)
    scale, zp = clipped_params(blocks, ratio, bits, symmetric)
    q = quantize_values(blocks, scale[..., None], None if zp is None else zp[..., None], bits)
    return q.reshape(n, nb * block_size)[:, :k], scale, zp


def fold_scale(graph: Graph, x: Value, readers: list[Node], s: np.ndarray, tag: str) -> str:
    """Divide X by s: in its producer where exact, else by a new Mul read by `readers` (the
    layers whose weights are multiplied by s). Returns how (for the report)."""
    inv = (1.0 / s).astype(np.float32)
    node = x.producer()
    only_readers = not x.is_graph_output and {id(n) for n, _ in x.uses()} <= {id(n) for n in readers}
    if node is not None and only_readers and x is node.outputs[0]:
        edits = _producer_edits(node, inv)
        if edits is not None:
            b = Builder(graph, before=node, created_by="quantize-weights")
            for i, array in edits:
                old = node.inputs[i]
                node.set_input(i, b.const(array.astype(old.const_value.dtype), f"{old.name}_awq"))
                if not old.uses() and not old.is_graph_output:
                    graph.remove_initializer(old.name)
            return f"folded into {node.op}"
    b = Builder(graph, before=readers[0], created_by="quantize-weights", name_prefix=f"{tag}/awq")
    scaled = b.Mul(x, b.const(inv.astype(x.type.dtype.np_dtype), f"{tag}_awq_inv_scale"))
    for n in readers:
        for i, v in enumerate(n.inputs):
            if v is x:
                n.set_input(i, scaled)
    return "Mul"


def _producer_edits(node: Node, inv: np.ndarray) -> list[tuple[int, np.ndarray]] | None:
    """(input index, new constant) that divide the node's first output by s exactly, or None."""
    ins = node.inputs
    k = inv.shape[0]

    def vec(i):  # a constant [K] input, or None
        c = constant_value(ins[i]) if i < len(ins) and ins[i] is not None else None
        return c if c is not None and c.shape == (k,) else None

    def columns(i, trans=False):  # a constant matrix whose output features (N = K here) get scaled
        c = constant_value(ins[i]) if ins[i] is not None else None
        if c is None or c.ndim != 2 or c.shape[0 if trans else 1] != k:
            return None
        return c * (inv[:, None] if trans else inv[None, :])

    norms = {"graphopt.RMSNorm": 1, "graphopt.SkipNorm": 2, "LayerNormalization": 1}  # -> index of the scale
    if node.op in norms:
        if node.op == "LayerNormalization" and node.attr("axis", -1) not in (-1, node.outputs[0].type.rank - 1):
            return None
        first = norms[node.op]
        edits = [(i, vec(i)) for i in (first, first + 1) if i < len(ins) and ins[i] is not None]  # scale, bias
        return None if any(c is None for _, c in edits) else [(i, c * inv) for i, c in edits]
    if node.domain == G and node.op_type == "Linear" and node.attr("activation", "") in ("", "relu"):
        w = columns(1, trans=bool(node.attr("trans_w", 0)))
        if w is None or (len(ins) > 2 and ins[2] is not None and vec(2) is None):
            return None
        return [(1, w)] + ([(2, vec(2) * inv)] if len(ins) > 2 and ins[2] is not None else [])
    if node.domain == G and node.op_type == "GatedLinear":  # act(x Wg) * (x Wu): scale the up side
        w = columns(2)
        if w is None or (len(ins) > 4 and ins[4] is not None and vec(4) is None):
            return None
        return [(2, w)] + ([(4, vec(4) * inv)] if len(ins) > 4 and ins[4] is not None else [])
    if node.domain == "" and node.op_type == "MatMul":
        w = columns(1)
        return None if w is None else [(1, w)]
    return None


def scale_weight(graph: Graph, node: Node, kind: str, s: np.ndarray) -> None:
    """Multiply the float weight(s) of the layer at `node` by s along K (exact in fp32)."""
    b = Builder(graph, before=node, created_by="quantize-weights")
    if kind == "gated-linear":
        slots = [(1, 0), (2, 0)]  # [K, N]
    elif kind == "linear":
        slots = [(1, 1 if node.attr("trans_w", 0) else 0)]
    elif kind == "gemm":
        slots = [(1, 1 if node.attr("transB", 0) else 0)]
    else:  # matmul
        slots = [(1, 0)]
    for i, k_axis in slots:
        old = node.inputs[i]
        w = constant_value(old)
        scaled = w * (s[:, None] if k_axis == 0 else s[None, :])
        node.set_input(i, b.const(scaled.astype(w.dtype), f"{old.name}_awq"))
        if not old.uses() and not old.is_graph_output:
            graph.remove_initializer(old.name)


def awq_rescale(graph: Graph, sites: list, feeds_list: list[dict], bits: int, block_size: int, symmetric: bool,
                progress=None, cache: dict | None = None, clip: bool = True) -> list[dict]:
    """Search and apply AWQ scales for `sites` (weights.Site, grouped by the input they read),
    in place; the graph computes the same function in fp32 afterwards. With `clip`, also
    search each block's clipping for awq_quantize. Returns one record per group: its layers,
    alpha and where 1/s went."""
    progress = progress or (lambda msg: None)
    cache = {} if cache is None else cache
    groups: dict[int, list] = {}
    for site in sites:
        if site.kind != "tied":  # the table is the embedding's too
            groups.setdefault(id(site.x), []).append(site)
    key = _key(bits, block_size, symmetric)
    todo = [g for g in groups.values()
            if (g[0].node.name, key) not in cache or (clip and (g[0].node.name, ("clip",) + key) not in cache)]
    if todo:
        acts = _activations(graph, [g[0].x for g in todo], feeds_list, progress)
        for i, group in enumerate(todo):
            progress(f"awq {i + 1}/{len(todo)}: {', '.join(s.node.name for s in group)}")
            w = np.concatenate([s.w_nk for s in group], axis=0)
            x = acts[id(group[0].x)]
            bs = fit_block(w.shape[1], bits, block_size, group[0].x.type.dtype.np_dtype.itemsize, not symmetric)
            alpha, s, _ = search_scale(x, w, bits, bs, symmetric)
            cache[group[0].node.name, key] = (alpha, s)
            if not clip:
                continue
            if s is not None:
                x, w = x / s, w * s
            rows = np.cumsum([0] + [site.w_nk.shape[0] for site in group])
            ratio = search_clip(x, w, bits, bs, symmetric)
            for site, lo, hi in zip(group, rows[:-1], rows[1:]):
                cache[site.node.name, ("clip",) + key] = ratio[lo:hi]
    records = []
    for group in groups.values():
        alpha, s = cache[group[0].node.name, key]
        how = None
        if s is not None:
            for site in group:
                scale_weight(graph, site.node, site.kind, s)
            how = fold_scale(graph, group[0].x, [site.node for site in group], s, group[0].node.name)
        records.append({"nodes": [site.node.name for site in group], "alpha": alpha, "inverse_scale": how})
    return records


def awq_quantize(name: str, w_nk: np.ndarray, cache: dict, bits: int, block_size: int, symmetric: bool,
                 fitted: int | None = None):
    """The layer `name` (its weight already scaled by awq_rescale) with its searched clip
    ratios, in blocks of `fitted` (fit_block's for the layer; default `block_size`); round to
    nearest where there are none (a tied head)."""
    ratio = cache.get((name, ("clip",) + _key(bits, block_size, symmetric)))
    block_size = fitted or block_size
    if ratio is None:
        ratio = np.ones((w_nk.shape[0], num_blocks(w_nk.shape[1], block_size)), np.float32)
    return quantize_clipped(w_nk, ratio, bits, block_size, symmetric)


def _key(bits: int, block_size: int, symmetric: bool) -> tuple:
    return ("awq", bits, block_size, symmetric)


def _activations(graph: Graph, xs: list[Value], feeds_list: list[dict], progress) -> dict[int, np.ndarray]:
    """Rows of each value over the calibration feeds (up to MAX_TOKENS, spread evenly)."""
    rows: dict[int, list] = {id(x): [] for x in xs}
    for i, feeds in enumerate(feeds_list):
        progress(f"awq calibration {i + 1}/{len(feeds_list)}")
        values = {**feeds, **interpret(graph, feeds, keep_all=True)}
        for x in xs:
            rows[id(x)].append(np.asarray(values[x.name], np.float32).reshape(-1, x.type.shape[-1]))
    out = {}
    for key, parts in rows.items():
        a = np.concatenate(parts)
        if len(a) > MAX_TOKENS:
            a = a[np.linspace(0, len(a) - 1, MAX_TOKENS).astype(int)]
        out[key] = a
    return out
