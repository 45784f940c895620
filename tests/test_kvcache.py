"""rewrite-kv-cache, slice-last-token-logits, the Generator and `graphopt generate`.

The oracle is PyTorch recomputing the whole sequence at every step, row by row without
padding: a left-padded batch with a cache must give each row the logits its own unpadded
sequence gives.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

import graphopt
from graphopt.errors import UserError
from graphopt.pass_manager import PassManager

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "examples" / "default"
ATOL = 1e-4  # fp32, the bound against PyTorch
PROMPTS = [[5, 17, 3, 99, 42, 7], [11, 2], [64, 1, 30, 8]]  # batch 3, left-padded to 6


# --------------------------------------------------------------------------------------
# Fixtures: fused graphs of small transformers models, and the shipped checkpoint


_fused_cache: dict = {}


@pytest.fixture(scope="module")
def fused(exported, export_dir):
    """fused(arch[, head_size]) -> (torch model, the graph after the default fusion pipeline),
    from the session's dynamo exports (shared with the other test files); a head size other
    than the tiny configs' 8 is exported here (llama, qwen2: ORT's rotary inside
    GroupQueryAttention needs a multiple of 16)."""
    from graphopt.driver import optimize
    from graphopt.models import load_graph
    from graphopt.testing import export_onnx, tiny_hf_model

    def get(arch: str, head_size: int = 8):
        key = arch if head_size == 8 else (arch, head_size)
        if key not in _fused_cache:
            if head_size == 8:
                module, path = exported(arch, "dynamo")
            else:
                module = tiny_hf_model(arch, head_size=head_size)
                path = export_onnx(module, export_dir / f"{arch}_head{head_size}.onnx", dynamo=True)
            graph = optimize(load_graph(path), None, kv_cache=False).graph
            # what the frontends record for a checkpoint or Hugging Face folder (the tiny
            # configs have 64 positions); an ONNX file does not say
            graph.metadata.metadata_props["graphopt.max_positions"] = "64"
            graph.rename_value(graph.outputs[0], "logits")  # as the frontends name it
            _fused_cache[key] = (module.model, graph)
        return _fused_cache[key]

    return get


def hf_reference(model):
    import torch

    def last_logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
    return last_logits


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_default") / "ort"
    result = graphopt.optimize(str(DEFAULT_MODEL), out)
    return out, result


@pytest.fixture(scope="module")
def default_model():
    from graphopt.train import load_model

    return load_model(DEFAULT_MODEL)[0]


def train_reference(model):
    import torch

    def last_logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -1].numpy()
    return last_logits


def rewrite(graph, pipeline="rewrite-kv-cache"):
    return PassManager(pipeline).run(graph)


def lowered_ort(graph, tmp_path: Path):
    """The graph lowered for ORT and saved as an artifact; its run(feeds)."""
    return graphopt.load(_ort_artifact(graph, tmp_path)).run


def interpreter(graph):
    from graphopt.interpreter import run

    return lambda feeds: run(graph, feeds)


def host(x) -> np.ndarray:
    """A numpy array of an output (a bound runner's presents are the backend's own tensors)."""
    return x if isinstance(x, np.ndarray) else x.numpy()


VOCAB_TEST = 100  # token ids below every test model's vocabulary
BLOCK_SIZE = 4  # paged tests: small blocks, so that a few steps cross block boundaries


def check_decode(run, reference, prompts, steps: int, num_layers: int, kv_heads: int, head: int,
                 layout: str = "BNSH", max_positions: int = 0, block_size: int = BLOCK_SIZE):
    """Prefill the left-padded prompts, then `steps` greedy decode steps; at every step each
    row's last logits must match `reference(row ids)` and every present must grow by one
    (static: fill its buffer of `max_positions` by one, the rest still the zeros fed first;
    paged: fill the slot of the table's block, the rows' blocks interleaved and shuffled in
    a pool with blocks no row uses, which must stay zero)."""
    batch = len(prompts)
    width = -(-max_positions // block_size) if layout == "paged" else 0
    order = np.random.default_rng(0).permutation(batch * width + 3)  # 3 blocks no row is given
    table = order[:batch * width].reshape(width, batch).T.astype(np.int32)
    unused = order[batch * width:]

    def cache(batch, seq):
        if layout == "paged":
            return (batch * width + 3, block_size, kv_heads, head)
        if layout == "static":
            return (batch, kv_heads, max_positions, head)
        return (batch, seq, kv_heads, head) if layout == "BSNH" else (batch, kv_heads, seq, head)

    batch, longest = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((batch, longest), np.int64)
    mask = np.zeros((batch, longest), np.int64)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):], mask[r, longest - len(p):] = p, 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if layout == "paged":
        feeds["block_table"] = table
    for i in range(num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(cache(batch, 0), np.float32)
    rows = [list(p) for p in prompts]
    worst = 0.0
    for step in range(steps + 1):
        out = run(feeds)
        total = mask.shape[1]
        for i in range(num_layers):
            for kind in ("key", "value"):
                present = host(out[f"present.{i}.{kind}"])
                assert present.shape == cache(batch, total), (step, i, kind)
                # a left-padded row's positions too: a NaN there would spread to the real keys' rows
                assert np.isfinite(present).all(), (step, i, kind)
                if layout == "static":
                    assert (present[:, :, total - 1] != 0).any() and not present[:, :, total:].any(), (step, i, kind)
                if layout == "paged":
                    last = present[table[:, (total - 1) // block_size], (total - 1) % block_size]
                    after = [present[table[r, total // block_size], total % block_size] for r in range(batch)
                             if total < width * block_size]
                    assert (last != 0).any() and not any(a.any() for a in after), (step, i, kind)
                    assert not present[unused].any(), (step, i, kind)
        logits = out["logits"][:, -1]
        for r in range(batch):
            want = reference(rows[r])
            worst = max(worst, float(np.abs(logits[r] - want).max()))
            np.testing.assert_allclose(logits[r], want, rtol=0, atol=ATOL, err_msg=f"step {step}, row {r}")
        nxt = logits.argmax(-1).astype(np.int64)
        for r in range(batch):
            rows[r].append(int(nxt[r]))
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        feeds = {"input_ids": nxt[:, None], "attention_mask": mask}
        if layout == "paged":
            feeds["block_table"] = table
        for i in range(num_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = out[f"present.{i}.{kind}"]
    return worst


# --------------------------------------------------------------------------------------
# rewrite-kv-cache: structure


def test_rewrite_gives_the_optimum_signature_and_caches_only_kv_heads(fused):
    _, graph = fused("llama")  # 4 query heads, 2 key/value heads, head size 8
    g = rewrite(graph)
    names = [v.name for v in g.inputs if not v.is_initializer]
    assert names == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                     "past_key_values.1.key", "past_key_values.1.value"]
    assert [v.name for v in g.outputs] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                           "present.1.value"]
    types = {v.name: v.type for v in list(g.inputs) + list(g.outputs)}
    assert types["attention_mask"].shape == ("batch", "past_seq + seq")
    assert types["past_key_values.0.key"].shape == ("batch", 2, "past_seq", 8)
    assert types["present.1.value"].shape == ("batch", 2, "past_seq + seq", 8)
    attn = [n for n in g.nodes if n.op == "graphopt.Attention"]
    assert len(attn) == 2 and all(len(n.inputs) == 6 and n.inputs[3] is attn[0].inputs[3] for n in attn)
    # positions and the mask are built once for all layers: one CumSum, one Range, one Where
    assert sum(n.op_type == "CumSum" for n in g.nodes) == 1
    assert sum(n.op_type == "Range" for n in g.nodes) == 1
    assert sum(n.op_type == "Where" for n in g.nodes) == 1
    assert g.metadata.metadata_props["graphopt.kv_layout"] == "BNSH"
    # the rotary embeddings take the cos/sin tables and the position ids themselves
    ropes = [n for n in g.nodes if n.op == "graphopt.RotaryEmbedding"]
    assert len(ropes) == 4 and all(n.inputs[3] is ropes[0].inputs[3] for n in ropes)
    assert ropes[0].inputs[1].type.shape == (64, 4)  # max-positions rows, rot/2


def test_not_fused_is_refused(fused):
    from graphopt.passes.kvcache.rewrite import KVCacheError

    _, graph = fused("llama")
    g = graph.copy()
    for n in [n for n in g.nodes if n.op == "graphopt.Attention"]:
        from graphopt.lowering import decompose_node

        decompose_node(n)
    with pytest.raises(KVCacheError, match="attention is not fused: Softmax node"):
        rewrite(g)


def test_non_causal_attention_is_refused(fused):
    from graphopt.passes.kvcache.rewrite import KVCacheError

    _, graph = fused("gpt2")
    g = graph.copy()
    zero = g.add_initializer("no_mask", np.zeros((1, 1, 1, 1), np.float32))
    for n in g.nodes:
        if n.op == "graphopt.Attention":
            n.set_input(3, zero)
    with pytest.raises(KVCacheError, match="is neither causal nor causal within a sliding window"):
        rewrite(g)


def _with_key_bias(graph, kind: str, slopes: np.ndarray):
    """GPT-2's fused graph with a per-head bias added to every attention's mask: ALiBi's
    `slope[h] * j` (kind "linear"), `slope[h] * j * j / 8` ("square") or ALiBi whose slopes grow with
    the padding ("padded": times 1 + the row's padded count)."""
    from graphopt.builder import Builder

    g = graph.copy()
    node = next(n for n in g.nodes if n.op == "graphopt.Attention")
    mask = node.inputs[3]
    b = Builder(g, before=node)
    i64 = lambda *xs: b.const(np.array(xs, np.int64))  # noqa: E731
    cols = b.Cast(b.Range(b.const(np.array(0, np.int64)), b.Squeeze(b.Shape(mask, start=3), i64(0)),
                          b.const(np.array(1, np.int64))), to=1)
    if kind == "square":
        cols = b.Mul(cols, b.Div(cols, b.const(np.array(8, np.float32))))
    bias = b.Mul(b.const(slopes.reshape(-1, 1, 1).astype(np.float32)), cols)  # heads, 1, total
    if kind == "padded":
        m = next(v for v in g.inputs if v.name == "attention_mask")
        padded = b.ReduceSum(b.Sub(b.const(np.array(1, np.int64)), m), i64(-1), keepdims=0)
        bias = b.Mul(bias, b.Reshape(b.Cast(b.Add(padded, b.const(np.array(1, np.int64))), to=1), i64(-1, 1, 1, 1)))
    biased = b.Add(mask, bias)
    for n in g.nodes:
        if n.op == "graphopt.Attention":
            n.set_input(3, biased)
    return g


def test_alibi_slopes_are_found_by_probing_the_mask(fused):
    """A mask plus slope[h] * j (ALiBi) is rewritten with the slopes it was built with; a bias not
    linear in the key's position, or one that changes with left padding, is refused naming it."""
    from graphopt.passes.kvcache.rewrite import KVCacheError

    _, graph = fused("gpt2")
    heads = next(n for n in graph.nodes if n.op == "graphopt.Attention").attr("num_heads")
    slopes = 2.0 ** -np.arange(1, heads + 1)
    out = rewrite(_with_key_bias(graph, "linear", slopes))
    found = [v.const_value for name, v in out.initializers.items() if name.startswith("alibi_slopes")]
    assert len(found) == 1
    np.testing.assert_allclose(np.asarray(found[0]).reshape(-1), slopes, rtol=1e-6)
    for kind, why in (("square", "it is not linear in the key's position"), ("padded", "it changes with left padding")):
        with pytest.raises(KVCacheError, match=f"is not ALiBi's slope per head times the key's position \\({why}\\)"):
            rewrite(_with_key_bias(graph, kind, slopes))


@pytest.mark.parametrize("layout", ["BSNH"])
def test_unimplemented_layouts_are_refused_in_one_line(fused, tmp_path, layout):
    from click.testing import CliRunner

    from graphopt.cli import cli
    from graphopt.models import save_graph

    _, graph = fused("llama")
    save_graph(graph, tmp_path / "llama.gir")
    r = CliRunner().invoke(cli, ["optimize", str(tmp_path / "llama.gir"), "-o", str(tmp_path / "out"), "-q",
                                 "--passes", f"rewrite-kv-cache{{layout={layout},max-positions=64}}"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        f"error: rewrite-kv-cache: layout {layout!r} is not implemented for the onnxruntime backend "
        "(implemented: BNSH, static, paged)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, line", [
    (["--kv-layout", "BSNH"], "error: rewrite-kv-cache: layout 'BSNH' is not implemented for the onnxruntime "
                              "backend (implemented: BNSH, static, paged)"),
    (["--kv-layout", "static", "--no-kv-cache"], "error: --kv-layout chooses the cache of the default pipeline's "
     "rewrite-kv-cache; with --no-kv-cache there is none, with --passes or --recipe give rewrite-kv-cache{layout=...}"),
])
def test_kv_layout_option_refusals_are_one_line_before_any_work(tmp_path, args, line):
    from click.testing import CliRunner

    from graphopt.cli import cli

    r = CliRunner().invoke(cli, ["optimize", str(DEFAULT_MODEL), "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [line]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# rewrite-kv-cache: numbers against PyTorch


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_prefill_and_decode_on_ort_match_pytorch(arch, fused, tmp_path):
    model, graph = fused(arch)
    g = rewrite(graph, "rewrite-kv-cache,slice-last-token-logits")
    run = lowered_ort(g, tmp_path)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head = cfg.hidden_size // heads
    layers = cfg.num_hidden_layers
    ref = hf_reference(model)
    check_decode(run, ref, PROMPTS[:1], 8, layers, kv, head)  # batch 1
    check_decode(run, ref, PROMPTS, 8, layers, kv, head)  # batch 3, left padding
    manifest = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    # head 8: GroupQueryAttention could not rotate Q and K itself, so the growing cache's sites
    # run ONNX's opset-23 Attention (the faster kernel at a one-token step)
    assert manifest["lowering"]["kernels"]["Attention"] == layers
    assert "com.microsoft.GroupQueryAttention" not in manifest["lowering"]["kernels"]


@pytest.mark.slow
@pytest.mark.parametrize("arch, rank", [("persimmon", 4), ("phi", 3), ("gpt_neox", 3)])
def test_attention_left_4d_gets_a_cache_on_ort_and_tvm(arch, rank, fused, tmp_path):
    """Where attention-to-3d cannot make the attention 3-D (Persimmon: a LayerNorm on each head of
    Q and K), rewrite-kv-cache caches the 4-D attention's key/value heads as they are. Phi-2 (a
    partial rotary) and GPT-NeoX (Q, K and V interleaved per head in one projection, a partial
    rotary) were such cases and are 3-D since fuse-rotary makes a partial rotary one op and
    split-interleaved-heads reorders the projection. Either way every layout's step matches
    PyTorch at batch 1 and at batch 3 with left padding."""
    if arch == "persimmon":
        from graphopt.driver import optimize
        from graphopt.models import load_graph

        folder, model = _hf_folder(tmp_path, "PersimmonForCausalLM", num_key_value_heads=None,
                                   max_position_embeddings=64, qk_layernorm=True)
        graph = optimize(load_graph(folder), None, kv_cache=False).graph
    else:
        model, graph = fused(arch)
    attentions = [n for n in graph.nodes if n.op_type == "Attention"]
    assert attentions and all(n.inputs[0].type.rank == rank for n in attentions)  # the case under test
    _decodes_in_every_layout(model, graph, attentions, tmp_path)


@pytest.mark.slow
def test_a_norm_on_each_head_moves_to_the_3d_view(fused, tmp_path):
    """Qwen3's RMSNorm on each head of Q and K (over the head size, before the transpose to
    [batch, heads, seq, head]) runs on the [batch, seq, heads, head] view of the projection, so
    the attention becomes 3-D (ORT: GroupQueryAttention, which then rotates Q and K itself) and
    every layout's step still matches PyTorch."""
    model, graph = fused("qwen3")
    attentions = [n for n in graph.nodes if n.op_type == "Attention"]
    assert attentions and all(n.inputs[0].type.rank == 3 for n in attentions)
    norms = [n for n in graph.nodes if n.op_type == "RMSNorm" and n.inputs[0].type.rank == 4]
    assert len(norms) == 2 * len(attentions) and all(n.inputs[0].type.shape[1] == "seq" for n in norms)  # BSHD
    _decodes_in_every_layout(model, graph, attentions, tmp_path)


def _decodes_in_every_layout(model, graph, attentions, tmp_path):
    cfg = model.config
    k = attentions[0].inputs[1].type.shape
    kv = k[1] if len(k) == 4 else attentions[0].attr("kv_num_heads")
    head = k[3] if len(k) == 4 else k[2] // kv
    ref = hf_reference(model)
    g = rewrite(graph, "rewrite-kv-cache,slice-last-token-logits")
    assert g.value("past_key_values.0.key").type.shape == ("batch", kv, "past_seq", head)
    run = lowered_ort(g, tmp_path)
    check_decode(run, ref, PROMPTS[:1], 8, cfg.num_hidden_layers, kv, head)
    check_decode(run, ref, PROMPTS, 8, cfg.num_hidden_layers, kv, head)
    static = rewrite(graph, "rewrite-kv-cache{layout=static},slice-last-token-logits")
    graphopt.optimize(static, tmp_path / "static", passes="eliminate-dead-code")
    check_decode_in_place(graphopt.load(tmp_path / "static"), ref, cfg.num_hidden_layers, kv, head, "static")
    _, artifact = _tvm_artifact(graph, f"rewrite-kv-cache{{layout=paged,block-size={BLOCK_SIZE}}}", tmp_path)
    check_decode(artifact.run, ref, PROMPTS, 6, cfg.num_hidden_layers, kv, head, "paged", 64)


@pytest.mark.slow
def test_positions_the_model_computes_from_the_mask_come_from_the_mask_with_the_past(fused, tmp_path):
    """OPT computes its learned positions inside the model, `cumsum(mask) * mask - 1 + 2`: the
    rewrite computes them from the mask with the past and slices the step's positions out, so
    a left-padded batch decodes as PyTorch does row by row (ORT and TVM)."""
    model, graph = fused("opt")  # hidden 64: 4 heads of 16
    g = rewrite(graph, "rewrite-kv-cache,slice-last-token-logits")
    cumsum = [n for n in g.nodes if n.op_type == "CumSum" and n.inputs[0].name == "attention_mask"]
    assert len(cumsum) == 1  # OPT's own, now over the mask with the past (no rotary reads the rewrite's)
    assert any(n.name.startswith("kv_cache_mask/Slice") for n in g.nodes)
    cfg = model.config
    ref = hf_reference(model)
    run = lowered_ort(g, tmp_path)
    check_decode(run, ref, PROMPTS, 8, cfg.num_hidden_layers, 4, 16)
    # TVM: OPT's MLP runs on rows flattened to [batch * seq, hidden]
    _, artifact = _tvm_artifact(graph, "rewrite-kv-cache", tmp_path)
    check_decode(artifact.run, ref, PROMPTS, 6, cfg.num_hidden_layers, 4, 16)


def test_a_value_of_the_mask_that_is_not_per_position_is_refused(export_dir):
    """A model whose positions count the real tokens *after* each one (a suffix sum of the
    mask) cannot be computed from the mask a step sees: the rewrite refuses it, naming the value."""
    import torch

    from graphopt.driver import optimize
    from graphopt.models import load_graph
    from graphopt.passes.kvcache.rewrite import KVCacheError
    from graphopt.testing import export_onnx, tiny_hf_model

    gpt2 = tiny_hf_model("gpt2").model

    class Reversed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = gpt2

        def forward(self, input_ids, attention_mask):
            after = attention_mask.flip(-1).cumsum(-1).flip(-1) - 1
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=after,
                              use_cache=False).logits

    path = export_onnx(Reversed().eval(), export_dir / "gpt2_reversed_positions.onnx", dynamo=True)
    graph = optimize(load_graph(path), None, kv_cache=False).graph
    graph.metadata.metadata_props["graphopt.max_positions"] = "64"
    with pytest.raises(KVCacheError, match="is computed from the attention mask, but not one position at a time"):
        rewrite(graph)


def _hf_folder(tmp_path, cls_name: str, **config):
    """A small Hugging Face folder of `transformers.<cls_name>` with random weights (vocabulary
    128, 2 layers, 4 query and 2 key/value heads of 8) and the model."""
    import torch
    import transformers as tf

    cls = getattr(tf, cls_name)
    cfg = cls.config_class(**{**dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64), **config})
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


@pytest.mark.slow
def test_a_sliding_window_is_kept_past_the_window_on_ort_and_tvm(tmp_path):
    """Phi-3 with a 5-key sliding window (Phi-3-mini-4k's is 2,047 of 4,096): the probe at 5
    positions saw a causal mask and the rewrite dropped the window, so every step past it
    was silently wrong. The bias now keeps it: 10 steps past 6-token prompts match PyTorch on
    ORT and TVM, left padding included."""
    folder, model = _hf_folder(tmp_path, "Phi3ForCausalLM", max_position_embeddings=64, sliding_window=5,
                               pad_token_id=0, eos_token_id=1, bos_token_id=1)
    ref = hf_reference(model)
    for backend in ("onnxruntime", "tvm"):
        if backend == "tvm":
            pytest.importorskip("tvm")
        graphopt.optimize(folder, tmp_path / backend, backend=backend)
        artifact = graphopt.load(tmp_path / backend)
        check_decode(artifact.run, ref, PROMPTS, 10, 2, 2, 8)


@pytest.mark.slow
def test_a_window_too_wide_to_probe_caps_the_context_at_the_window(tmp_path):
    """A config window of 4,200 below 8,192 positions: probing the masks past it would take
    [4201, 4201] arrays per mask (a Qwen2.5-1M's 32,768-key window: GBs). The artifact serves
    up to the window instead (a step past it is the usual clear error), and decodes as PyTorch."""
    folder, model = _hf_folder(tmp_path, "MistralForCausalLM", max_position_embeddings=8192, sliding_window=4200)
    result = graphopt.optimize(folder, tmp_path / "ort")
    (stats,) = [e["stats"] for e in result.report["passes"] if e.get("name") == "rewrite-kv-cache"]
    assert stats.get("max-positions-capped-at-the-window") == 1 and "sliding-window-attention" not in stats
    artifact = graphopt.load(tmp_path / "ort")
    assert artifact.manifest["generation"]["max_positions"] == 4200
    check_decode(artifact.run, hf_reference(model), PROMPTS, 4, 2, 2, 8)


@pytest.mark.slow
def test_gemma2_softcap_and_alternating_windows_decode_as_pytorch(tmp_path):
    """Gemma 2: attention logits soft-capped (fused as graphopt.Attention's softcap; before,
    the Softmax stayed unfused and the model was not generation-ready), local layers with a
    5-key window alternating with global ones: 10 steps past the window on ORT and TVM."""
    folder, model = _hf_folder(tmp_path, "Gemma2ForCausalLM", head_dim=8, max_position_embeddings=64,
                               sliding_window=5, attn_logit_softcapping=2.0)
    ref = hf_reference(model)
    for backend in ("onnxruntime", "tvm"):
        if backend == "tvm":
            pytest.importorskip("tvm")
        result = graphopt.optimize(folder, tmp_path / backend, backend=backend)
        (stats,) = [e["stats"] for e in result.report["passes"] if e.get("name") == "rewrite-kv-cache"]
        assert stats.get("sliding-window-attention") == 1 and stats.get("attention") == 1
        check_decode(graphopt.load(tmp_path / backend).run, ref, PROMPTS, 10, 2, 2, 8)


@pytest.mark.slow
def test_a_window_wider_than_the_probe_is_found_from_the_config(tmp_path):
    """Mistral with a 70-key window and 128 positions: the masks, probed at 64 positions by
    default, look causal; the frontend records the config's window and the probe runs past it."""
    folder, model = _hf_folder(tmp_path, "MistralForCausalLM", max_position_embeddings=128, sliding_window=70)
    result = graphopt.optimize(folder, tmp_path / "ort")
    artifact = graphopt.load(tmp_path / "ort")
    (stats,) = [e["stats"] for e in result.report["passes"] if e.get("name") == "rewrite-kv-cache"]
    assert stats.get("sliding-window-attention") == 2
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 128, 68)]
    check_decode(artifact.run, hf_reference(model), [prompt, prompt[:60]], 8, 2, 2, 8)


