"""Structured pruning: prune-mlp and prune-heads against PyTorch models with the same channels and heads removed."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from graphopt.errors import UserError
from graphopt.interpreter import run as interpret
from graphopt.pass_manager import PassManager
from graphopt.passes.pruning.common import parameter_count
from graphopt.testing import assert_close, token_feeds
from graphopt.text import parse_graph, print_graph
from graphopt.verify import verify


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(the transformers module, its graph after the default recipe): a 2-layer Llama with
    hidden 32, intermediate 64, 4 query heads over 2 KV heads, random weights."""
    from graphopt.driver import default_pipeline
    from graphopt.models import load_graph
    from graphopt.testing import tiny_hf_model

    module = tiny_hf_model("llama")
    folder = tmp_path_factory.mktemp("llama")
    module.model.save_pretrained(folder)
    return module, PassManager(default_pipeline()).run(load_graph(str(folder)))


def torch_logits(module, feeds):
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


def torch_mlp_magnitudes(module) -> list[np.ndarray]:
    """Per layer, each MLP channel's L2 norm over its gate row, up row and down column."""
    out = []
    for layer in module.model.model.layers:
        mlp = layer.mlp
        g, u, d = (p.weight.detach().double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        out.append(((g * g).sum(1) + (u * u).sum(1) + (d * d).sum(0)).sqrt().numpy())
    return out


def torch_input_sq_norms(module, projections: str, calibration: list[dict]) -> list[np.ndarray]:
    """Per layer, the summed squares, per channel, of the input of `projections` ("mlp.down_proj"
    or "self_attn.o_proj") over the calibration feeds, from PyTorch forward hooks."""
    import torch

    sums = {}
    hooks = []
    for i, layer in enumerate(module.model.model.layers):
        proj = layer.get_submodule(projections)

        def hook(_, args, i=i):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[i] = sums.get(i, 0) + (x * x).sum(0).numpy()
        hooks.append(proj.register_forward_pre_hook(hook))
    try:
        for feeds in calibration:
            torch_logits(module, feeds)
    finally:
        for h in hooks:
            h.remove()
    return [sums[i] for i in range(len(sums))]


def keep_lowest_removed(score: np.ndarray, n_remove: int) -> np.ndarray:
    return np.sort(np.argsort(-score, kind="stable")[: len(score) - n_remove])


def prune_torch_mlps(module, n_remove: int, keeps: list[np.ndarray] | None = None):
    """The module with `n_remove` channels cut from every MLP, chosen independently of the
    pass: the lowest L2 norm over the channel's gate row, up row and down column (or the
    channels `keeps` per layer)."""
    import torch

    pruned = copy.deepcopy(module)
    scores = torch_mlp_magnitudes(module)
    for i, layer in enumerate(pruned.model.model.layers):
        mlp = layer.mlp
        keep = keeps[i] if keeps is not None else keep_lowest_removed(scores[i], n_remove)
        keep = torch.from_numpy(np.asarray(keep))
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(keep), bias=False)
            new.weight.data = old.weight.data[keep].clone()
            setattr(mlp, name, new)
        new = torch.nn.Linear(len(keep), mlp.down_proj.out_features, bias=False)
        new.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj = new
    return pruned.eval()


def test_ratio_zero_is_an_exact_no_op(llama):
    _, fused = llama
    g = fused.copy()
    before = print_graph(g, header=False)  # the header lists the passes run
    pm = PassManager("prune-mlp{ratio=0}")
    out = pm.run(g)
    assert print_graph(out, header=False) == before
    assert {n: v.const_value for n, v in out.initializers.items()}.keys() == fused.initializers.keys()
    for name, v in out.initializers.items():
        assert v.const_value is fused.initializers[name].const_value, name
    assert not pm.records[0].changed and pm.records[0].stats == {}


def test_prune_mlp_equals_torch_with_the_same_channels_removed(llama, tmp_path):
    import graphopt

    module, fused = llama
    hidden, inter, layers = 32, 64, 2
    ratio, n_remove = 0.25, 16
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(module, n_remove), feeds)
    # the reference differs from the unpruned model, so a pass that did nothing would fail
    assert np.abs(want - torch_logits(module, feeds)).max() > 1e-3

    g = fused.copy()
    pm = PassManager(f"prune-mlp{{ratio={ratio}}}")
    out = pm.run(g)
    verify(out)
    stats = pm.records[0].stats
    expected_params = layers * n_remove * 3 * hidden
    assert stats == {"layers": layers, "channels": layers * n_remove, "parameters": expected_params}
    assert parameter_count(fused) - parameter_count(out) == expected_params
    ups = [n for n in out.nodes if n.op == "graphopt.GatedLinear"]
    assert [n.outputs[0].type.shape[-1] for n in ups] == [inter - n_remove] * layers
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")

    artifact = tmp_path / "pruned"
    res = graphopt.optimize(fused.copy(), artifact, passes=f"prune-mlp{{ratio={ratio}}}", kv_cache=False)
    assert parameter_count(res.graph) == parameter_count(out)
    got = graphopt.load(artifact).run(feeds)["logits"]
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="onnxruntime")


CALIBRATION = [token_feeds(2, 8, seed=11, pad=False), token_feeds(2, 8, seed=12, pad=False)]


def torch_wanda_mlp_keeps(module, calibration, n_remove: int) -> list[np.ndarray]:
    """Per layer, the MLP channels Wanda keeps: ||h_j|| (down_proj's input) x |down column j|_1."""
    norms = torch_input_sq_norms(module, "mlp.down_proj", calibration)
    wanda = [np.sqrt(n) * layer.mlp.down_proj.weight.detach().double().abs().sum(0).numpy()
             for n, layer in zip(norms, module.model.model.layers)]
    return [keep_lowest_removed(w, n_remove) for w in wanda]


def test_prune_mlp_wanda_equals_torch_with_the_wanda_channels_removed(llama):
    from graphopt.pass_manager import PassContext

    module, fused = llama
    n_remove = 24
    keeps = torch_wanda_mlp_keeps(module, CALIBRATION, n_remove)
    # Wanda and magnitude choose differently here, so a pass that ignored the data would fail
    assert any(set(k) != set(keep_lowest_removed(m, n_remove)) for k, m in zip(keeps, torch_mlp_magnitudes(module)))
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(module, n_remove, keeps), feeds)

    pm = PassManager("prune-mlp{ratio=0.375,importance=wanda}", ctx=PassContext(hints={"calibration": CALIBRATION}))
    out = pm.run(fused.copy())
    verify(out)
    assert [d["keep"] for d in pm.records[0].details if "keep" in d] == [k.tolist() for k in keeps]
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")


