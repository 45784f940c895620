"""Shared test helpers: tolerances, ONNX Runtime runs, and small `transformers` models built
from configs with random weights (nothing is downloaded).

torch and transformers are imported inside the functions that need them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from graphopt.dtypes import TOLERANCES, DType  # noqa: F401  (the one tolerance table, for tests)
from graphopt.builder import Builder, make_node
from graphopt.ir import Graph, TensorType
from graphopt.ops.quant_format import dequantize_blockwise, quantize_stacked
from graphopt.pass_manager import PassManager
from graphopt.text import parse_graph, print_graph


def assert_close(actual: np.ndarray, expected: np.ndarray, *, rtol: float | None = None,
                 atol: float | None = None, what: str = "") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    try:
        dt = DType.from_numpy(actual.dtype)
    except ValueError:
        dt = None
    if dt is not None and dt.is_float:
        r, a = TOLERANCES[dt]
        rtol = r if rtol is None else rtol
        atol = a if atol is None else atol
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


def require_installed(module: str, distribution: str):
    """`module`, imported; the test is skipped when `distribution` is not installed, and
    fails when it is installed but does not import (a broken install must not hide tests)."""
    import importlib
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed (pip install 'graphopt[{module}]')", allow_module_level=True)
    return importlib.import_module(module)


def ort_session(model, *, optimize: bool = False):
    """An ONNX Runtime CPU session; graph optimizations off unless asked for, so ORT runs
    exactly the graph it was given."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_ort(model, feeds: dict[str, np.ndarray], *, optimize: bool = False) -> dict[str, np.ndarray]:
    sess = ort_session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# --------------------------------------------------------------------------------------
# transformers models from small configs

VOCAB = 128
ARCHS = ["gpt2", "llama", "bert"]  # the architectures every foundation check covers
EXPORTERS = ["dynamo", "torchscript"]


def tiny_hf_model(arch: str, *, seed: int = 0, attn_implementation: str = "eager", head_size: int = 8):
    """A small `transformers` model with random weights: gpt2, llama, bert, mistral, qwen2,
    qwen3, phi, phi3, gemma, gpt_neox or opt. Causal LMs return logits, encoders their last hidden state.
    `head_size` (llama, qwen2, qwen3): 8, or wider where a kernel needs it (4 query heads, 2 key/value heads)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common)
        cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=4 * head_size, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=64, **common)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, max_position_embeddings=64, sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(num_hidden_layers=2, hidden_size=4 * head_size, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=64, **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":  # a norm on each head of Q and K before the rotary
        cfg = tf.Qwen3Config(num_hidden_layers=2, hidden_size=4 * head_size, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=head_size, intermediate_size=64, max_position_embeddings=64, **common)
        cls = tf.Qwen3ForCausalLM
    elif arch == "phi":  # Phi-1/2: partial rotary, parallel attention and MLP, biases
        cfg = tf.PhiConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, **common)
        cls = tf.PhiForCausalLM
    elif arch == "opt":  # learned positions computed from the attention mask inside the model
        cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                           max_position_embeddings=64, word_embed_proj_dim=64, **common)
        cls = tf.OPTForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                            bos_token_id=1, **common)
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma":
        cfg = tf.GemmaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, intermediate_size=64, max_position_embeddings=64, **common)
        cls = tf.GemmaForCausalLM
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, **common)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, **common)
        cls = tf.BertModel
    else:
        raise ValueError(f"unknown test architecture {arch!r}")
    cfg._attn_implementation = attn_implementation
    model = cls(cfg).eval()
    # eval() on the wrapper too: the TorchScript exporter restores the wrapper's own mode
    # afterwards, and a wrapper left in training mode would switch dropout on in the model.
    return LMWrapper(model).eval()


def tiny_llama_folder(folder: str | os.PathLike, vocab: int = 4096) -> Path:
    """A Hugging Face folder of a small Llama (hidden 64, 2 layers, GQA, vocab 4096 unless
    given, random weights, seed 0) with the shipped model's tokenizer.json (4096 tokens)
    beside it, for text-fed tests."""
    import shutil

    import torch
    import transformers as tf

    folder = Path(folder)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, max_position_embeddings=64, vocab_size=vocab)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "default" / "tokenizer.json", folder)
    return folder


def _lm_wrapper_class():
    import torch

    class _LMWrapper(torch.nn.Module):
        """(input_ids, attention_mask) -> logits or last hidden state, with no cache."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.is_causal_lm = hasattr(model, "lm_head")

        def forward(self, input_ids, attention_mask):
            if self.is_causal_lm:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return _LMWrapper