def test_a_multi_token_step_over_a_batched_cache_is_right_or_refused_on_ort(fused, tmp_path):
    """GroupQueryAttention's CPU kernel runs prefill (empty past) and one-token steps at any
    batch size and refuses a multi-token step over a batched cache with an error, not a wrong
    answer; opset-23 Attention (the default at these head-8 sites) runs it, as the interpreter does."""
    from graphopt.interpreter import run as interpret

    _, graph = fused("llama")
    g = rewrite(graph)
    empty = {f"past_key_values.{i}.{k}": np.zeros((2, 2, 0, 8), np.float32) for i in range(2) for k in ("key", "value")}
    ids = np.array([[5, 17, 3], [4, 4, 2]], np.int64)
    first = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty}
    for kernel in ("auto", "gqa"):
        graphopt.optimize(g, tmp_path / kernel, passes="eliminate-dead-code",
                          backend_options={"attention_kernel": kernel})
        run = graphopt.load(tmp_path / kernel).run
        out = run(first)
        step = {"input_ids": ids[:, :2], "attention_mask": np.ones((2, 5), np.int64),
                **{f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")}}
        if kernel == "gqa":
            with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1"):
                run(step)
        else:
            got, want = run(step), interpret(g, step)
            for name in ("logits", "present.1.key", "present.1.value"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["BNSH", "BSNH"])
def test_prefill_and_decode_on_tvm_match_pytorch(fused, tmp_path, layout):
    model, graph = fused("llama")  # grouped-query: 4 query heads, 2 cached key/value heads
    g, artifact = _tvm_artifact(graph, f"rewrite-kv-cache{{layout={layout}}}", tmp_path)
    check_decode(artifact.run, hf_reference(model), PROMPTS, 6, 2, 2, 8, layout)
    greedy = artifact.generate(PROMPTS, 8, eos_token_id=-1).tokens
    if layout == "BNSH":
        ort = graphopt.load(_ort_artifact(g, tmp_path))
        assert greedy == ort.generate(PROMPTS, 8, eos_token_id=-1).tokens


def check_decode_in_place(artifact, ref, layers: int, kv: int, head: int, layout: str) -> None:
    """`check_decode` at batch 3 (left padding) through the artifact's default decode runner,
    which for a static or paged cache is IO-bound: every step's present must be the very
    buffer fed as its past (one buffer for the whole generation, written in place)."""
    bound = artifact.decode_run()
    assert bound != artifact.run  # a shared buffer is bound by default
    seen = []

    def run(feeds):  # the bound runner, recording which buffer each step's past and present are
        out = bound(feeds)
        seen.append((feeds["past_key_values.0.key"].ctypes.data, out["present.0.key"].ctypes.data))
        return out
    check_decode(run, ref, PROMPTS, 8, layers, kv, head, layout, 64)
    assert len({present for _, present in seen}) == 1 and all(p == q for p, q in seen[1:])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_layout_on_ort_matches_pytorch_and_fills_the_buffer_in_place(arch, fused, tmp_path):
    """layout=static: one [batch, kv_heads, 64, head] buffer per cache, GroupQueryAttention
    with the mask's length as the valid length; driven plainly and through IO binding, where
    each present is the very buffer fed back as the next past (shared, filled in place)."""
    model, graph = fused(arch)
    g = rewrite(graph, "rewrite-kv-cache{layout=static},slice-last-token-logits")
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head, layers = cfg.hidden_size // heads, cfg.num_hidden_layers
    assert g.value("past_key_values.0.key").type.shape == ("batch", kv, 64, head)
    artifact = graphopt.load(_ort_artifact(g, tmp_path))
    assert artifact.manifest["lowering"]["kernels"]["com.microsoft.GroupQueryAttention"] == layers
    ref = hf_reference(model)
    check_decode(artifact.run, ref, PROMPTS[:1], 8, layers, kv, head, "static", 64)  # batch 1
    check_decode_in_place(artifact, ref, layers, kv, head, "static")  # batch 3, left padding
    graphopt.optimize(rewrite(graph, "rewrite-kv-cache,slice-last-token-logits"), tmp_path / "bnsh",
                      passes="eliminate-dead-code")
    bnsh = graphopt.load(tmp_path / "bnsh")
    assert artifact.generate(PROMPTS, 12, eos_token_id=-1).tokens == bnsh.generate(PROMPTS, 12, eos_token_id=-1).tokens


def _op_counts(artifact_dir: Path) -> collections.Counter:
    import onnx

    model = onnx.load(str(artifact_dir / "model.onnx"), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["BNSH", "static"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rotary_inside_group_query_attention_matches_pytorch(arch, layout, fused, tmp_path):
    """Head size 16: GroupQueryAttention rotates Q and K itself (do_rotary, cos/sin caches, packed
    QKV), at the cache index positions; with left padding those are the mask's positions plus a
    constant per row, which leaves every real token's scores unchanged (gqa_rotary.py). Prefill
    and 57 steps (to the 64-position limit) at batch 1, 16 steps at batch 3 left-padded."""
    model, graph = fused(arch, 16)
    pipeline = "rewrite-kv-cache,slice-last-token-logits" if layout == "BNSH" else \
        "rewrite-kv-cache{layout=static},slice-last-token-logits"
    out = _ort_artifact(rewrite(graph, pipeline), tmp_path)
    ops = _op_counts(out)
    assert ops["GroupQueryAttention"] == 2 and ops["RotaryEmbedding"] == 0 and ops["Split"] == 2, ops  # gate/up, a layer
    import onnx

    gqa = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
           if n.op_type == "GroupQueryAttention"]
    attrs = [{a.name: a.i for a in n.attribute} for n in gqa]
    assert all(a["do_rotary"] == 1 and a["causal"] == 1 for a in attrs) and all(n.input[1] == "" for n in gqa)  # packed
    assert ops["Range"] == ops["LessOrEqual"] == 0  # causal in the kernel, the bias only the padding
    artifact = graphopt.load(out)
    ref = hf_reference(model)
    check_decode(artifact.run, ref, PROMPTS[:1], 57, 2, 2, 16, layout, 64)
    check_decode(artifact.run, ref, PROMPTS, 16, 2, 2, 16, layout, 64)
    if layout == "static":  # the Generator's IO-bound loop, as the benchmarks drive it
        check_decode(artifact.decode_run(), ref, PROMPTS, 16, 2, 2, 16, layout, 64)
    else:  # the Generator's: each past one buffer of the positions needed, its present written in place
        assert artifact.manifest["generation"]["past_present_share_buffer"] is True
        check_decode(artifact.decode_run(shared=True), ref, PROMPTS, 16, 2, 2, 16, "static", 24)


def test_the_causal_half_of_the_kv_bias_is_recognized_and_nothing_else(fused):
    """rewrite-kv-cache's bias splits into padding (kept as a bias) and the causal part (the
    kernel's causal=1); a bias whose causal part is anything else is left as it is."""
    from graphopt.backends.onnxruntime.gqa_causal import padding_of_causal_bias
    from graphopt.builder import Builder

    _, graph = fused("llama")
    g = rewrite(graph)
    bias = next(n for n in g.nodes if n.op_type == "Attention").inputs[3]
    real, nodes = padding_of_causal_bias(bias)
    assert real.producer().op_type == "Unsqueeze" and [n.op_type for n in nodes[:3]] == ["Where", "And", "LessOrEqual"]
    where = bias.producer()
    b = Builder(g, before=where)
    no_causal = b.Where(real, where.inputs[1], where.inputs[2])  # padding only: not causal at all
    assert padding_of_causal_bias(no_causal) is None
    le = where.inputs[0].producer().inputs[1].producer()
    shifted = b.Where(b.And(real, b.Less(*le.inputs)), where.inputs[1], where.inputs[2])  # j < past + i
    assert padding_of_causal_bias(shifted) is None
    infinite = b.Where(where.inputs[0], where.inputs[1], b.const(np.array(-np.inf, np.float32), "neg_inf"))
    assert padding_of_causal_bias(infinite) is None


def test_rotary_stays_outside_group_query_attention_where_the_kernel_cannot_take_it(fused, tmp_path):
    """Head size 8 (the kernel's rotary wants a multiple of 16): the RotaryEmbedding nodes stay,
    and the reason is the first condition that failed."""
    from graphopt.backends.onnxruntime.attention import Site
    from graphopt.backends.onnxruntime.gqa_rotary import linear_in_position, rotary_in_kernel

    _, graph = fused("llama")
    out = _ort_artifact(rewrite(graph), tmp_path)
    assert _op_counts(out)["RotaryEmbedding"] == 4
    attention = next(n for n in rewrite(graph).nodes if n.op_type == "Attention")
    assert rotary_in_kernel(Site.read(attention), False).startswith("not a decoder rewrite-kv-cache made")
    assert rotary_in_kernel(Site.read(attention), True) == "Q or K is not a RotaryEmbedding's output"  # not lowered
    p = np.arange(64)[:, None] * (1.0 / 10000 ** (np.arange(8) / 8))[None]
    assert linear_in_position(np.cos(p), np.sin(p)) and linear_in_position(2 * np.cos(p), 2 * np.sin(p))
    assert not linear_in_position(np.cos(p ** 1.01), np.sin(p ** 1.01))  # not a rotation linear in p


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["BNSH", "static", "paged"])
def test_kv_cache_layouts_build_for_tvm_cuda(fused, tmp_path, layout):
    """Built, not run (a GPU is not assumed): TVM refuses to build a GPU kernel that no
    schedule bound to threads, so the build succeeding means the cache write was scheduled."""
    tvm = pytest.importorskip("tvm")
    from graphopt.backends.tvm.build import cuda_compiler

    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None or cuda_compiler() is None:
        pytest.skip("no CUDA code generation or no nvcc/NVRTC here")
    _, graph = fused("llama")
    g = rewrite(graph, f"rewrite-kv-cache{{layout={layout}}},slice-last-token-logits")
    result = graphopt.optimize(g, tmp_path / "cuda", backend="tvm", target="cuda", passes="eliminate-dead-code")
    assert result.manifest["tvm_target"]["kind"] == "cuda"
    assert result.manifest["generation"]["kv_layout"] == layout
    library = (tmp_path / "cuda" / "model.so").read_bytes()
    assert b"_kernel" in library and (layout == "BNSH" or b"kv_cache_write" in library)


def test_paged_attention_is_bnsh_attention_over_the_gathered_blocks():
    """graphopt.Attention{kv_layout=paged}: pools of 7 blocks of 4, rows placed by a block
    table, 8 valid positions after 3 new ones: reference and decomposition give BNSH's output
    over the rows' first 5 positions, the new ones written to their slots, block 4 (no row
    names it) untouched."""
    from graphopt.interpreter import run

    rng = np.random.default_rng(1)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    table = np.array([[5, 0, 3], [2, 6, 1]], np.int32)
    feeds = {"q": f32(2, 3, 32), "k": f32(2, 3, 16), "v": f32(2, 3, 16), "mask": f32(2, 1, 3, 8),
             "pk": f32(7, 4, 2, 8), "pv": f32(7, 4, 2, 8), "table": table}

    def rows(pool, n):  # [batch, kv_heads, n, head]: each row's first n positions
        p = np.arange(n)
        return np.stack([pool[table[r, p // 4], p % 4].transpose(1, 0, 2) for r in range(2)])
    bnsh = {**{k: feeds[k] for k in ("q", "k", "v", "mask")}, "pk": rows(feeds["pk"], 5), "pv": rows(feeds["pv"], 5)}

    y_want, pk_want, pv_want = run(attention_graph("BNSH", bnsh), bnsh).values()
    for decompose in (False, True):
        g = attention_graph("paged", feeds, decompose)
        assert g.outputs[1].type.shape == (7, 4, 2, 8)
        assert decompose == ("ScatterND" in {n.op_type for n in g.nodes})
        y, pk, pv = run(g, feeds).values()
        np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
        for got, want, pool in ((pk, pk_want, feeds["pk"]), (pv, pv_want, feeds["pv"])):
            np.testing.assert_allclose(rows(got, 8), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(got[4], pool[4])


def test_paged_layout_in_the_reference_interpreter(fused):
    model, graph = fused("llama")
    g = rewrite(graph, f"rewrite-kv-cache{{layout=paged,block-size={BLOCK_SIZE},max-positions=16}}")
    assert g.value("past_key_values.0.key").type.shape == ("num_blocks", BLOCK_SIZE, 2, 8)
    assert g.value("block_table").type.shape == ("batch", "max_blocks")
    check_decode(interpreter(g), hf_reference(model), PROMPTS, 3, 2, 2, 8, "paged", 16)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_paged_layout_on_ort_matches_pytorch(arch, fused, tmp_path):
    """ORT has no CPU PagedAttention: the site is decomposed (Gather on the block table,
    ScatterND into the pool); the Generator allocates the blocks and gives BNSH's tokens.
    Each present is a ScatterND of its past pool itself, so through IO binding the pool is the
    one buffer every step reads and writes (ORT's ScatterND copies nothing when its output is
    its input's memory)."""
    model, graph = fused(arch)
    g = rewrite(graph, f"rewrite-kv-cache{{layout=paged,block-size={BLOCK_SIZE}}},slice-last-token-logits")
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head, layers = cfg.hidden_size // heads, cfg.num_hidden_layers
    artifact = graphopt.load(_ort_artifact(g, tmp_path))
    assert artifact.manifest["generation"]["block_size"] == BLOCK_SIZE
    ref = hf_reference(model)
    check_decode(artifact.run, ref, PROMPTS[:1], 8, layers, kv, head, "paged", 64)  # batch 1
    check_decode(artifact.run, ref, PROMPTS, 8, layers, kv, head, "paged", 64)  # batch 3, left padding
    import onnx

    model_proto = onnx.load(str(tmp_path / "ort" / "model.onnx"), load_external_data=False)
    producers = {o: n for n in model_proto.graph.node for o in n.output}
    for i in range(layers):
        for kind in ("key", "value"):
            scatter = producers[f"present.{i}.{kind}"]
            assert scatter.op_type == "ScatterND" and scatter.input[0] == f"past_key_values.{i}.{kind}"
    check_decode_in_place(artifact, ref, layers, kv, head, "paged")
    graphopt.optimize(rewrite(graph, "rewrite-kv-cache,slice-last-token-logits"), tmp_path / "bnsh",
                      passes="eliminate-dead-code")
    bnsh = graphopt.load(tmp_path / "bnsh")
    assert artifact.generate(PROMPTS, 12, eos_token_id=-1).tokens == bnsh.generate(PROMPTS, 12, eos_token_id=-1).tokens


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["static", "paged"])
def test_shared_buffer_layouts_on_tvm_match_pytorch_and_write_in_place(fused, tmp_path, layout):
    """layout=static|paged on TVM: the new positions are written into the past buffer (the
    pool, through the block table) in place (call_tir_inplace), so through the bound runner
    each present is the very tensor fed as the past, one buffer for every step; a step past
    the buffer is an error, not a write."""
    model, graph = fused("llama")  # grouped-query: 4 query heads, 2 cached key/value heads
    g, artifact = _tvm_artifact(graph, f"rewrite-kv-cache{{layout={layout},block-size={BLOCK_SIZE}}}", tmp_path)
    ref = hf_reference(model)
    check_decode(artifact.run, ref, PROMPTS[:1], 6, 2, 2, 8, layout, 64)  # batch 1
    # run plainly, a past the graph writes in place is found so (an output aliases its buffer)
    # and gets a new copy every call, never a buffer reused under an output already returned
    pasts = {n for n in artifact._exe.input_names if n.startswith("past_key_values.")}
    assert pasts and pasts <= artifact._exe._written_in_place
    bound = artifact.decode_run()
    seen = []

    def run(feeds):  # the bound runner, recording which buffer each step's past and present are
        out = bound(feeds)
        past = feeds["past_key_values.0.key"]
        seen.append((None if isinstance(past, np.ndarray) else past.data_ptr(), out["present.0.key"].data_ptr()))
        return out
    check_decode(run, ref, PROMPTS, 6, 2, 2, 8, layout, 64)  # batch 3, left padding
    assert len({present for _, present in seen}) == 1 and all(p == q for p, q in seen[1:])  # in place
    ort = graphopt.load(_ort_artifact(g, tmp_path))
    assert artifact.generate(PROMPTS, 12, eos_token_id=-1).tokens == ort.generate(PROMPTS, 12, eos_token_id=-1).tokens
    with pytest.raises(UserError, match="needs 65 positions; the model has 64"):
        artifact.generate([[1] * 60], 6)
    if layout == "static":  # a mask past the buffer
        past = {"attention_mask": np.ones((1, 65), np.int64)}
        cache, what = (1, 2, 64, 8), "static KV cache"
    else:  # a mask past the block table
        past = {"attention_mask": np.ones((1, 9), np.int64), "block_table": np.zeros((1, 2), np.int32)}
        cache, what = (8, 4, 2, 8), "block table"
    caches = {f"past_key_values.{i}.{k}": np.zeros(cache, np.float32) for i in range(2) for k in ("key", "value")}
    with pytest.raises(Exception, match=f"more positions than the {what} holds"):
        bound({"input_ids": np.ones((1, 1), np.int64), **past, **caches})
    if layout == "paged":  # a block id outside the pool: refused before the kernel (it wrote out of bounds)
        past = {"attention_mask": np.ones((1, 5), np.int64), "block_table": np.array([[0, -3]], np.int32)}
        with pytest.raises(UserError, match=r"block_table\[0, 1\] is block -3; the paged KV cache's pool has 8"):
            bound({"input_ids": np.ones((1, 1), np.int64), **past, **caches})


def test_paged_generator_allocates_blocks_and_runs_out_clearly(fused, tmp_path):
    from graphopt.generation import Generator

    _, graph = fused("llama")
    g = rewrite(graph, f"rewrite-kv-cache{{layout=paged,block-size={BLOCK_SIZE},max-positions=16}}")
    artifact = graphopt.load(_ort_artifact(g, tmp_path))
    seen = []

    def run(feeds):
        seen.append(feeds["block_table"].copy())
        return artifact.run(feeds)
    gen = Generator.for_artifact(artifact)
    gen.run = run
    gen.generate(PROMPTS, 5, eos_token_id=-1)  # 6 prompt positions + 4 steps: 3 blocks of 4 per row
    assert [t.shape for t in seen] == [(3, 3)] * 5
    assert len(set(seen[-1].ravel())) == 9  # every row its own blocks
    assert not seen[2][:, 2].any() and seen[3][:, 2].all()  # a row's third block comes with its 9th position
    gen = Generator.for_artifact(artifact, num_blocks=8)
    gen.run = run
    with pytest.raises(UserError, match="out of blocks: 8 blocks of 4 positions cannot hold 3 rows of 9"):
        gen.generate(PROMPTS, 5, eos_token_id=-1)
    with pytest.raises(UserError, match="needs 17 positions; the model has 16"):
        artifact.generate([[1] * 10], 8)
    cache = {f"past_key_values.{i}.{k}": np.zeros((8, 4, 2, 8), np.float32) for i in range(2) for k in ("key", "value")}
    with pytest.raises(UserError, match="attention_mask covers 17 positions; the paged KV cache holds 16"):
        artifact.run({"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 17), np.int64),
                      "block_table": np.zeros((1, 5), np.int32), **cache})
    # a block id outside the pool, in the columns the mask covers (9 positions: 3 blocks), is refused
    # before a kernel writes outside the pool or reads another row's block; past them, anything goes
    feeds = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 9), np.int64), **cache}
    for bad in (8, -1):
        for run_ in (artifact.run, artifact.decode_run(io_binding=True)):
            with pytest.raises(UserError, match=rf"block_table\[0, 2\] is block {bad}; the paged KV cache's pool "
                                                r"has 8 blocks \(ids 0 to 7\)"):
                run_({**feeds, "block_table": np.array([[0, 1, bad, 3]], np.int32)})
    assert artifact.run({**feeds, "block_table": np.array([[0, 1, 2, -1]], np.int32)})["logits"].shape[:2] == (1, 1)


@pytest.fixture(scope="module")
def exported_with_cache(tmp_path_factory):
    """(the Optimum-style ONNX file of a GQA Llama, the graph after the fusion pipeline, the
    model)."""
    from graphopt.driver import optimize
    from graphopt.models import load_graph
    from graphopt.testing import export_onnx_with_cache, tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model
    path = export_onnx_with_cache(model, tmp_path_factory.mktemp("cache") / "m.onnx")
    return path, optimize(load_graph(path), None, kv_cache=False).graph, model


@pytest.mark.parametrize("layout", ["BNSH", "static", "paged"])
def test_a_model_exported_with_a_cache_is_moved_to_another_layout(exported_with_cache, layout, tmp_path):
    """The exported model (its caches Concats of past and new) before, run by ORT as
    exported; after rewrite-kv-cache{layout=...}, in the interpreter and as a lowered ORT
    artifact, on the same past (laid out in the layout): the same logits, and the same
    present positions."""
    path, fused, _ = exported_with_cache
    g = rewrite(fused.copy(), f"rewrite-kv-cache{{layout={layout},max-positions=16,block-size={BLOCK_SIZE}}}")
    assert not [n for n in g.nodes if n.op_type == "Concat" and n.inputs[0].name.startswith("past_key_values.")]
    assert all(len(n.inputs) == (7 if layout == "paged" else 6) for n in g.nodes if n.op_type == "Attention")
    ort = lowered_ort(g, tmp_path)
    # a 3-token step in the interpreter; a 1-token step on ORT too (GroupQueryAttention's CPU
    # kernel refuses a multi-token step over a batched cache)
    for seq, runs in ((3, [interpreter(g)]), (1, [interpreter(g), ort])):
        _check_converted(path, layout, seq, runs)


def test_graphopt_optimize_makes_a_model_exported_with_a_cache_generation_ready(exported_with_cache, tmp_path):
    """The default pipeline recognizes the exported cache (an attention kernel on the
    recognized sites, last-token logits) and the Generator drives it: each row of a
    left-padded batch as PyTorch on the unpadded row."""
    path, _, model = exported_with_cache
    graphopt.optimize(path, tmp_path / "out")
    artifact = graphopt.load(tmp_path / "out")
    assert (artifact.manifest["generation"]["kv_layout"], artifact.manifest["generation"]["logits"]) == ("BNSH", "last")
    assert artifact.manifest["lowering"]["kernels"]["Attention"] == 2  # head 8: no rotary inside GQA
    check_decode(artifact.run, hf_reference(model), PROMPTS, 6, 2, 2, 8)


def test_check_numerics_runs_on_a_model_exported_with_a_cache(exported_with_cache, tmp_path):
    """--check-numerics on a cached export: the sample mask spans the past and the new tokens
    (before, its "total" was bound to the new tokens alone and the check failed inside the
    model, reported as an internal error)."""
    path, _, _ = exported_with_cache
    graphopt.optimize(path, tmp_path / "out", check_numerics=True)
    assert graphopt.load(tmp_path / "out").manifest["generation"]["kv_layout"] == "BNSH"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["BNSH", "static"])
def test_an_optimum_export_with_position_ids_becomes_generation_ready(layout, tmp_path):
    """optimum-cli exports a cached decoder with a `position_ids` input and its own dimension
    names (batch_size): before, graphopt wrote a full-sequence artifact without a word, and
    `generate` failed on the missing position_ids. The positions now come from the mask, and
    the static artifact through IO binding (the Generator's way) decodes as PyTorch row by row;
    the maximum context comes from the config.json beside the .onnx, as in Optimum's folder."""
    from graphopt.testing import export_onnx_with_cache, tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model
    (tmp_path / "optimum").mkdir()
    path = export_onnx_with_cache(model, tmp_path / "optimum" / "model.onnx", position_ids=True)
    model.config.to_json_file(tmp_path / "optimum" / "config.json")
    graphopt.optimize(path, tmp_path / "out", kv_layout=layout)
    artifact = graphopt.load(tmp_path / "out")
    assert "position_ids" not in [i["name"] for i in artifact.manifest["signature"]["inputs"]]
    gen = artifact.manifest["generation"]
    assert gen["kv_layout"] == layout and gen["max_positions"] == 64
    max_positions = 64 if layout == "static" else 0
    check_decode(artifact.decode_run(), hf_reference(model), PROMPTS, 6, 2, 2, 8, layout, max_positions)
    if layout == "BNSH":  # its mask's length is named past + new: GroupQueryAttention (int4 keeps it at head 8)
        graphopt.optimize(path, tmp_path / "int4", quantize="int4")  # takes the total from the mask: shared
        artifact = graphopt.load(tmp_path / "int4")
        assert _op_counts(tmp_path / "int4")["GroupQueryAttention"] == 2 and artifact.shares_cache_buffer
        greedy = artifact.generate(PROMPTS, 8, eos_token_id=-1).tokens
        for row, prompt in zip(greedy, PROMPTS):
            assert artifact.generate([prompt], 8, eos_token_id=-1).tokens[0] == row


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["BNSH", "static"])
def test_an_optimum_export_keeps_its_dimension_names_and_builds_for_tvm(layout, tmp_path):
    """The rewritten cache speaks of the export's own dims (batch_size, past_sequence_length,
    "past_sequence_length + sequence_length"), not of graphopt's `batch` and `past_seq + seq`
    beside them: TVM relates dims by name, and refused the attention of such an export in every
    layout ("an input's shape is unknown to Relax"). It now builds, and decodes as PyTorch."""
    pytest.importorskip("tvm")
    from graphopt.testing import export_onnx_with_cache, tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model
    (tmp_path / "optimum").mkdir()
    path = export_onnx_with_cache(model, tmp_path / "optimum" / "model.onnx", position_ids=True)
    model.config.to_json_file(tmp_path / "optimum" / "config.json")
    graphopt.optimize(path, tmp_path / "out", backend="tvm", kv_layout=layout)
    artifact = graphopt.load(tmp_path / "out")
    shapes = {e["name"]: e["shape"] for e in artifact.inputs + artifact.outputs}
    if layout == "BNSH":
        assert shapes["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 8]
        assert shapes["present.1.value"] == ["batch_size", 2, "past_sequence_length + sequence_length", 8]
    else:
        assert shapes["past_key_values.0.key"] == ["batch_size", 2, 64, 8]
    check_decode(artifact.decode_run(), hf_reference(model), PROMPTS, 6, 2, 2, 8, layout,
                 64 if layout == "static" else 0)
    if layout == "BNSH":  # kept as exported (--no-kv-cache): its mask, past_sequence_length + sequence_length,
        # is one symbol in the signature, cast to the sum at once (cast where the attention met it, FuseTIR failed)
        from graphopt.testing import run_ort

        import onnx

        graphopt.optimize(path, tmp_path / "as_exported", backend="tvm", kv_cache=False)
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, VOCAB_TEST, (2, 3)), "attention_mask": np.ones((2, 8), np.int64),
                 "position_ids": np.tile(np.arange(5, 8), (2, 1)),
                 **{f"past_key_values.{i}.{k}": rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
                    for i in range(2) for k in ("key", "value")}}
        want = run_ort(onnx.load(str(path)), feeds)
        got = graphopt.load(tmp_path / "as_exported").run(feeds)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4)
        np.testing.assert_allclose(got["present.1.value"], want["present.1.value"], atol=1e-5)