def test_prune_heads_wanda_equals_torch_with_the_wanda_groups_removed(llama):
    from graphopt.pass_manager import PassContext

    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_heads(module, 1, torch_input_sq_norms(module, "self_attn.o_proj", CALIBRATION)), feeds)
    pm = PassManager("prune-heads{ratio=0.5,importance=wanda}", ctx=PassContext(hints={"calibration": CALIBRATION}))
    out = pm.run(fused.copy())
    verify(out)
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")


def test_wanda_without_calibration_data_says_what_to_give(llama):
    with pytest.raises(UserError, match=r"prune-mlp\{importance=wanda\} needs calibration data: give --calibration"):
        PassManager("prune-mlp{ratio=0.5,importance=wanda}").run(llama[1].copy())


def test_global_scope_removes_the_lowest_of_the_whole_model(llama):
    module, fused = llama
    scores = torch_mlp_magnitudes(module)
    # independently of the pass: walk all channels from the lowest score up
    ranked = sorted((float(s), li, j) for li, layer in enumerate(scores) for j, s in enumerate(layer))
    removed = [set(), set()]
    for _, li, j in ranked[: int(0.4 * 128)]:
        removed[li].add(j)
    assert len(removed[0]) != len(removed[1])  # the layers lose different counts, unlike scope=layer
    keeps = [np.array([j for j in range(64) if j not in r]) for r in removed]
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(module, 0, keeps), feeds)

    pm = PassManager("prune-mlp{ratio=0.4,scope=global}")
    out = pm.run(fused.copy())
    verify(out)
    assert pm.records[0].stats["channels"] == int(0.4 * 128)
    assert [d["keep"] for d in pm.records[0].details if "keep" in d] == [k.tolist() for k in keeps]
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")

    pm = PassManager("prune-mlp{ratio=0.9,scope=global,min-keep=40}")
    pm.run(fused.copy())
    assert [d["kept"] for d in pm.records[0].details if "kept" in d] == [40, 40]


def test_block_flops_before_and_after_are_counted(llama):
    from graphopt.passes.pruning.flops import FLOPS_SEQ_LEN

    pm = PassManager("prune-heads{ratio=0.5},prune-mlp{ratio=0.25}")
    pm.run(llama[1].copy())
    heads, mlp = ({k: v for d in r.details for k, v in d.get("block_flops", {}).items()} for r in pm.records)
    s, hidden, layers = FLOPS_SEQ_LEN, 32, 2
    # per layer: Q/K/V 32 x (32 + 16 + 16), output 32 x 32, attention 4 * s * 32, gate+up+down 3 x 32 x 64
    per_token = layers * (2 * hidden * 64 + 2 * hidden * 32 + 4 * s * 32 + 2 * 3 * hidden * 64)
    assert heads["before"] == s * per_token
    # half the heads: Q/K/V, output and attention halve
    assert heads["after"] == s * (per_token - layers * (hidden * 64 + hidden * 32 + 2 * s * 32))
    assert mlp["before"] == heads["after"]
    assert mlp["after"] == mlp["before"] - s * layers * 2 * 3 * hidden * 16


def test_min_keep_bounds_each_layer(llama):
    _, fused = llama
    pm = PassManager("prune-mlp{ratio=0.9,min-keep=40}")
    out = pm.run(fused.copy())
    assert [d["kept"] for d in pm.records[0].details if "kept" in d] == [40, 40]
    assert [n.outputs[0].type.shape[-1] for n in out.nodes if n.op == "graphopt.GatedLinear"] == [40, 40]


# A GPT-2 style MLP: Linear with an activation and a bias, then Linear with trans_w and a bias.
RNG = np.random.default_rng(0)
WEIGHTS = {"w1": RNG.standard_normal((8, 12)).astype(np.float32), "b1": RNG.standard_normal(12).astype(np.float32),
           "w2": RNG.standard_normal((8, 12)).astype(np.float32), "b2": RNG.standard_normal(8).astype(np.float32)}
GELU_MLP = '''graph @mlp(%x: f32[batch, 8]) -> (f32[batch, 8]) {
  weights {
    @w1: f32[8, 12]
    @b1: f32[12]
    @w2: f32[8, 12]
    @b2: f32[8]
  }
  %h = graphopt.Linear(%x, @w1, @b1) {activation="gelu"} : f32[batch, 12] loc("fc")
  %y = graphopt.Linear(%h, @w2, @b2) {trans_w=1} : f32[batch, 8] loc("proj")
  return %y
}
'''