def LMWrapper(model):
    return _lm_wrapper_class()(model)


def token_feeds(batch: int, seq: int, *, vocab: int = VOCAB, seed: int = 0, pad: bool = True) -> dict[str, np.ndarray]:
    """`input_ids` below the vocabulary size and a 0/1 `attention_mask` (left padding on the
    first row when `pad`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    if pad and seq > 2:
        mask[0, : seq // 3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def export_onnx(module, path: str | os.PathLike, *, dynamo: bool, batch: int = 2, seq: int = 8) -> Path:
    """Export an (input_ids, attention_mask) module with dynamic batch and seq."""
    import contextlib
    import io
    import warnings

    import torch

    path = Path(path)
    feeds = token_feeds(batch, seq)
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    names = dict(input_names=["input_ids", "attention_mask"], output_names=["output"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=63)
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}, **names)
        else:
            axes = {0: "batch", 1: "seq"}
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=20,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "output": axes}, **names)
    return path


def export_onnx_with_cache(model, path: str | os.PathLike, *, past: int = 4, position_ids: bool = False) -> Path:
    """A Hugging Face decoder (`tiny_hf_model(...).model`) exported by torch.onnx as Optimum
    lays a cached decoder out: inputs input_ids [batch, seq], attention_mask [batch, total]
    and past_key_values.{i}.key|value [batch, kv_heads, past_seq, head]; outputs logits and
    present.{i}.key|value. Positions come from the mask (left padding works); with
    `position_ids`, from an input of that name, as optimum-cli exports them, and the
    dimensions get the names it gives them (batch_size, sequence_length, past_sequence_length,
    "past_sequence_length + sequence_length")."""
    import warnings

    import torch
    from transformers import DynamicCache

    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head = cfg.hidden_size // heads

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *rest):
            positions, pasts = (rest[0], rest[1:]) if position_ids else (None, rest)
            cache = DynamicCache()
            for i in range(layers):
                cache.update(pasts[2 * i], pasts[2 * i + 1], i)
            if positions is None:
                positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             position_ids=positions, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    names = [f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    extra = ["position_ids"] if position_ids else []
    inputs = ["input_ids", "attention_mask"] + extra + [f"past_key_values.{n}" for n in names]
    batch, seq, past_seq, total = (("batch_size", "sequence_length", "past_sequence_length",
                                    "past_sequence_length + sequence_length") if position_ids
                                   else ("batch", "seq", "past_seq", "total"))
    axes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
            **({"position_ids": {0: batch, 1: seq}} if position_ids else {}),
            **{f"past_key_values.{n}": {0: batch, 2: past_seq} for n in names},
            **({"logits": {0: batch, 1: seq}} if position_ids else {}),
            **({f"present.{n}": {0: batch, 2: total} for n in names} if position_ids else {})}
    args = (torch.zeros((2, 3), dtype=torch.int64), torch.ones((2, past + 3), dtype=torch.int64),
            *([torch.arange(past, past + 3).repeat(2, 1)] if position_ids else []),
            *[torch.zeros((2, kv_heads, past, head)) for _ in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(WithCache().eval(), args, str(path), dynamo=False, opset_version=20, input_names=inputs,
                          output_names=["logits"] + [f"present.{n}" for n in names], dynamic_axes=axes)
    return Path(path)


def torch_outputs(module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


# --------------------------------------------------------------------------------------
# Random well-typed graphs (for property-based tests)


def one_node_graph(op: str, inputs, attrs: dict | None = None, *, domain: str = "graphopt", n_out: int = 1,
                   name: str | None = None, node_name: str | None = None, output_names=None, dynamic: bool = True,
                   drop_trailing_empty: bool = False) -> Graph:
    """A graph of one `op` node, for op-level tests and benchmarks. `inputs` are, in order,
    None (an empty optional input) or (name, array, dims, is_constant): a constant becomes an
    initializer, anything else a graph input of the array's type whose shape names the
    symbolic dims in `dims` (None entries keep the array's size; all sizes with dynamic=False).
    The node's outputs (renamed to `output_names` if given) are the graph's outputs; with
    `drop_trailing_empty`, trailing empty inputs are left off (ONNX reads them the same)."""
    g = Graph(name or op)
    vals = []
    for spec in inputs:
        if spec is None:
            vals.append(None)
            continue
        value_name, a, dims, const = spec
        if const:
            vals.append(g.add_initializer(value_name, a))
            continue
        dims = dims or (None,) * a.ndim
        shape = tuple(s if dynamic and s else d for d, s in zip(a.shape, dims))
        vals.append(g.add_input(value_name, TensorType(DType.from_numpy(a.dtype), shape)))
    while drop_trailing_empty and vals and vals[-1] is None:
        vals.pop()
    node = make_node(g, op, vals, domain=domain, attrs=attrs or {}, num_outputs=n_out,
                     name=node_name)
    g.append(node)
    for v, out_name in zip(node.outputs, output_names or ()):
        g.rename_value(v, out_name)
    g.outputs = list(node.outputs)
    return g


def random_graph(seed: int, n_nodes: int = 12, *, cleanup_bait: bool = False):
    """A random, well-typed graph over a symbolic batch dimension: elementwise ops,
    MatMul with weights, Reshape, Transpose, Cast, Shape, Gather, Concat, Unsqueeze and
    Identity, with attributes of several kinds. Deterministic in `seed`.

    With `cleanup_bait`, the graph starts with one instance of what every cleanup pass
    removes (dead code, a duplicate, a constant subexpression, an Identity, a Cast chain,
    a Shape->Gather->Concat->Reshape chain), so each of them has something to do."""
    rng = np.random.default_rng(seed)
    g = Graph(f"random_{seed}")
    width = int(rng.choice([2, 4, 6]))
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", width)))
    b = Builder(g)
    pool = [x]  # float values of shape [batch, width]
    if cleanup_bait:
        scale = b.Add(b.const(np.float32(0.5), "half"), b.const(np.float32(0.25), "quarter"))  # foldable
        y = b.Mul(b.Identity(x), scale)                                 # an identity
        y = b.Cast(b.Cast(y, to=11), to=1)                              # an exact cast chain
        shp = b.Shape(y)
        target = b.Concat(b.Gather(shp, b.const(np.array([0], np.int64), "idx"), axis=0),
                          b.const(np.array([width], np.int64), "w"), axis=0)
        y = b.Reshape(y, target)                                        # a symbolic shape chain
        y2 = b.Add(b.Relu(y), b.Relu(y))                                # a common subexpression
        b.Neg(y2)                                                       # dead code
        pool.append(y2)
    for _ in range(n_nodes if len(pool) > 1 else max(n_nodes, 1)):
        a = pool[int(rng.integers(len(pool)))]
        c = pool[int(rng.integers(len(pool)))]
        kind = int(rng.integers(11))
        if kind == 0:
            y = b.op(str(rng.choice(["Add", "Sub", "Mul", "Max", "Min"])), a, c)
        elif kind == 1:
            y = b.op(str(rng.choice(["Relu", "Neg", "Tanh", "Sigmoid", "Abs", "Identity"])), a)
        elif kind == 2:
            w = b.const((rng.standard_normal((width, width)) * 0.5).astype(np.float32), "w")
            y = b.MatMul(a, w)
        elif kind == 3:  # Reshape through a flattened view and back (with -1 and 0)
            flat = b.Reshape(a, b.const(np.array([0, -1, 1], np.int64), "shape"))
            y = b.Reshape(flat, b.const(np.array([-1, width], np.int64), "shape"))
        elif kind == 4:  # a transpose pair
            u = b.Unsqueeze(a, b.const(np.array([2], np.int64), "axes"))
            t = b.Transpose(u, perm=[2, 0, 1])
            y = b.Squeeze(b.Transpose(t, perm=[1, 2, 0]), b.const(np.array([2], np.int64), "axes"))
        elif kind == 5:  # cast round trip through f64 (exact) or a redundant cast
            y = b.Cast(b.Cast(a, to=11), to=1) if rng.random() < 0.5 else b.Cast(a, to=1)
        elif kind == 6:  # Shape -> Gather -> Concat -> Reshape (symbolic batch)
            shp = b.Shape(a)
            bdim = b.Gather(shp, b.const(np.array([0], np.int64), "idx"), axis=0)
            target = b.Concat(bdim, b.const(np.array([width], np.int64), "w"), axis=0)
            y = b.Reshape(a, target)
        elif kind == 7:
            y = b.Softmax(a, axis=int(rng.choice([-1, 1])))
        elif kind == 8:
            lo, hi = sorted(rng.standard_normal(2).astype(np.float32))
            y = b.Clip(a, b.const(np.array(lo, np.float32), "lo"), b.const(np.array(hi, np.float32), "hi"))
        elif kind == 9:
            halves = b.Split(a, axis=1, num_outputs=2)
            y = b.Concat(halves[1], halves[0], axis=1)
        else:
            y = b.LeakyRelu(a, alpha=float(np.float32(rng.uniform(0.01, 0.3))))
        pool.append(y)
    outs = [pool[-1]] + ([pool[int(rng.integers(1, len(pool)))]] if rng.random() < 0.5 else [])
    seen = []
    for v in outs:
        if v not in seen:
            seen.append(v)
    g.outputs = seen
    return g


FUSION_MOTIFS = ("gelu-erf", "gelu-tanh", "silu", "layer-norm", "rms-norm", "linear", "linear-relu", "skip-rms-norm")
# Which motif each fusion pass (run after the ones before it in the default order) must fuse.
FUSION_FIRES = {"fuse-activations": {"gelu-erf", "gelu-tanh", "silu"}, "fuse-layer-norm": {"layer-norm"},
                "fuse-rms-norm": {"rms-norm", "skip-rms-norm"}, "fuse-linear": {"linear", "linear-relu"},
                "fuse-skip-norm": {"skip-rms-norm"}}


def fusion_motif(b, x, kind: str, rng):
    """One decomposed subgraph of the kind exporters emit, written in one of several
    equivalent spellings chosen by `rng` (operand order, x/sqrt(2) vs x*0.7071..., Div vs
    Mul by Reciprocal): what a fusion pass must recognise whatever the spelling."""
    width = x.type.shape[-1]
    f32 = np.float32

    def c(value, name):
        return b.const(np.asarray(value, f32), name)

    def mul(a, z):
        return b.Mul(a, z) if rng.random() < 0.5 else b.Mul(z, a)

    def add(a, z):
        return b.Add(a, z) if rng.random() < 0.5 else b.Add(z, a)

    if kind == "gelu-erf":
        inner = b.Div(x, c(np.sqrt(2.0), "sqrt2")) if rng.random() < 0.5 else mul(x, c(1 / np.sqrt(2.0), "inv_sqrt2"))
        one_plus = add(b.Erf(inner), c(1.0, "one"))
        return mul(mul(x, c(0.5, "half")), one_plus) if rng.random() < 0.5 else mul(x, mul(one_plus, c(0.5, "half")))
    if kind == "gelu-tanh":
        cube = b.Pow(x, c(3.0, "three")) if rng.random() < 0.5 else b.Mul(x, b.Mul(x, x))
        inner = mul(add(x, mul(cube, c(0.044715, "k"))), c(np.sqrt(2 / np.pi), "sqrt_2_pi"))
        return mul(mul(x, c(0.5, "half")), add(b.Tanh(inner), c(1.0, "one")))
    if kind == "silu":
        return mul(x, b.Sigmoid(x))
    if kind in ("layer-norm", "rms-norm", "skip-rms-norm"):
        axes = b.const(np.array([-1], np.int64), "axes")
        if kind == "skip-rms-norm":  # a residual Add feeding the norm
            x = add(x, b.Tanh(x))
        centered = b.Sub(x, b.ReduceMean(x, axes, keepdims=1)) if kind == "layer-norm" else x
        var = b.ReduceMean(b.Pow(centered, c(2.0, "two")) if rng.random() < 0.5 else b.Mul(centered, centered),
                           axes, keepdims=1)
        std = b.Sqrt(add(var, c(1e-5, "eps")))
        normed = b.Div(centered, std) if rng.random() < 0.5 else b.Mul(centered, b.Reciprocal(std))
        scaled = mul(normed, c(rng.uniform(0.5, 1.5, width), "gamma"))
        return add(scaled, c(rng.standard_normal(width) * 0.1, "beta")) if kind == "layer-norm" else scaled
    if kind in ("linear", "linear-relu"):
        y = add(b.MatMul(x, c(rng.standard_normal((width, width)) * 0.5, "w")), c(rng.standard_normal(width), "bias"))
        return b.Relu(y) if kind == "linear-relu" else y
    raise ValueError(f"unknown fusion motif {kind!r}")


def random_fusion_graph(seed: int, n_nodes: int = 6):
    """`random_graph`'s random ops with one instance of every fusion motif woven in, each
    fed by what came before: a graph every fusion pass has something to do in."""
    rng = np.random.default_rng(seed)
    g = Graph(f"random_fusion_{seed}")
    width = int(rng.choice([4, 8]))
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", width)))
    b = Builder(g)
    y = x
    outs = []
    for kind in rng.permutation(FUSION_MOTIFS):
        # A projection between motifs, as in a real model (an elementwise op right after an
        # activation would be part of its elementwise region), then random elementwise glue.
        y = b.MatMul(y, b.const((rng.standard_normal((width, width)) * 0.5).astype(np.float32), "proj"))
        for _ in range(int(rng.integers(0, n_nodes // 2 + 1))):
            y = b.op(str(rng.choice(["Neg", "Abs", "Identity", "Tanh"])), y)
        y = fusion_motif(b, y, str(kind), rng)
        if rng.random() < 0.3:
            outs.append(y)
    g.outputs = [y] + [v for v in outs if v is not y]
    return g


def apply_pipeline_text(before: str, pipeline: str, weights: dict | None = None, *, check: bool = True):
    """Golden-test helper: parse `before`, run `pipeline` (verifying, and checking results on
    sample inputs when `check`), return (graph, printed text without the header)."""
    g = parse_graph(before, weights=weights or {})
    pm = PassManager(pipeline, check_numerics=check)
    out = pm.run(g)
    return out, print_graph(out, header=False), pm.records


def quant_moe_inputs(rng, *, experts=4, hidden=64, inner=32, bits=4, block=32, symmetric=False, k=2, lead=(6,)):
    """Random inputs of graphopt.QuantMoE (tests): (X, index -- k distinct experts a token --,
    weights, [up_packed, up_scales, down_packed, down_scales, then the zero points unless
    symmetric] as QuantLinear holds them, [up, down] dequantized to float)."""
    tokens = int(np.prod(lead))
    x = rng.uniform(-2, 2, lead + (hidden,)).astype(np.float32)
    index = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).reshape(lead + (k,)).astype(np.int64)
    weights = rng.uniform(0.1, 0.6, lead + (k,)).astype(np.float32)
    parts, zps, floats = [], [], []
    for shape in ((experts, 2 * inner, hidden), (experts, hidden, inner)):
        packed, scales, zp = quantize_stacked(rng.uniform(-0.5, 0.5, shape).astype(np.float32), bits, block, symmetric)
        parts += [packed, scales]
        zps += [] if zp is None else [zp]
        floats.append(np.stack([dequantize_blockwise(packed[e], scales[e], None if zp is None else zp[e], bits, block,
                                                     shape[2]) for e in range(experts)]))
    return x, index, weights, parts + zps, floats