def test_max_positions_sizes_the_static_cache_of_an_onnx_file_that_records_no_context(exported_with_cache, tmp_path):
    """An ONNX file with a cache and no config.json beside it: --kv-layout static said "give
    rewrite-kv-cache{max-positions=N}", and --passes with that pass alone failed (the pass runs
    after the fusion pipeline). --max-positions N now sizes the default pipeline's cache."""
    from click.testing import CliRunner

    from graphopt.cli import cli

    path, _, model = exported_with_cache
    with pytest.raises(UserError, match=r"--kv-layout static: .*needs the maximum context.*--max-positions N"):
        graphopt.optimize(path, tmp_path / "none", kv_layout="static")
    graphopt.optimize(path, tmp_path / "out", kv_layout="static", max_positions=32)
    artifact = graphopt.load(tmp_path / "out")
    assert (artifact.manifest["generation"]["kv_layout"], artifact.manifest["generation"]["max_positions"]) == ("static", 32)
    check_decode(artifact.decode_run(), hf_reference(model), PROMPTS, 6, 2, 2, 8, "static", 32)
    r = CliRunner().invoke(cli, ["optimize", str(path), "-o", str(tmp_path / "p"), "--passes", "fold-constants",
                                 "--max-positions", "32"])
    assert r.exit_code == 2 and "--max-positions sizes the default pipeline's KV cache" in r.output