def test_linear_activation_mlp_with_biases():
    from scipy.special import erf

    g = parse_graph(GELU_MLP, weights=WEIGHTS)
    pm = PassManager("prune-mlp{ratio=0.5}")
    out = pm.run(g)
    w1, b1, w2, b2 = (WEIGHTS[k] for k in ("w1", "b1", "w2", "b2"))
    score = np.sqrt((w1.astype(np.float64) ** 2).sum(0) + (w2.astype(np.float64) ** 2).sum(0))
    keep = np.sort(np.argsort(-score)[:6])
    assert pm.records[0].details[0]["keep"] == keep.tolist()
    assert pm.records[0].stats["parameters"] == 6 * (8 + 1 + 8)
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    h = x.astype(np.float64) @ w1[:, keep] + b1[keep]
    want = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ w2[:, keep].T + b2
    assert_close(interpret(out, {"x": x})["y"], want.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_an_intermediate_with_another_reader_is_left_alone():
    text = GELU_MLP.replace("-> (f32[batch, 8])", "-> (f32[batch, 8], f32[batch, 12])").replace(
        "return %y", "return %y, %h")
    g = parse_graph(text, weights=WEIGHTS)
    before = print_graph(g, header=False)  # the header lists the passes run
    pm = PassManager("prune-mlp{ratio=0.5}")
    out = pm.run(g)
    assert print_graph(out, header=False) == before
    assert pm.records[0].details == [{"node": "fc", "op": "graphopt.Linear",
                                      "reason": "the intermediate has other readers than the down projection"}]


def test_pruning_before_fusion_is_refused():
    with pytest.raises(UserError, match="'prune-mlp' needs 'fuse-gated-mlp' or 'fuse-linear' before it"):
        PassManager("prune-mlp{ratio=0.5},fuse-linear")
    with pytest.raises(UserError, match="'prune-heads' needs 'attention-to-3d' before it"):
        PassManager("prune-heads{ratio=0.5},attention-to-3d")


@pytest.mark.parametrize("options", ["ratio=1.0", "ratio=-0.1", "min-keep=0", "importance=taylor", "importance=random",
                                     "scope=model"])
@pytest.mark.parametrize("name", ["prune-mlp", "prune-heads"])
def test_bad_options_are_refused_when_the_pipeline_is_parsed(name, options):
    with pytest.raises(UserError, match=name):
        PassManager(f"{name}{{{options}}}")


# --------------------------------------------------------------------------------------
# prune-heads

def prune_torch_heads(module, n_remove: int, sq_norms: list[np.ndarray] | None = None):
    """The module with `n_remove` KV groups (each KV head with the query heads that read it)
    cut from every attention, scored independently of the pass: the L2 norm of the group's
    q/k/v rows and o_proj columns; with `sq_norms` (per layer, o_proj's input squared norms),
    Wanda: sum over the group's o_proj columns of ||x_r|| * |column r|_1."""
    import torch

    pruned = copy.deepcopy(module)
    cfg = pruned.model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for li, layer in enumerate(pruned.model.model.layers):
        att = layer.self_attn
        q, k, v, o = (p.weight.detach().double() for p in (att.q_proj, att.k_proj, att.v_proj, att.o_proj))

        def q_idx(groups):
            return [h * d + i for j in groups for h in range(j * group, (j + 1) * group) for i in range(d)]

        def kv_idx(groups):
            return [j * d + i for j in groups for i in range(d)]

        score = np.array([float(((q[q_idx([j])] ** 2).sum() + (k[kv_idx([j])] ** 2).sum() + (v[kv_idx([j])] ** 2).sum()
                                 + (o[:, q_idx([j])] ** 2).sum()).sqrt()) for j in range(cfg.num_key_value_heads)])
        if sq_norms is not None:
            per_column = np.sqrt(sq_norms[li]) * o.abs().sum(0).numpy()
            score = np.array([per_column[q_idx([j])].sum() for j in range(cfg.num_key_value_heads)])
        keep = np.sort(np.argsort(-score, kind="stable")[: len(score) - n_remove])
        for name, rows in (("q_proj", q_idx(keep)), ("k_proj", kv_idx(keep)), ("v_proj", kv_idx(keep))):
            old = getattr(att, name)
            new = torch.nn.Linear(old.in_features, len(rows), bias=False)
            new.weight.data = old.weight.data[rows].clone()
            setattr(att, name, new)
        cols = q_idx(keep)
        new = torch.nn.Linear(len(cols), att.o_proj.out_features, bias=False)
        new.weight.data = att.o_proj.weight.data[:, cols].clone()
        att.o_proj = new
    return pruned.eval()


def test_prune_heads_ratio_zero_is_an_exact_no_op(llama):
    _, fused = llama
    g = fused.copy()
    before = print_graph(g, header=False)
    pm = PassManager("prune-heads{ratio=0}")
    out = pm.run(g)
    assert print_graph(out, header=False) == before
    for name, v in out.initializers.items():
        assert v.const_value is fused.initializers[name].const_value, name
    assert not pm.records[0].changed


def test_prune_heads_equals_torch_with_the_same_groups_removed(llama, tmp_path):
    import graphopt

    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_heads(module, 1), feeds)
    assert np.abs(want - torch_logits(module, feeds)).max() > 1e-3

    pm = PassManager("prune-heads{ratio=0.5}")
    out = pm.run(fused.copy())
    verify(out)
    # per layer: 2 query heads (2 x 8 x 32) and one K and one V head (8 x 32 each) of the
    # Q/K/V projection, and 16 input rows (16 x 32) of the output projection
    per_layer = 2 * 8 * 32 + 2 * 8 * 32 + 16 * 32
    assert pm.records[0].stats == {"layers": 2, "heads": 4, "kv-heads": 2, "parameters": 2 * per_layer}
    assert parameter_count(fused) - parameter_count(out) == 2 * per_layer
    atts = [n for n in out.nodes if n.op == "graphopt.Attention"]
    assert [(n.attr("num_heads"), n.attr("kv_num_heads")) for n in atts] == [(2, 1), (2, 1)]
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")

    artifact = tmp_path / "pruned"
    graphopt.optimize(fused.copy(), artifact, passes="prune-heads{ratio=0.5}", kv_cache=False)
    assert_close(graphopt.load(artifact).run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")


def test_heads_and_mlp_together_through_onnxruntime(llama, tmp_path):
    import graphopt

    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(prune_torch_heads(module, 1), 16), feeds)
    artifact = tmp_path / "pruned"
    res = graphopt.optimize(fused.copy(), artifact, passes="prune-heads{ratio=0.5},prune-mlp{ratio=0.25}",
                            kv_cache=False)
    # per layer: the heads (as in the test above), then 16 channels of gate, up and down
    assert parameter_count(fused) - parameter_count(res.graph) == 2 * (1536 + 16 * 3 * 32)
    assert_close(graphopt.load(artifact).run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")


def test_min_keep_keeps_kv_groups(llama):
    _, fused = llama
    pm = PassManager("prune-heads{ratio=0.5,min-keep=2}")
    pm.run(fused.copy())
    assert not pm.records[0].changed


# --------------------------------------------------------------------------------------
# GPT-2: multi-head attention (an equal Split), Linear(gelu) + Linear MLPs, biases everywhere

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A 2-layer GPT-2 (hidden 32, 4 heads, MLP 128) with random weights and random biases (the
    default initialization zeroes them, and the cleanup would fold zero biases away)."""
    import torch

    from graphopt.driver import default_pipeline
    from graphopt.models import load_graph
    from graphopt.testing import tiny_hf_model

    module = tiny_hf_model("gpt2", seed=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if name.endswith(".bias") and (".attn." in name or ".mlp." in name):
                p.copy_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("gpt2")
    module.model.save_pretrained(folder)
    return module, PassManager(default_pipeline()).run(load_graph(str(folder)))


def prune_torch_gpt2(module, n_heads: int, n_channels: int):
    """GPT-2 (Conv1D weights are [in, out]) with `n_heads` heads and `n_channels` MLP channels
    cut from every block, scored as the passes score them but computed here from torch."""

    pruned = copy.deepcopy(module)
    cfg = pruned.model.config
    e, nh = cfg.n_embd, cfg.n_head
    d = e // nh
    for block in pruned.model.transformer.h:
        att, mlp = block.attn, block.mlp
        w, o = att.c_attn.weight.detach().double(), att.c_proj.weight.detach().double()
        cols = [[p * e + h * d + i for p in range(3) for i in range(d)] for h in range(nh)]
        rows = [[h * d + i for i in range(d)] for h in range(nh)]
        score = np.array([float(((w[:, cols[h]] ** 2).sum() + (o[rows[h]] ** 2).sum()).sqrt()) for h in range(nh)])
        keep = np.sort(np.argsort(-score, kind="stable")[: nh - n_heads])
        qkv = [p * e + h * d + i for p in range(3) for h in keep for i in range(d)]
        out_rows = [h * d + i for h in keep for i in range(d)]
        att.c_attn.weight.data = att.c_attn.weight.data[:, qkv].clone()
        att.c_attn.bias.data = att.c_attn.bias.data[qkv].clone()
        att.c_proj.weight.data = att.c_proj.weight.data[out_rows].clone()
        att.split_size, att.c_attn.nf = len(out_rows), len(qkv)
        fc, proj = mlp.c_fc.weight.detach().double(), mlp.c_proj.weight.detach().double()
        score = ((fc * fc).sum(0) + (proj * proj).sum(1)).sqrt().numpy()
        keep = np.sort(np.argsort(-score, kind="stable")[: len(score) - n_channels])
        mlp.c_fc.weight.data = mlp.c_fc.weight.data[:, keep].clone()
        mlp.c_fc.bias.data = mlp.c_fc.bias.data[keep].clone()
        mlp.c_proj.weight.data = mlp.c_proj.weight.data[keep].clone()
        mlp.c_fc.nf = len(keep)
    return pruned.eval()


def test_gpt2_heads_and_mlp_equal_torch(gpt2, tmp_path):
    import graphopt

    module, fused = gpt2
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_gpt2(module, 2, 32), feeds)
    assert np.abs(want - torch_logits(module, feeds)).max() > 1e-3
    pm = PassManager("prune-heads{ratio=0.5},prune-mlp{ratio=0.25}")
    out = pm.run(fused.copy())
    verify(out)
    heads, mlp = (r.stats for r in pm.records)
    # per block: 2 heads of Q, K and V (weight 32 x 16 and bias 16 each), 16 output rows of 32;
    # 32 channels of c_fc (32 weights and a bias each) and of c_proj (32 weights each)
    assert heads == {"layers": 2, "heads": 4, "kv-heads": 4, "parameters": 2 * (3 * (32 * 16 + 16) + 16 * 32)}
    assert mlp == {"layers": 2, "channels": 64, "parameters": 2 * 32 * (32 + 1 + 32)}
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")
    artifact = tmp_path / "pruned"
    graphopt.optimize(fused.copy(), artifact, passes="prune-heads{ratio=0.5},prune-mlp{ratio=0.25}", kv_cache=False)
    assert_close(graphopt.load(artifact).run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")


def test_pruned_llama_prefill_and_decode_with_a_kv_cache_on_onnxruntime(llama, tmp_path):
    """rewrite-kv-cache after pruning caches only the kept KV heads, and greedy decoding on
    ONNX Runtime follows the pruned PyTorch model (at the KV-cache tests' fp32 bound)."""
    import torch

    import graphopt

    module, fused = llama
    reference = prune_torch_mlps(prune_torch_heads(module, 1), 16).model
    g = PassManager("prune-heads{ratio=0.5},prune-mlp{ratio=0.25},rewrite-kv-cache,"
                    "slice-last-token-logits").run(fused.copy())
    assert g.value("past_key_values.0.key").type.shape == ("batch", 1, "past_seq", 8)
    graphopt.optimize(g, tmp_path / "ort", passes="eliminate-dead-code")
    run = graphopt.load(tmp_path / "ort").run
    ids = np.array([[5, 17, 3, 99, 42, 7], [11, 2, 64, 1, 30, 8]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    caches = [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    feeds.update({name: np.zeros((2, 1, 0, 8), np.float32) for name in caches})
    for step in range(4):
        out = run(feeds)
        with torch.no_grad():
            want = reference(input_ids=torch.from_numpy(ids), use_cache=False).logits[:, -1].numpy()
        np.testing.assert_allclose(out["logits"][:, -1], want, rtol=0, atol=1e-4, err_msg=f"step {step}")
        nxt = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        ids = np.concatenate([ids, nxt], axis=1)
        feeds = {"input_ids": nxt, "attention_mask": np.ones_like(ids)}
        feeds.update({name: out[name.replace("past_key_values", "present")] for name in caches})


# --------------------------------------------------------------------------------------
# The shipped checkpoint (graphopt.train Llama: 6 layers, 6 query heads over 2 KV heads)

def test_shipped_default_model_pruned_equals_the_sliced_train_model(tmp_path):
    import torch

    import graphopt
    from graphopt.driver import default_pipeline
    from graphopt.models import load_graph
    from graphopt.train import load_model

    folder = Path(__file__).resolve().parents[1] / "examples" / "default"
    model = copy.deepcopy(load_model(folder)[0]).eval()
    for block in model.blocks:  # one of the two KV groups (3 query heads) and 128 of 512 channels go
        d, group = block.head_dim, block.num_heads // block.num_kv_heads
        q, k, v, o = (m.weight.detach().double() for m in (block.wq, block.wk, block.wv, block.wo))
        q_rows = [[h * d + i for h in range(j * group, (j + 1) * group) for i in range(d)] for j in range(2)]
        kv_rows = [[j * d + i for i in range(d)] for j in range(2)]
        score = [float(((q[q_rows[j]] ** 2).sum() + (k[kv_rows[j]] ** 2).sum() + (v[kv_rows[j]] ** 2).sum()
                        + (o[:, q_rows[j]] ** 2).sum()).sqrt()) for j in range(2)]
        j = int(np.argmax(score))
        for name, rows in (("wq", q_rows[j]), ("wk", kv_rows[j]), ("wv", kv_rows[j])):
            getattr(block, name).weight.data = getattr(block, name).weight.data[rows].clone()
        block.wo.weight.data = block.wo.weight.data[:, q_rows[j]].clone()
        block.num_heads, block.num_kv_heads = group, 1
        g, u, dn = (m.weight.detach().double() for m in (block.w_gate, block.w_up, block.w_down))
        score = ((g * g).sum(1) + (u * u).sum(1) + (dn * dn).sum(0)).sqrt().numpy()
        keep = np.sort(np.argsort(-score, kind="stable")[: len(score) - 128])
        for name in ("w_gate", "w_up"):
            getattr(block, name).weight.data = getattr(block, name).weight.data[keep].clone()
        block.w_down.weight.data = block.w_down.weight.data[:, keep].clone()

    fused = PassManager(default_pipeline()).run(load_graph(str(folder)))
    pm = PassManager("prune-heads{ratio=0.5},prune-mlp{ratio=0.25}")
    pruned = pm.run(fused)
    # per layer: 3 query heads (3 x 32 x 192), a K and a V head (32 x 192 each), 96 rows of the
    # output projection (96 x 192); 128 channels of gate, up and down (3 x 128 x 192)
    assert [r.stats["parameters"] for r in pm.records] == [6 * (5 * 32 * 192 + 96 * 192), 6 * 3 * 128 * 192]
    graphopt.optimize(pruned, tmp_path / "ort", passes="eliminate-dead-code", kv_cache=False)
    ids = np.random.default_rng(0).integers(0, 4096, (2, 16)).astype(np.int64)
    feeds = {"input_ids": ids}
    if any(v.name == "attention_mask" for v in pruned.inputs):
        feeds["attention_mask"] = np.ones_like(ids)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).numpy()
    assert_close(graphopt.load(tmp_path / "ort").run(feeds)["logits"], want, rtol=1e-5, atol=1e-5)


ATTENTION = '''graph @attn(%x: f32[batch, seq, 8], %mask: f32[batch, MASK_HEADS, seq, seq]) -> (OUTPUT_TYPES) {
  weights {
    @wqkv: f32[8, 24]
    @wo: f32[8, 8]
  }
  %qkv = graphopt.Linear(%x, @wqkv) : f32[batch, seq, 24] loc("qkv")
  %q, %k, %v = Split(%qkv) {axis=-1, num_outputs=3} : f32[batch, seq, 8], f32[batch, seq, 8], f32[batch, seq, 8] loc("split")
  %a = graphopt.Attention(%q, %k, %v, %mask) {kv_num_heads=2, num_heads=2} : f32[batch, seq, 8] loc("attn")
  %y = MatMul(%a, @wo) : f32[batch, seq, 8] loc("out")
  return OUTPUTS
}
'''
ATT_WEIGHTS = {"wqkv": RNG.standard_normal((8, 24)).astype(np.float32),
               "wo": RNG.standard_normal((8, 8)).astype(np.float32)}


def attention_graph(mask_heads: int = 1, outputs: str = "%y"):
    types = ", ".join(["f32[batch, seq, 8]"] * len(outputs.split(",")))
    text = (ATTENTION.replace("MASK_HEADS", str(mask_heads)).replace("OUTPUT_TYPES", types)
            .replace("OUTPUTS", outputs))
    return parse_graph(text, weights=ATT_WEIGHTS)


def test_prune_heads_on_a_multi_head_attention_with_an_equal_split():
    pm = PassManager("prune-heads{ratio=0.5}")
    out = pm.run(attention_graph())
    att = next(n for n in out.nodes if n.op == "graphopt.Attention")
    assert (att.attr("num_heads"), att.attr("kv_num_heads")) == (1, 1)
    assert [o.type.shape[-1] for o in next(n for n in out.nodes if n.op_type == "Split").outputs] == [4, 4, 4]
    assert pm.records[0].stats["parameters"] == 3 * 8 * 4 + 4 * 8
    # numpy: attention of the kept head alone (the one of the higher weight norm), projected out
    w, wo = (ATT_WEIGHTS[k].astype(np.float64) for k in ("wqkv", "wo"))
    norms = [np.sqrt((w[:, [p * 8 + h * 4 + i for p in range(3) for i in range(4)]] ** 2).sum()
                     + (wo[h * 4:(h + 1) * 4] ** 2).sum()) for h in range(2)]
    h = int(np.argmax(norms))
    assert pm.records[0].details[0]["keep"] == [h]
    x = RNG.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.triu(np.full((5, 5), -1e9, np.float32), 1)[None, None].repeat(2, 0)
    q, k, v = (x.astype(np.float64) @ w[:, p * 8 + h * 4: p * 8 + h * 4 + 4] for p in range(3))
    scores = q @ k.transpose(0, 2, 1) / 2.0 + mask[:, 0]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ v @ wo[h * 4:(h + 1) * 4]
    assert_close(interpret(out, {"x": x, "mask": mask})["y"], want.astype(np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_heads, outputs, reason", [
    (2, "%y", "the mask may vary per head"),
    (1, "%y, %a", "the attention output has other readers than the output projection"),
])
def test_prune_heads_leaves_what_it_cannot_prune_and_says_why(mask_heads, outputs, reason):
    g = attention_graph(mask_heads, outputs)
    before = print_graph(g, header=False)
    pm = PassManager("prune-heads{ratio=0.5}")
    out = pm.run(g)
    assert print_graph(out, header=False) == before
    assert pm.records[0].details == [{"node": "attn", "op": "graphopt.Attention", "reason": reason}]


# --------------------------------------------------------------------------------------
# prune-magnitude, prune-nm: masks


def mask_torch_linears(module, mask_fn):
    """The module with every block Linear's weight ([out, in]) masked by `mask_fn(weight) ->
    bool keep`; q/k/v are masked as one matrix, as the merged projection the pass sees."""
    import torch

    masked = copy.deepcopy(module)
    with torch.no_grad():
        for layer in masked.model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv = [att.q_proj, att.k_proj, att.v_proj]
            keep = mask_fn(torch.cat([p.weight for p in qkv]))
            for p, k in zip(qkv, torch.split(keep, [p.out_features for p in qkv])):
                p.weight.mul_(k)
            for p in (att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                p.weight.mul_(mask_fn(p.weight))
    return masked.eval()


def torch_magnitude_keep(sparsity):
    import torch

    def keep(w):
        n_zero = int(sparsity * w.numel())
        out = torch.ones(w.numel(), dtype=torch.bool)
        out[torch.topk(w.abs().flatten(), n_zero, largest=False).indices] = False
        return out.reshape(w.shape)
    return keep


def torch_nm_keep(n, m):
    import torch

    def keep(w):  # [out, in]: groups of m along in
        g = w.abs().reshape(w.shape[0], -1, m)
        out = torch.zeros_like(g, dtype=torch.bool)
        out.scatter_(-1, torch.topk(g, n, dim=-1).indices, True)
        return out.reshape(w.shape)
    return keep


def block_weights(graph):
    from graphopt.passes.pruning.sparsity import weight_sites

    return [(n, i, axis, n.inputs[i].const_value) for n in graph.nodes for i, axis in weight_sites(n)]


@pytest.mark.parametrize("pipeline", ["prune-magnitude{sparsity=0}", "prune-nm{n=4,m=4}"])
def test_mask_passes_at_zero_are_exact_no_ops(llama, pipeline):
    _, fused = llama
    before = print_graph(fused, header=False)
    pm = PassManager(pipeline)
    out = pm.run(fused.copy())
    assert print_graph(out, header=False) == before
    for name, v in out.initializers.items():
        assert v.const_value is fused.initializers[name].const_value, name
    assert not pm.records[0].changed


def test_prune_magnitude_equals_torch_with_the_same_mask_and_is_exact(llama):
    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(mask_torch_linears(module, torch_magnitude_keep(0.5)), feeds)
    assert np.abs(want - torch_logits(module, feeds)).max() > 1e-3
    pm = PassManager("prune-magnitude{sparsity=0.5}")
    out = pm.run(fused.copy())
    verify(out)
    weights = block_weights(out)
    assert len(weights) == 2 * 5  # per layer: Q/K/V, output, gate, up, down
    for node, i, _, w in weights:
        assert (w == 0).sum() == w.size // 2, node.name  # exactly floor(0.5 * size), no more
        assert w.shape == fused.initializers[node.inputs[i].name.removesuffix("_pruned")].const_value.shape
    lm_head = [n for n in out.nodes if n.outputs[0].is_graph_output][0]
    assert (lm_head.inputs[1].const_value != 0).all()  # the LM head stays dense
    stats = pm.records[0].stats
    assert stats["zeroed"] * 2 == stats["entries"]
    assert {"speed": "mask only, no speed-up: the weights keep their dense shape and no graphopt backend "
            "(ONNX Runtime CPU, TVM) has a sparse kernel that skips the zeros"} in pm.records[0].details
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")


def test_prune_nm_2_4_equals_torch_and_every_group_keeps_two(llama, tmp_path):
    import graphopt

    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(mask_torch_linears(module, torch_nm_keep(2, 4)), feeds)
    pm = PassManager("prune-nm{n=2,m=4}")
    out = pm.run(fused.copy())
    verify(out)
    for node, _, axis, w in block_weights(out):
        groups = np.moveaxis(w, axis, -1).reshape(-1, 4)  # runs of 4 along the input dimension
        assert ((groups != 0).sum(-1) == 2).all(), node.name
    assert_close(interpret(out, feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="interpreter")
    artifact = tmp_path / "nm"
    graphopt.optimize(fused.copy(), artifact, passes="prune-nm{n=2,m=4}", kv_cache=False)
    assert_close(graphopt.load(artifact).run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")


def test_prune_nm_leaves_a_weight_whose_input_does_not_divide():
    g = parse_graph("""graph @g(%x: f32[2, 6]) -> (f32[2, 3]) {
  weights {
    @w: f32[6, 4]
    @w2: f32[4, 3]
  }
  %h = MatMul(%x, @w) : f32[2, 4]
  %y = MatMul(%h, @w2) : f32[2, 3]
  return %y
}""", weights={"w": np.ones((6, 4), np.float32), "w2": np.ones((4, 3), np.float32)})
    pm = PassManager("prune-nm{n=2,m=4}")
    pm.run(g)
    assert {"node": g.nodes[0].name, "op": "MatMul", "reason": "the input dimension 6 is not a multiple of m=4"} \
        in pm.records[0].details


@pytest.mark.parametrize("pipeline", ["prune-magnitude{sparsity=1.0}", "prune-nm{n=3,m=2}", "prune-nm{n=0,m=4}"])
def test_bad_mask_options_are_refused(pipeline):
    with pytest.raises(UserError, match=pipeline.split("{")[0]):
        PassManager(pipeline)


# --------------------------------------------------------------------------------------
# optimize --prune: the shortcut, the report and the manifest


def test_prune_pipeline_spells_the_passes():
    from graphopt.pruning import prune_pipeline

    assert prune_pipeline("heads=0.25,mlp=0.5") == "prune-heads{ratio=0.25},prune-mlp{ratio=0.5}"
    assert prune_pipeline("mlp=0.5, importance=wanda, scope=global, min-keep=8") == \
        "prune-mlp{ratio=0.5,importance=wanda,scope=global,min-keep=8}"


@pytest.mark.parametrize("spec, message", [
    ("heads", "expected KEY=VALUE items"),
    ("layers=0.5", "unknown key 'layers'"),
    ("importance=wanda", "say what to prune"),
    ("mlp=1.5", "--prune mlp=1.5: prune-mlp: ratio must be in [0, 1)"),
    ("mlp=0.5,importance=taylor", "importance=taylor needs gradients"),
    ("heads=0.25,heads=0.5", "heads given twice; give it once"),
    ("mlp=0.5,importance=wanda,importance=magnitude", "importance given twice"),
])
def test_bad_prune_specs_are_one_line_exit_2_and_nothing_written(spec, message, tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    r = CliRunner().invoke(cli, ["optimize", str(example), "-o", str(tmp_path / "out"), "--prune", spec])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].count("--prune") <= 1, r.output
    assert not (tmp_path / "out").exists()


def test_calibration_without_a_pass_that_reads_it_is_refused(tmp_path):
    import graphopt

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"
    with pytest.raises(UserError, match="--calibration is used by .*pruning with importance=wanda only"):
        graphopt.optimize(str(example), tmp_path / "out", prune="mlp=0.5", calibration=str(example))


def test_optimize_prune_equals_torch_and_reports_what_went(llama, tmp_path):
    import graphopt

    module, fused = llama  # the default recipe runs again on the fused graph, changing nothing
    feeds = token_feeds(2, 8)
    pruned = prune_torch_mlps(prune_torch_heads(module, 1), 16)
    want = torch_logits(pruned, feeds)

    out = tmp_path / "full"
    res = graphopt.optimize(fused.copy(), out, prune="heads=0.5,mlp=0.25", kv_cache=False)
    assert_close(graphopt.load(out).run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")
    report = json.loads((out / "report.json").read_text())
    p = report["pruning"]
    assert p["spec"] == "heads=0.5,mlp=0.25"
    assert [(e["pass"], e["layers"]) for e in p["passes"]] == [("prune-heads", 2), ("prune-mlp", 2)]
    assert p["parameters_removed"] == 2 * (1536 + 16 * 3 * 32)
    f = p["block_flops"]
    assert f["seq_len"] == 128 and f["removed_fraction"] == round(1 - f["after"] / f["before"], 4) > 0.3
    assert "block FLOPs" in graphopt.driver.format_report(res.report)

    # the manifest names the units removed, the same the PyTorch reference removed
    manifest = json.loads((out / "manifest.json").read_text())
    heads, mlp = manifest["pruning"]
    kept_mlp = [layer.mlp.down_proj.in_features for layer in pruned.model.model.layers]
    assert [len(layer["removed"]) for layer in mlp["layers"]] == [64 - k for k in kept_mlp] == [16, 16]
    scores = torch_mlp_magnitudes(module)
    assert [layer["removed"] for layer in mlp["layers"]] == \
        [sorted(set(range(64)) - set(keep_lowest_removed(s, 16).tolist())) for s in scores]
    assert [len(layer["removed"]) for layer in heads["layers"]] == [1, 1]

    # generation-ready: the pruning runs before the KV-cache rewrite, which caches the kept heads
    res = graphopt.optimize(fused.copy(), tmp_path / "gen", prune="heads=0.5,mlp=0.25")
    pipeline = res.report["pipeline"]
    assert pipeline.index("merge-projections") < pipeline.index("prune-heads") < pipeline.index("rewrite-kv-cache")
    assert res.report["generation"]["ready"]


def test_optimize_prune_wanda_reads_the_calibration_file(llama, tmp_path):
    import graphopt

    module, fused = llama
    data = token_feeds(8, 8, seed=5, pad=False)
    np.savez(tmp_path / "calib.npz", **data)
    batches = [{k: v[i:i + 4] for k, v in data.items()} for i in (0, 4)]  # graphopt.calibration's batches of 4
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(module, 0, torch_wanda_mlp_keeps(module, batches, 24)), feeds)
    res = graphopt.optimize(fused.copy(), tmp_path / "out", prune="mlp=0.375,importance=wanda",
                            calibration=str(tmp_path / "calib.npz"), kv_cache=False)
    assert_close(graphopt.load(tmp_path / "out").run(feeds)["logits"], want, rtol=1e-5, atol=1e-5, what="onnxruntime")
    assert res.report["pruning"]["calibration"] == {"file": str(tmp_path / "calib.npz"), "batches": 2, "sequences": 8}


def test_a_ratio_that_rounds_down_to_nothing_says_so(llama):
    import graphopt
    from graphopt.driver import format_report

    res = graphopt.optimize(llama[1].copy(), prune="heads=0.25", kv_cache=False)  # 2 KV groups a layer
    assert "pruned    no heads (ratio 0.25, rounded down, with min-keep 1, removes none; counted per layer: " \
        "scope=global, counting the ratio over the whole model, would remove 1)" in format_report(res.report)
    res = graphopt.optimize(llama[1].copy(), prune="heads=0", kv_cache=False)  # nothing asked: no hint
    assert "removes none)" in format_report(res.report)
    res = graphopt.optimize(llama[1].copy(), prune="heads=0.25,scope=global", kv_cache=False)  # 1 of 4 overall
    assert res.report["pruning"]["passes"][0]["kv_heads"] == 1


@pytest.mark.parametrize("min_keep", [2, 5])
def test_min_keep_that_keeps_every_group_is_named_not_scope(llama, min_keep):
    """With min-keep at or above a layer's KV groups nothing can go however the ratio is counted:
    the summary names min-keep (it suggested scope=global, which removes none either)."""
    import graphopt
    from graphopt.driver import format_report

    for scope in ("layer", "global"):
        res = graphopt.optimize(llama[1].copy(), prune=f"heads=0.5,min-keep={min_keep},scope={scope}", kv_cache=False)
        text = format_report(res.report)
        assert f"removes none; a layer has 2 KV groups and min-keep {min_keep} keeps them all)" in text
        assert "scope=global" not in text.split("pruned    ")[1].splitlines()[0]


def test_a_ratio_that_rounds_to_none_even_over_the_model_has_no_scope_hint(llama):
    import graphopt
    from graphopt.driver import format_report

    res = graphopt.optimize(llama[1].copy(), prune="mlp=0.001", kv_cache=False)  # 0.001 * 128 channels < 1
    assert "pruned    no MLP channels (ratio 0.001, rounded down, with min-keep 1, removes none)" in format_report(res.report)


def test_heads_of_an_alibi_model_are_skipped_with_the_reason(tmp_path):
    """BLOOM's ALiBi mask differs per head: pruning a head would need its slice of the bias, so
    prune-heads skips every attention, and the summary says why rather than "removes none"."""
    import torch
    import transformers as tf

    import graphopt
    from graphopt.driver import format_report

    torch.manual_seed(0)
    tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=128)).eval() \
        .save_pretrained(tmp_path / "bloom")
    res = graphopt.optimize(tmp_path / "bloom", prune="heads=0.5", kv_cache=False)
    assert res.report["pruning"]["parameters_removed"] == 0
    assert "pruned    no heads: every site was skipped (the mask may vary per head)" in format_report(res.report)


def test_prune_then_quantize_in_one_optimize(llama, tmp_path):
    import graphopt

    module, fused = llama
    feeds = token_feeds(2, 8)
    want = torch_logits(prune_torch_mlps(prune_torch_heads(module, 1), 16), feeds)
    res = graphopt.optimize(fused.copy(), tmp_path / "out", prune="heads=0.5,mlp=0.25", quantize="int8",
                            kv_cache=False)
    pipeline = res.report["pipeline"]
    assert pipeline.index("prune-mlp") < pipeline.index("quantize-weights")  # the pruned weights are quantized
    assert res.report["pruning"]["parameters_removed"] == 2 * (1536 + 16 * 3 * 32)
    assert sum(res.report["quantization"]["layers"].values()) > 0
    got = graphopt.load(tmp_path / "out").run(feeds)["logits"]
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.999  # int8's budget, against the pruned PyTorch model
    assert np.abs(got - want).max() > 0  # and it is quantized, not float


# ------------------------------------------ the pruning record of a training checkpoint

def _checkpoint_config(folder: Path, pruned_ppl: dict | None, finetune_ppl: dict | None) -> Path:
    config = {"format": "graphopt.train.checkpoint/1", "model": {"arch": "llama"}}
    if pruned_ppl is not None:
        config["pruned"] = {"source": "examples/default", "importance": "wanda", "heads_ratio": 0.5, "mlp_ratio": 0.25,
                            "min_keep": 1, "scope": "layer", "parameters": [400, 300], "kept": [[0]],
                            "perplexity": pruned_ppl}
    if finetune_ppl is not None:
        config["finetune"] = {"lora_rank": 0, "perplexity": finetune_ppl}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


VAL = {"text": "a/val.txt", "sha256": "aa", "max_tokens": 0, "tokens": 1000}


@pytest.mark.parametrize("pruned_ppl, finetune_ppl, want, line", [
    (dict(VAL, unpruned=25.0, pruned=76.5), dict(VAL, text="b/val.txt", before=76.5, after=27.25),
     {"text": "a/val.txt", "tokens": 1000, "unpruned": 25.0, "pruned": 76.5, "recovered": 27.25},
     "perplexity: unpruned 25.00 -> pruned 76.50 -> recovered 27.25 (a/val.txt, 1,000 tokens)"),
    (dict(VAL, unpruned=25.0, pruned=76.5), dict(VAL, sha256="bb", text="n.txt", tokens=50, before=9.0, after=4.0),
     {"text": "a/val.txt", "tokens": 1000, "unpruned": 25.0, "pruned": 76.5,
      "recovery": {"text": "n.txt", "tokens": 50, "before": 9.0, "after": 4.0}},
     "recovery: perplexity 9.00 -> 4.00 (n.txt, 50 tokens)"),
    (dict(VAL, unpruned=25.0, pruned=76.5), None,
     {"text": "a/val.txt", "tokens": 1000, "unpruned": 25.0, "pruned": 76.5},
     "perplexity: unpruned 25.00 -> pruned 76.50 (a/val.txt, 1,000 tokens)"),
    ({"skipped": "p has no val.txt"}, dict(VAL, before=76.5, after=27.25),
     {"text": "a/val.txt", "tokens": 1000, "pruned": 76.5, "recovered": 27.25},
     "perplexity: pruned 76.50 -> recovered 27.25 (a/val.txt, 1,000 tokens)"),
    ({"skipped": "p has no val.txt"}, None, {"skipped": "p has no val.txt"}, "perplexity: skipped (p has no val.txt)"),
])
def test_a_pruned_checkpoints_record_reaches_the_report(tmp_path, pruned_ppl, finetune_ppl, want, line):
    """What `graphopt prune` / `finetune` recorded becomes report["pruning"]: recovered joins
    unpruned -> pruned only when both were measured on the same text (SHA-256 and token cap),
    a run folder reads its latest checkpoint, and the summary prints it."""
    from graphopt.pruning import checkpoint_pruning, format_pruning, pruning_summary

    run = tmp_path / "run"
    _checkpoint_config(run / "checkpoints" / "step_0000010", pruned_ppl, finetune_ppl)
    (run / "checkpoints" / "latest").write_text("step_0000010\n")
    got = checkpoint_pruning(run)
    assert got["perplexity"] == want
    assert got["checkpoint"] == {"source": "examples/default", "importance": "wanda", "heads_ratio": 0.5,
                                 "mlp_ratio": 0.25, "min_keep": 1, "scope": "layer", "parameters": [400, 300]}
    report = pruning_summary([], 300, None, model=run)
    lines = format_pruning(report).splitlines()
    assert lines[0] == "pruned    in the checkpoint (graphopt prune: heads 0.5, mlp 0.25, wanda): 400 -> 300 parameters (-25.0%)"
    assert line in lines[-1]


def test_a_checkpoint_without_a_pruning_record_adds_nothing(tmp_path):
    from graphopt.pruning import checkpoint_pruning, pruning_summary

    folder = _checkpoint_config(tmp_path / "ck", None, None)
    assert checkpoint_pruning(folder) == {} and pruning_summary([], 10, None, model=folder) == {}
    assert checkpoint_pruning(tmp_path / "model.onnx") == {} and checkpoint_pruning(None) == {}


def test_a_model_without_a_prunable_block_says_so(tmp_path):
    """GLM computes gate and up in one projection split in two, a form prune-mlp does not take: the
    summary says no MLP block was found (it said "removes none" and suggested scope=global)."""
    import torch
    import transformers as tf

    import graphopt
    from graphopt.driver import format_report

    torch.manual_seed(0)
    cfg = tf.GlmConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                       intermediate_size=128, vocab_size=128, pad_token_id=0)
    tf.GlmForCausalLM(cfg).eval().save_pretrained(tmp_path / "glm")
    res = graphopt.optimize(tmp_path / "glm", prune="mlp=0.5", kv_cache=False)
    assert "no MLP channels: no MLP block of a form the pass prunes was found" in format_report(res.report)


def test_a_pruned_hugging_face_model_gets_no_config_json_of_the_unpruned_sizes(tmp_path):
    """The artifact copied the checkpoint's config.json, whose head counts and MLP width the
    pruned model.onnx no longer has (Optimum sizes the empty cache by them)."""
    import graphopt
    from graphopt.testing import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path / "hf")
    res = graphopt.optimize(folder, tmp_path / "out", prune="heads=0.5,mlp=0.5")
    assert res.report["generation"]["ready"] and not (tmp_path / "out" / "config.json").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["generation"]["optimum"].startswith("no config.json: the pruned model's sizes differ")
    assert "config.json" not in manifest["files"]
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == 1  # the pruned count, where genai reads it


def test_a_genai_config_left_out_is_said(tmp_path, monkeypatch):
    """Left out (per-layer head counts genai cannot describe, after scope=global pruning), the
    reason was only in the manifest; --help says an ORT decoder gets one."""
    import graphopt
    import graphopt.driver as driver
    from graphopt.testing import tiny_llama_folder

    monkeypatch.setattr(driver, "genai_unsupported", lambda graph, manifest: "the layers' KV head counts differ")
    said: list[str] = []
    graphopt.optimize(tiny_llama_folder(tmp_path / "hf"), tmp_path / "out", progress=said.append)
    assert "note: no genai_config.json: the layers' KV head counts differ" in said
    assert not (tmp_path / "out" / "genai_config.json").exists()