def test_an_exported_cache_the_pass_cannot_read_is_refused_with_the_reason(exported_with_cache):
    from graphopt.models import load_graph
    from graphopt.pass_manager import PassError

    path, fused, _ = exported_with_cache
    with pytest.raises(PassError, match="'present.0.key' is not Concat.* after the fusion pipeline"):
        rewrite(load_graph(path), "rewrite-kv-cache")  # not fused: Softmax reads the cache
    with pytest.raises(PassError, match="the static layout needs the maximum context.*max-positions=N"):
        rewrite(fused.copy(), "rewrite-kv-cache{layout=static}")  # an ONNX file records no maximum context


def _check_converted(path, layout: str, seq: int, runs):
    import onnx

    from graphopt.testing import run_ort

    rng = np.random.default_rng(seq)
    batch, past = 2, 5
    feeds = {"input_ids": rng.integers(0, VOCAB_TEST, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64)}
    feeds["attention_mask"][1, :2] = 0  # left padding
    caches = {f"past_key_values.{i}.{k}": rng.standard_normal((batch, 2, past, 8)).astype(np.float32)
              for i in range(2) for k in ("key", "value")}
    want = run_ort(onnx.load(str(path)), {**feeds, **caches})
    table = np.array([[3, 0], [1, 5]], np.int32)  # two blocks of 4 per row, in a pool of 6
    p = np.arange(past + seq)

    def laid_out(c):  # a BNSH past in the layout
        if layout == "static":
            return np.concatenate([c, np.zeros((batch, 2, 16 - past, 8), np.float32)], axis=2)
        if layout == "paged":
            pool = np.zeros((6, BLOCK_SIZE, 2, 8), np.float32)
            for r in range(batch):
                pool[table[r, p[:past] // BLOCK_SIZE], p[:past] % BLOCK_SIZE] = c[r].transpose(1, 0, 2)
            return pool
        return c

    def as_bnsh(c):  # a present in the layout, back to BNSH over the valid positions
        if layout == "static":
            return c[:, :, :past + seq]
        if layout == "paged":
            return np.stack([c[table[r, p // BLOCK_SIZE], p % BLOCK_SIZE].transpose(1, 0, 2) for r in range(batch)])
        return c

    after = {**feeds, **{n: laid_out(c) for n, c in caches.items()}}
    if layout == "paged":
        after["block_table"] = table
    for run in runs:
        got = run(after)
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-5, atol=1e-5)
        for name in (n for n in want if n.startswith("present.")):
            np.testing.assert_allclose(as_bnsh(np.asarray(got[name])), want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_static_layout_in_the_reference_interpreter_and_past_its_buffer(fused, tmp_path):
    model, graph = fused("llama")
    g = rewrite(graph, "rewrite-kv-cache{layout=static,max-positions=16}")
    check_decode(interpreter(g), hf_reference(model), PROMPTS, 3, 2, 2, 8, "static", 16)
    artifact = graphopt.load(_ort_artifact(rewrite(graph, "rewrite-kv-cache{layout=static,max-positions=16}"),
                                           tmp_path))
    gen = artifact.manifest["generation"]
    assert (gen["kv_layout"], gen["max_positions"]) == ("static", 16)
    assert "genai_config.json" in artifact.manifest["files"]
    with pytest.raises(UserError, match="needs 17 positions; the model has 16"):
        artifact.generate([[1] * 10], 8)
    cache = {f"past_key_values.{i}.{k}": np.zeros((1, 2, 16, 8), np.float32) for i in range(2) for k in ("key", "value")}
    with pytest.raises(UserError, match="attention_mask covers 17 positions; the static KV cache holds 16"):
        artifact.run({"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 17), np.int64), **cache})


def _tvm_artifact(graph, rewrite_pass: str, tmp_path):
    """(the graph after `rewrite_pass` and slice-last-token-logits, its TVM artifact loaded)."""
    pytest.importorskip("tvm")
    g = rewrite(graph, f"{rewrite_pass},slice-last-token-logits")
    graphopt.optimize(g, tmp_path / "tvm", backend="tvm", passes="eliminate-dead-code")
    artifact = graphopt.load(tmp_path / "tvm")
    assert artifact.manifest["generation"]["kv_layout"] == g.metadata.metadata_props["graphopt.kv_layout"]
    return g, artifact


def _ort_artifact(graph, tmp_path):
    graphopt.optimize(graph, tmp_path / "ort", passes="eliminate-dead-code")
    return tmp_path / "ort"


@pytest.mark.parametrize("layout", ["BNSH", "BSNH"])
def test_prefill_and_decode_in_the_reference_interpreter(fused, layout):
    model, graph = fused("llama")
    g = rewrite(graph, f"rewrite-kv-cache{{layout={layout}}}")  # logits at every position: the last is checked
    assert g.value("past_key_values.0.key").type.shape == (("batch", "past_seq", 2, 8) if layout == "BSNH"
                                                            else ("batch", 2, "past_seq", 8))
    check_decode(interpreter(g), hf_reference(model), PROMPTS, 3, 2, 2, 8, layout)


def test_attention_bsnh_caches_are_bnsh_transposed():
    """graphopt.Attention{kv_layout=BSNH}: reference kernel and decomposition agree with BNSH."""
    from graphopt.builder import Builder
    from graphopt.interpreter import run
    from graphopt.ir import Graph, TensorType
    from graphopt.dtypes import DType
    from graphopt.lowering import decompose_node

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    feeds = {"q": f32(2, 3, 32), "k": f32(2, 3, 16), "v": f32(2, 3, 16), "mask": f32(2, 1, 3, 8),
             "pk": f32(2, 5, 2, 8), "pv": f32(2, 5, 2, 8)}

    t = (0, 2, 1, 3)
    bnsh_feeds = {**feeds, "pk": feeds["pk"].transpose(t), "pv": feeds["pv"].transpose(t)}

    def graph(layout, decompose):
        g = Graph("attn")
        typed = feeds if layout == "BSNH" else bnsh_feeds
        ins = {n: g.add_input(n, TensorType(DType.FLOAT32, a.shape)) for n, a in typed.items()}
        b = Builder(g)
        outs = b.op("Attention", *ins.values(), domain="graphopt", n_out=3, num_heads=4, kv_num_heads=2,
                    causal=1, kv_layout=layout)
        g.outputs = list(outs)
        if decompose:
            decompose_node(g.nodes[0])
        return g

    want = list(run(graph("BNSH", False), bnsh_feeds).values())
    for decompose in (False, True):
        y, pk, pv = run(graph("BSNH", decompose), feeds).values()
        assert pk.shape == (2, 8, 2, 8)
        np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pk.transpose(t), want[1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(pv.transpose(t), want[2], rtol=1e-6, atol=1e-6)


def attention_graph(layout: str, typed: dict, decompose: bool = False):
    """One graphopt.Attention (4 query heads over 2 key/value heads) over inputs typed like
    `typed`, in kv_layout `layout`; `decompose`: its decomposition into core ops instead."""
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.ir import Graph, TensorType
    from graphopt.lowering import decompose_node

    g = Graph("attn")
    ins = {n: g.add_input(n, TensorType(DType.from_numpy(a.dtype), a.shape)) for n, a in typed.items()}
    outs = Builder(g).op("Attention", *ins.values(), domain="graphopt", n_out=3, num_heads=4, kv_num_heads=2,
                         kv_layout=layout)
    g.outputs = list(outs)
    if decompose:
        decompose_node(g.nodes[0])
    return g


def test_attention_static_cache_is_a_bnsh_past_written_in_place():
    """graphopt.Attention{kv_layout=static}: a [2, 2, 12, 8] buffer of which the mask (8 long)
    says 8 positions are valid after 3 new ones: reference and decomposition give BNSH's
    output over the first 5, and the buffer with positions 5..7 written, 8.. untouched."""
    from graphopt.interpreter import run

    rng = np.random.default_rng(1)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    feeds = {"q": f32(2, 3, 32), "k": f32(2, 3, 16), "v": f32(2, 3, 16), "mask": f32(2, 1, 3, 8),
             "pk": f32(2, 2, 12, 8), "pv": f32(2, 2, 12, 8)}
    bnsh_feeds = {**feeds, "pk": feeds["pk"][:, :, :5], "pv": feeds["pv"][:, :, :5]}

    y_want, pk_want, pv_want = run(attention_graph("BNSH", bnsh_feeds), bnsh_feeds).values()
    for decompose in (False, True):
        g = attention_graph("static", feeds, decompose)
        assert g.outputs[1].type.shape == (2, 2, 12, 8)
        y, pk, pv = run(g, feeds).values()
        np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
        for got, want, past in ((pk, pk_want, feeds["pk"]), (pv, pv_want, feeds["pv"])):
            np.testing.assert_array_equal(got[:, :, 8:], past[:, :, 8:])
            np.testing.assert_allclose(got[:, :, :8], want, rtol=1e-6, atol=1e-6)


def test_default_checkpoint_64_decode_steps_match_pytorch(default_artifact, default_model):
    out, _ = default_artifact
    artifact = graphopt.load(out)
    ref = train_reference(default_model)
    check_decode(artifact.run, ref, PROMPTS, 12, 6, 2, 32)  # batch 3, left padding
    check_decode(artifact.run, ref, PROMPTS[:1], 64, 6, 2, 32)  # batch 1, the 64 steps


def test_growing_cache_of_group_query_attention_is_shared_in_place(default_artifact, default_model):
    """The default (BNSH) artifact's presents are GroupQueryAttention's: its Generator feeds
    each past as a buffer of every position the request needs and binds the present to it
    (past_present_share_buffer), so a step writes its position in place instead of copying
    the whole past into a new present. Checked against PyTorch at batch 3 (left padding) and
    batch 1, the buffer being the very one fed at every step, and token for token against
    the growing drive."""
    from graphopt.generation import Generator

    out, _ = default_artifact
    artifact = graphopt.load(out)
    assert artifact.manifest["generation"]["past_present_share_buffer"] is True and artifact.shares_cache_buffer
    assert artifact.decode_run() == artifact.run  # a plain caller still drives it growing
    shared = artifact.decode_run(shared=True)
    seen = []

    def run(feeds):
        result = shared(feeds)
        seen.append((feeds["past_key_values.3.value"], result["present.3.value"]))
        return result
    ref = train_reference(default_model)
    # fed [batch, 2, 40, 32] zeros: the "static" check (the shape kept, each step's position
    # filled, the positions after it still zero)
    check_decode(run, ref, PROMPTS, 12, 6, 2, 32, "static", 40)
    assert all(past is present for past, present in seen)
    assert len({id(present) for _, present in seen}) == 1  # one buffer for the whole generation
    check_decode(shared, ref, PROMPTS[:1], 30, 6, 2, 32, "static", 36)  # every position of the buffer used
    gen, growing = Generator.for_artifact(artifact), Generator.for_artifact(artifact, io_binding=False)
    assert gen.spec.shared and not growing.spec.shared
    assert gen.empty_cache(3, positions=9)["past_key_values.0.key"].shape == (3, 2, 9, 32)
    assert gen.empty_cache(3)["past_key_values.0.key"].shape == (3, 2, 0, 32)  # what artifact.run takes
    assert growing.empty_cache(3, positions=9)["past_key_values.0.key"].shape == (3, 2, 0, 32)
    np.testing.assert_array_equal(artifact.run(gen.prefill_feeds(np.array([[5, 6]]), np.ones((1, 2), np.int64), 0)[0])[
        "logits"], artifact.run(growing.prefill_feeds(np.array([[5, 6]]), np.ones((1, 2), np.int64), 9)[0])["logits"])
    bad = gen.prefill_feeds(np.array([[5, 6]]), np.ones((1, 2), np.int64), 9)[0]
    bad["past_key_values.1.key"] = np.zeros((1, 2, 32, 9), np.float32).transpose(0, 1, 3, 2)  # not contiguous
    with pytest.raises(UserError, match="past_key_values.1.key: a shared cache is fed as one C-contiguous buffer"):
        shared(bad)
    for options in ({}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        assert gen.generate(PROMPTS, 20, eos_token_id=-1, **options).tokens == \
            growing.generate(PROMPTS, 20, eos_token_id=-1, **options).tokens


def test_compare_drives_a_shared_cache_as_the_generator_does(default_artifact, tmp_path):
    """`compare --generate` runs an artifact in its own session (compare's settings); where the
    Generator shares the cache, so does compare's cell: the same tokens, the buffer fed back."""
    from graphopt.compare.decoding import artifact_generator
    from graphopt.compare.variants import BuildContext

    out, _ = default_artifact
    ctx = BuildContext(None, tmp_path, 1)
    run, shared = ctx.artifact_decode_run(out)
    assert shared
    gen = artifact_generator(ctx, out)
    assert gen.spec.shared
    feeds, _ = gen.prefill_feeds(np.array([[5, 17, 3]], np.int64), np.ones((1, 3), np.int64), 8)
    assert feeds["past_key_values.0.key"].shape == (1, 2, 8, 32)
    assert run(feeds)["present.0.key"] is feeds["past_key_values.0.key"]  # written in place
    assert gen.generate(PROMPTS, 10, eos_token_id=-1).tokens == \
        graphopt.load(out).generate(PROMPTS, 10, eos_token_id=-1).tokens


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_decoder_keeps_group_query_attention_and_shares_its_cache(tmp_path, bits):
    """GPT-2-style sites (head 8, no rotary inside the kernel): in fp32 opset-23 Attention (the
    faster kernel for a growing drive); with 4- or 8-bit weights GroupQueryAttention, whose
    cache the Generator shares. Its shared drive decodes as the same artifact recomputing each
    row's whole sequence, at batch 3 with left padding."""
    from graphopt.testing import tiny_hf_model

    tiny_hf_model("gpt2").model.save_pretrained(tmp_path / "hf")
    fp32 = graphopt.optimize(tmp_path / "hf", tmp_path / "fp32")
    graphopt.optimize(fp32.graph, tmp_path / "int4", passes=f"quantize-weights{{bits={bits},block-size=16}}")
    assert _op_counts(tmp_path / "fp32")["Attention"] == 2
    assert _op_counts(tmp_path / "int4")["GroupQueryAttention"] == 2
    artifact = graphopt.load(tmp_path / "int4")
    assert artifact.shares_cache_buffer and not graphopt.load(tmp_path / "fp32").shares_cache_buffer
    growing = artifact.decode_run(io_binding=False)

    def recomputed(ids: list[int]) -> np.ndarray:  # the whole row again, from an empty cache
        feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
        for i in range(2):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 4, 0, 8), np.float32)
        return growing(feeds)["logits"][0, -1]
    check_decode(artifact.decode_run(shared=True), recomputed, PROMPTS, 8, 2, 4, 8, "static", 16)
    # a decoder whose maximum context is unknown is never marked shared: opset-23 Attention stays
    unknown = fp32.graph.copy()
    del unknown.metadata.metadata_props["graphopt.max_positions"]
    graphopt.optimize(unknown, tmp_path / "int4-unknown", passes=f"quantize-weights{{bits={bits},block-size=16}}")
    assert _op_counts(tmp_path / "int4-unknown")["Attention"] == 2
    assert not graphopt.load(tmp_path / "int4-unknown").shares_cache_buffer


def test_a_converted_export_that_reads_its_past_length_keeps_a_growing_cache(tmp_path):
    """An export converted to graphopt's cache whose mask length is a dim of its own ("total",
    not named the sum of the past's and the new tokens') takes its total length from the
    past's shape: a shared buffer would count every one of its positions as filled, so the
    artifact is not marked shared, and generation runs growing, as the recomputed sequence."""
    from graphopt.testing import export_onnx_with_cache, tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model
    (tmp_path / "optimum").mkdir()
    path = export_onnx_with_cache(model, tmp_path / "optimum" / "model.onnx")
    model.config.to_json_file(tmp_path / "optimum" / "config.json")
    graphopt.optimize(path, tmp_path / "out", quantize="int4")
    artifact = graphopt.load(tmp_path / "out")
    assert _op_counts(tmp_path / "out")["GroupQueryAttention"] == 2
    assert not artifact.shares_cache_buffer
    greedy = artifact.generate(PROMPTS, 8, eos_token_id=-1).tokens
    for row, prompt in zip(greedy, PROMPTS):
        assert artifact.generate([prompt], 8, eos_token_id=-1).tokens[0] == row


def test_an_attention_that_is_not_group_query_attention_keeps_a_growing_cache(tmp_path):
    """Where ORT's opset-23 Attention computes the presents (concatenating the past in the graph)
    the past and present cannot be one buffer: no flag, a plain growing drive, and asking
    for a shared one is a clear error."""
    from graphopt.generation import Generator
    from graphopt.testing import tiny_hf_model

    model = tiny_hf_model("gpt2").model  # head size 8, no rotary: opset-23 Attention at the decode sites
    model.save_pretrained(tmp_path / "hf")
    graphopt.optimize(tmp_path / "hf", tmp_path / "out")
    artifact = graphopt.load(tmp_path / "out")
    assert "GroupQueryAttention" not in _op_counts(tmp_path / "out")
    assert "past_present_share_buffer" not in artifact.manifest["generation"] and not artifact.shares_cache_buffer
    assert not Generator.for_artifact(artifact).spec.shared
    with pytest.raises(UserError, match="cannot be shared between past and present"):
        artifact.decode_run(shared=True)
    genai = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is False


@pytest.mark.slow
def test_default_checkpoint_paged_64_decode_steps_match_pytorch(default_model, tmp_path):
    graphopt.optimize(str(DEFAULT_MODEL), tmp_path / "paged", kv_layout="paged")
    artifact = graphopt.load(tmp_path / "paged")
    gen = artifact.manifest["generation"]
    assert (gen["kv_layout"], gen["block_size"]) == ("paged", 16)
    ref = train_reference(default_model)
    check_decode(artifact.run, ref, PROMPTS, 12, 6, 2, 32, "paged", gen["max_positions"], 16)  # batch 3
    check_decode(artifact.run, ref, PROMPTS[:1], 64, 6, 2, 32, "paged", gen["max_positions"], 16)  # batch 1


# --------------------------------------------------------------------------------------
# slice-last-token-logits


def test_slice_last_token_logits_is_the_last_row_of_all_logits(fused):
    from graphopt.interpreter import run

    _, graph = fused("gpt2")
    g = rewrite(graph, "slice-last-token-logits")
    assert g.outputs[0].type.shape == ("batch", 1, 128)
    assert g.metadata.metadata_props["graphopt.logits"] == "last"
    head = g.outputs[0].producer()  # the LM head now reads the last position only
    sliced = head.inputs[0].producer()
    assert sliced.op_type == "Slice" and sliced.outputs[0].type.shape == ("batch", 1, 32)
    feeds = {"input_ids": np.array([[3, 9, 27, 81], [1, 2, 4, 8]], np.int64),
             "attention_mask": np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int64)}
    full, last = run(graph, feeds)["logits"], run(g, feeds)["logits"]
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_slice_refuses_logits_not_from_a_per_position_head():
    from graphopt.passes.kvcache.last_token import SliceLogitsError
    from graphopt.testing import apply_pipeline_text

    before = """graph @g(%x: f32[batch, seq, 4]) -> (f32[batch, seq, 4]) {
  weights {
    @axis: i64[]
  }
  %y = CumSum(%x, @axis)
  return %y
}
"""
    with pytest.raises(SliceLogitsError, match="not computed by a per-position LM head"):
        apply_pipeline_text(before, "slice-last-token-logits", {"axis": np.array(1, np.int64)})


# --------------------------------------------------------------------------------------
# Generation-ready artifacts, the Generator and `graphopt generate`


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The checkpoint's own eager loop with its KV cache (what `graphopt generate CKPT` runs)."""
    import torch

    logits, cache = model.forward_cached(torch.tensor([prompt]), None)
    out = []
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits, cache = model.forward_cached(torch.tensor([[out[-1]]]), cache)
    return out


def test_default_artifact_is_generation_ready(default_artifact):
    out, result = default_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    gen = manifest["generation"]
    assert {k: gen[k] for k in ("kv_layout", "logits", "num_layers", "max_positions", "tokenizer", "eos_token_id")} \
        == {"kv_layout": "BNSH", "logits": "last", "num_layers": 6, "max_positions": 256,
            "tokenizer": "tokenizer.json", "eos_token_id": 0}
    import onnx

    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    assert gen["decode_graph_nodes"] == len(nodes)
    # lean: positions, mask and cache lengths once per step, not per layer; no cache copies
    ops = collections.Counter(n.op_type for n in nodes)
    # the rotary is inside GroupQueryAttention (head 32), so no position ids are computed at all
    assert ops["GroupQueryAttention"] == 6 and ops["RotaryEmbedding"] == 0 and ops["CumSum"] == 0
    # the causal half of the bias is GroupQueryAttention's own causal=1: no Range, no LessOrEqual
    assert ops["Gather"] == 1 and ops["Range"] == ops["LessOrEqual"] == ops["And"] == 0
    # the bias is finite (0 or lowest), so no row is empty and no layer needs a NaN guard: one
    # Where (the padding bias) and no ReduceMax for the whole step
    assert ops["Where"] == 1 and ops["ReduceMax"] == 0
    assert ops["Concat"] == 1 and ops["Flatten"] == ops["Reshape"] == 0  # the Concat: the bias's [seq, 1] rows
    assert (out / "tokenizer.json").read_bytes() == (DEFAULT_MODEL / "tokenizer.json").read_bytes()
    assert result.report["generation"] == {"ready": True, "logits": "last"}
    assert result.report["pipeline"].endswith("rewrite-kv-cache,slice-last-token-logits")
    assert manifest["signature"]["outputs"][0] == {"name": "logits", "dtype": "f32", "shape": ["batch", 1, 4096]}


def test_greedy_generation_gives_the_same_tokens_as_torch(default_artifact, default_model):
    artifact = graphopt.load(default_artifact[0])
    result = artifact.generate(PROMPTS, 32, eos_token_id=-1)  # (no row stops early)
    assert result.steps == 32 and result.decode_tokens == 31 * len(PROMPTS) and result.ttft_s > 0
    for prompt, got in zip(PROMPTS, result.tokens):
        assert got == torch_greedy(default_model, prompt, 32)


def test_sampling_follows_the_seed_and_top_k_1_is_greedy(default_artifact):
    artifact = graphopt.load(default_artifact[0])
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, eos_token_id=-1)
    a, b = artifact.generate([PROMPTS[0]], 12, seed=3, **kw), artifact.generate([PROMPTS[0]], 12, seed=3, **kw)
    others = [artifact.generate([PROMPTS[0]], 12, seed=s, **kw).tokens for s in (4, 5, 6)]
    assert a.tokens == b.tokens and any(o != a.tokens for o in others)
    greedy = artifact.generate([PROMPTS[0]], 12, eos_token_id=-1).tokens
    assert artifact.generate([PROMPTS[0]], 12, temperature=1.0, top_k=1, seed=9, eos_token_id=-1).tokens == greedy


def test_streaming_callback_sees_every_step(default_artifact):
    artifact = graphopt.load(default_artifact[0])
    seen = []
    result = artifact.generate(PROMPTS[:2], 5, eos_token_id=-1, on_tokens=lambda step, ids: seen.append((step, ids)))
    assert [s for s, _ in seen] == list(range(5))
    assert [ids for _, ids in seen] == [list(col) for col in zip(*result.tokens)]


def test_io_binding_keeps_the_cache_in_ort_and_gives_the_same_logits(default_artifact):
    """The bound runner (presents fed back as ORT's own OrtValues, logits into a reused
    buffer) gives bit-for-bit the logits and caches of plain session.run, step by step."""
    import onnxruntime as ort

    from graphopt.generation import Generator

    artifact = graphopt.load(default_artifact[0])
    plain, bound = artifact.decode_run(io_binding=False), artifact.decode_run(io_binding=True)
    assert plain == artifact.run and bound != artifact.run
    assert artifact.manifest["generation"]["kv_layout"] == "BNSH"
    assert artifact.decode_run() == artifact.run  # a growing cache on CPU: binding would only add Python time
    gen = Generator.for_artifact(artifact, io_binding=False)
    ids = np.array([[0] * (6 - len(p)) + p for p in PROMPTS], np.int64)
    mask = (np.arange(6)[None] >= np.array([6 - len(p) for p in PROMPTS])[:, None]).astype(np.int64)
    feeds_a = feeds_b = {"input_ids": ids, "attention_mask": mask, **gen.empty_cache(3)}
    buffers = set()
    for step in range(20):
        a, b = plain(feeds_a), bound(feeds_b)
        assert isinstance(b["present.0.key"], ort.OrtValue)  # not copied out to numpy
        np.testing.assert_array_equal(b["logits"], a["logits"], err_msg=f"step {step}")
        for name in a:
            if name.startswith("present."):
                np.testing.assert_array_equal(b[name].numpy(), a[name], err_msg=f"step {step}, {name}")
        buffers.add(b["logits"].ctypes.data)
        nxt = a["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
        feeds_a = {"input_ids": nxt, "attention_mask": mask, **{f"past_key_values.{n[8:]}": v for n, v in a.items()
                                                                if n.startswith("present.")}}
        feeds_b = {"input_ids": nxt, "attention_mask": mask, **{f"past_key_values.{n[8:]}": v for n, v in b.items()
                                                                if n.startswith("present.")}}
    assert len(buffers) == 1  # one logits buffer, allocated once for [3, 1, vocab]
    assert Generator.for_artifact(artifact, io_binding=True).generate(PROMPTS, 16, eos_token_id=-1).tokens == \
        Generator.for_artifact(artifact, io_binding=False).generate(PROMPTS, 16, eos_token_id=-1).tokens


def test_past_the_maximum_context_is_a_clear_error(default_artifact):
    artifact = graphopt.load(default_artifact[0])
    with pytest.raises(UserError, match="needs 259 positions; the model has 256"):
        artifact.generate([[1] * 250], 10)


@pytest.mark.parametrize("prompts,options,fragment", [
    ([[5000]], {}, r"token id 5000 is outside the model's vocabulary \(\[0, 4096\)\)"),  # TVM's lookup wraps
    ([[3, -1]], {}, "token id -1 is outside"),  # would read the table's last row
    ([[1.5]], {}, "token ids are integers, not 1.5"),
    (5, {}, "prompts: token ids .* not int"),
    (None, {}, "not NoneType"),
    ([[1], 2], {}, "a batch is a list of token-id lists"),
    ([[1]], {"temperature": float("nan")}, "temperature nan: must be a number"),
    ([[1]], {"temperature": float("inf")}, "temperature inf: must be >= 0 and finite"),
    ([[1]], {"seed": -5}, "seed -5: must be an integer >= 0"),
    ([[1]], {"max_new_tokens": 2.5}, "max_new_tokens 2.5: must be a positive integer"),
    ([[1]], {"top_k": 1.5}, "top_k 1.5: must be an integer"),
])
def test_generate_checks_its_prompts_and_options(default_artifact, prompts, options, fragment):
    """Artifact.generate from Python: a bad prompt or option is a UserError naming it, never
    numpy's or ORT's error (and never TVM's silent wrap-around of an id past the vocabulary)."""
    artifact = graphopt.load(default_artifact[0])
    with pytest.raises(UserError, match=fragment):
        artifact.generate(prompts, **options)


def test_generate_takes_token_ids_as_lists_arrays_and_tensors(default_artifact):
    import torch

    artifact = graphopt.load(default_artifact[0])
    want = artifact.generate([[5, 17]], 3).tokens
    assert artifact.generate([5, 17], 3).tokens == want
    assert artifact.generate(np.array([[5, 17]]), np.int64(3), seed=np.int64(3)).tokens == want
    assert artifact.generate(torch.tensor([5, 17]), 3).tokens == want
    assert artifact.generate([np.array([5, 17])], 3, temperature=np.float32(0.0), seed=None).tokens == want


def test_generate_cli_on_the_artifact_matches_the_checkpoint(default_artifact):
    from click.testing import CliRunner

    from graphopt.cli import cli

    args = ["--prompt", "def ", "--max-new-tokens", "24"]
    ort = CliRunner().invoke(cli, ["generate", str(default_artifact[0]), *args])
    torch = CliRunner().invoke(cli, ["generate", str(DEFAULT_MODEL), *args])
    assert ort.exit_code == 0 and torch.exit_code == 0, ort.output + torch.output
    assert ort.stdout == torch.stdout and ort.stdout.startswith("def ") and len(ort.stdout) > 10
    assert "time to first token" in ort.stderr and "tokens/s" in ort.stderr and "onnxruntime" in ort.stderr
    batch = CliRunner().invoke(cli, ["generate", str(default_artifact[0]), "--prompt", "import ", "--prompt",
                                     "class ", "--max-new-tokens", "8"])
    assert batch.exit_code == 0 and "batch 2" in batch.stderr
    lines = batch.stdout.splitlines()
    assert lines[0].startswith("import ") and any(line.startswith("class ") for line in lines)


def test_streamed_text_waits_for_a_split_character_and_drops_one_the_last_token_only_began(
        default_artifact, monkeypatch):
    """A byte-level tokenizer splits "é" (C3 A9) over two tokens: the stream prints nothing
    after the first, "é" after the second, and a character the last token only began is not
    printed as U+FFFD. The new tokens are scripted (the model would not pick these); the first
    is the prompt's last token, which token healing took back."""
    import sys

    from click.testing import CliRunner

    from graphopt import generation, generation_text
    from graphopt.cli import cli

    tok = generation_text.load_tokenizer(default_artifact[0])
    lead, tail = tok.token_to_id("\u00c3"), tok.token_to_id("\u00a9")  # the byte-level alphabet's C3, A9
    assert tok.decode([lead, tail]) == "\u00e9" and tok.decode([lead]).endswith("\ufffd")
    new = [tok.encode("a").ids[-1], lead, tail, tok.token_to_id("x"), lead]
    printed = []  # stdout after each new token

    def scripted(self, ids, max_new_tokens, on_tokens=None, **_):
        for step, t in enumerate(new):
            on_tokens(step, [t])
            sys.stdout.flush()
            printed.append(sys.stdout.buffer.getvalue().decode())
        return generation.GenerationResult([new], 0.01, 0.01, len(new) - 1, len(new))

    monkeypatch.setattr(generation.Generator, "generate", scripted)
    r = CliRunner().invoke(cli, ["generate", str(default_artifact[0]), "--prompt", "a", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert printed == ["a", "a", "a\u00e9", "a\u00e9x", "a\u00e9x"], printed
    assert r.stdout == "a\u00e9x\n", repr(r.stdout)


@pytest.mark.slow
def test_generate_cli_on_a_hugging_face_folder_runs_torch_and_matches_its_artifact(tmp_path):
    """`graphopt generate HF_FOLDER` ran only graphopt.train checkpoints ("no 'model' section");
    a Hugging Face folder now generates on eager PyTorch (transformers' generate), the same
    greedy text as the folder's ORT artifact, and samples with a seed."""
    import shutil

    from click.testing import CliRunner

    from graphopt.cli import cli

    folder, _ = _hf_folder(tmp_path, "Qwen3ForCausalLM", vocab_size=4096, head_dim=16,  # the shipped tokenizer's
                           max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.json", folder / "tokenizer.json")
    args = ["--prompt", "def ", "--max-new-tokens", "12"]
    torch = CliRunner().invoke(cli, ["generate", str(folder), *args])
    assert torch.exit_code == 0, torch.output
    graphopt.optimize(folder, tmp_path / "ort")
    ort = CliRunner().invoke(cli, ["generate", str(tmp_path / "ort"), *args])
    assert ort.exit_code == 0, ort.output
    assert torch.stdout == ort.stdout and torch.stdout.startswith("def ") and len(torch.stdout) > 8
    assert "tokens/s" in torch.stderr and "torch" in torch.stderr
    sampled = [CliRunner().invoke(cli, ["generate", str(folder), *args, "--temperature", "1.5", "--seed", s])
               for s in ("1", "1", "2")]
    assert all(r.exit_code == 0 for r in sampled) and sampled[0].stdout == sampled[1].stdout
    assert sampled[2].stdout != sampled[0].stdout or sampled[0].stdout != torch.stdout


@pytest.mark.parametrize("args, words", [
    (["--backend", "tvm"], "built for onnxruntime, not tvm"),
    (["--max-new-tokens", "0"], "'--max-new-tokens': 0 is not in the range"),
    (["--max-new-tokens", "100000"], "positions; the model has 256"),
])
def test_generate_cli_refusals_are_one_line(default_artifact, args, words):
    from click.testing import CliRunner

    from graphopt.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(default_artifact[0]), "--prompt", "x", *args])
    assert r.exit_code == 2 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert r.stdout == ""  # not even the prompt


def test_generate_cli_checkpoint_on_another_backend_says_optimize_first():
    from click.testing import CliRunner

    from graphopt.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(DEFAULT_MODEL), "--prompt", "x", "--backend", "ort"])
    assert r.exit_code == 2 and "optimize it first" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_hugging_face_folder_becomes_a_generation_ready_artifact(tmp_path):
    import torch

    from graphopt.testing import tiny_hf_model

    model = tiny_hf_model("llama", seed=2).model
    model.save_pretrained(tmp_path / "hf")
    result = graphopt.optimize(tmp_path / "hf", tmp_path / "out")
    gen = result.manifest["generation"]
    assert gen["max_positions"] == 64 and gen["logits"] == "last" and gen["num_layers"] == 2
    got = graphopt.load(tmp_path / "out").generate(PROMPTS, 10, eos_token_id=-1).tokens
    for prompt, row in zip(PROMPTS, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert row == want


def test_logits_all_keeps_every_position_and_no_kv_cache_keeps_the_full_sequence(fused, tmp_path):
    from graphopt.interpreter import run

    _, graph = fused("llama")
    feeds = {"input_ids": np.array([[3, 9, 27, 81, 5]], np.int64), "attention_mask": np.ones((1, 5), np.int64)}
    want = run(graph, feeds)["logits"]
    every = graphopt.optimize(graph, tmp_path / "all", logits="all")
    assert every.manifest["generation"]["logits"] == "all"
    assert every.manifest["signature"]["outputs"][0]["shape"] == ["batch", "seq", 128]
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 8), np.float32) for i in range(2) for k in ("key", "value")}
    got = graphopt.load(tmp_path / "all").run({**feeds, **empty})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    plain = graphopt.optimize(graph, tmp_path / "plain", kv_cache=False)
    assert "generation" not in plain.manifest
    assert [e["name"] for e in plain.manifest["signature"]["inputs"]] == ["input_ids", "attention_mask"]


def test_logits_option_needs_a_decoder_and_the_default_pipeline(fused, tmp_path):
    _, graph = fused("llama")
    with pytest.raises(UserError, match="--logits chooses the end of the default pipeline"):
        graphopt.optimize(graph, None, passes="eliminate-dead-code", logits="all")
    with pytest.raises(UserError, match="--logits applies to decoders"):
        graphopt.optimize(ROOT / "examples" / "tiny_mlp.onnx", None, logits="last")


def test_quantized_decoder_is_generation_ready_with_last_token_logits_and_scores_with_logits_all(tmp_path):
    # --quantize puts graphopt.QuantLinear in the LM head: slicing must still see a per-position
    # head, and `graphopt eval` must score a --logits all artifact (and refuse a last-token one).
    from click.testing import CliRunner

    import graphopt
    from graphopt.cli import cli
    from graphopt.testing import tiny_hf_model

    folder = tmp_path / "hf"
    tiny_hf_model("llama").model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")  # copied beside the artifact: a file of the artifact's own
    r = graphopt.optimize(str(folder), tmp_path / "q", quantize="int8")
    assert r.report["generation"]["logits"] == "last"
    assert any(n.op_type == "QuantLinear" for n in r.graph.nodes)
    logits = next(o for o in graphopt.load(tmp_path / "q").outputs if o["name"] == "logits")
    assert logits["shape"][1] == 1
    # a re-run into the same artifact folder (its tokenizer files are the artifact's own) works
    assert "tokenizer.json" in json.loads((tmp_path / "q" / "manifest.json").read_text())["files"]
    graphopt.optimize(str(folder), tmp_path / "q", quantize="int8")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "q"), "--data", str(folder / "config.json")])
    assert res.exit_code == 2 and "--logits all" in res.output


@pytest.mark.parametrize("layout", ["BNSH", "static", "paged"])
def test_a_generation_ready_artifact_with_every_positions_logits_scores_like_the_full_sequence_one(layout, tmp_path):
    """In every layout (paged: a block table for the prompt; before, eval failed on its
    missing block_table)."""
    from graphopt.accuracy import artifact_logits, perplexity
    from graphopt.testing import VOCAB, tiny_hf_model

    folder = tmp_path / "hf"
    tiny_hf_model("llama").model.save_pretrained(folder)
    graphopt.optimize(str(folder), tmp_path / "kv", logits="all", kv_layout=layout)
    graphopt.optimize(str(folder), tmp_path / "full", kv_cache=False)
    ids = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.int64)
    kv = perplexity(artifact_logits(graphopt.load(tmp_path / "kv")), ids, 32, 4)
    full = perplexity(artifact_logits(graphopt.load(tmp_path / "full")), ids, 32, 4)
    assert kv.tokens == full.tokens and abs(kv.perplexity - full.perplexity) < 1e-4 * full.perplexity


def test_a_training_run_folder_optimizes_to_a_generation_ready_artifact_with_its_tokenizer(tmp_path, monkeypatch):
    """`graphopt optimize RUN` (a run folder: checkpoints/latest names its checkpoint) takes the
    tokenizer and config from that checkpoint, as for the checkpoint itself, and the report
    names that checkpoint by its absolute path: the run may train on, and eval and compare read
    the source from any folder (before: "run", relative to where optimize ran, whose later
    checkpoints compare measured the artifact against)."""
    import json
    import shutil

    from graphopt.compare.reference import load_reference

    run = tmp_path / "run"
    shutil.copytree(DEFAULT_MODEL, run / "checkpoints" / "step_0000007")
    (run / "checkpoints" / "latest").write_text("step_0000007\n")
    monkeypatch.chdir(tmp_path)
    graphopt.optimize("run", "out", progress=None)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (DEFAULT_MODEL / "tokenizer.json").read_bytes()
    assert graphopt.load(tmp_path / "out").generate("def ", 4).texts[0]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == str((run / "checkpoints" / "step_0000007").resolve())
    reference = load_reference(run)  # compare's eager model for a run folder: its latest checkpoint
    assert reference is not None and reference.source == str(run / "checkpoints" / "step_0000007")


def test_run_refuses_a_mask_past_the_context_or_of_the_wrong_length(default_artifact):
    """`Artifact.run` on a growing-cache artifact: an attention_mask past the model's context
    (TVM returned logits for 257 positions of a 256-position model) and one that is not
    past_seq + seq long (ORT and TVM failed in their kernels) are one-line errors."""
    from graphopt.errors import UserError

    art = graphopt.load(default_artifact[0])
    heads, head = art.inputs[2]["shape"][1], art.inputs[2]["shape"][3]
    layers = art.manifest["generation"]["num_layers"]

    def feeds(seq, past, mask):
        out = {"input_ids": np.ones((1, seq), np.int64), "attention_mask": np.ones((1, mask), np.int64)}
        for i in range(layers):
            for kind in ("key", "value"):
                out[f"past_key_values.{i}.{kind}"] = np.zeros((1, heads, past, head), np.float32)
        return out

    assert art.run(feeds(8, 3, 11))["logits"].shape[:2] == (1, 1)
    for mask in (5, 12):
        with pytest.raises(UserError, match=rf"input 'attention_mask' has shape \[1, {mask}\]: its dimension 1 "
                                            r"is past_seq \+ seq = 11 here"):
            art.run(feeds(8, 3, mask))
    limit = art.manifest["generation"]["max_positions"]
    with pytest.raises(UserError, match=f"attention_mask covers {limit + 1} positions; the model has {limit}"):
        art.run(feeds(limit + 1, 0, limit + 1))


def test_an_exporters_dim_names_are_labels_not_sums():
    """Optimum names the mask's axis "past_sequence_length + 1", which prefill (a past of 0, a
    mask of seq) does not satisfy as arithmetic: only rewrite-kv-cache's own "past_seq + seq"
    is checked as a sum."""
    from graphopt.interpreter import check_signature_feeds as check_feeds
    from graphopt.errors import UserError

    def sig(total, past):
        return {"inputs": [{"name": "input_ids", "dtype": "i64", "shape": ["batch", "seq"]},
                           {"name": "attention_mask", "dtype": "i64", "shape": ["batch", total]},
                           {"name": "past", "dtype": "f32", "shape": ["batch", 2, past, 8]}], "outputs": []}

    feeds = {"input_ids": np.ones((1, 6), np.int64), "attention_mask": np.ones((1, 6), np.int64),
             "past": np.zeros((1, 2, 0, 8), np.float32)}
    check_feeds(sig("past_sequence_length + 1", "past_sequence_length"), feeds)
    sums = {"past_seq + seq": ("past_seq", "seq")}
    check_feeds(sig("past_seq + seq", "past_seq"), feeds, sums=sums)
    feeds["past"] = np.zeros((1, 2, 1, 8), np.float32)
    with pytest.raises(UserError, match="its dimension 1 is past_seq \\+ seq = 7 here"):
        check_feeds(sig("past_seq + seq", "past_seq"), feeds, sums=sums)


def test_the_rewrite_names_the_first_output_logits_whatever_it_was_called(fused):
    """An ONNX LM whose output is `lm_logits` (or from_torch's `output`): rewrite-kv-cache renames
    it by design, which the pass manager's check that passes keep their outputs allows it alone."""
    _, graph = fused("llama")
    g = graph.copy()
    g.rename_value(g.outputs[0], "lm_logits")
    out = PassManager("rewrite-kv-cache").run(g)
    assert out.outputs[0].name == "logits" and out.outputs[1].name == "present.0.key"


def test_the_manifest_lists_the_kernels_the_model_runs(default_artifact):
    """A RotaryEmbedding that GroupQueryAttention's rule took in (do_rotary) was listed among
    the kernels (12 on the shipped model, none in model.onnx)."""
    import collections

    import onnx

    out, _ = default_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {k: v for k, v in manifest["lowering"]["kernels"].items() if k.startswith("com.microsoft.")}
    nodes = onnx.load(out / "model.onnx", load_external_data=False).graph.node
    assert listed == dict(collections.Counter(f"{n.domain}.{n.op_type}" for n in nodes if n.domain == "com.microsoft"))
    assert listed["com.microsoft.GroupQueryAttention"] == 6
