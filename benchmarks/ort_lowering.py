"""Side-by-side timings of the ORT lowering's choices, for docs/ort_lowering.md.

    python benchmarks/ort_lowering.py [--threads 1,2] [--quick] [--only models] [--json OUT]

Each op row is one graphopt op site (one-node graph) lowered several ways: the kernel the
lowering picks, the other kernels it could pick, and the decomposition into core ops; each
model row a whole transformers model (graphopt's default recipe) lowered with each choice
forced (ratios there are against the default lowering). Every
variant is checked against the reference interpreter before it is timed, and all variants
of a row run interleaved in the same process (rounds of repetitions; the table shows the
best round's median), so the ratios hold even on a busy machine. ORT runs with its default
graph optimizations (ORT_ENABLE_ALL), as users run it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from graphopt.testing import one_node_graph
from graphopt.ir import Graph

F32_MIN = np.finfo(np.float32).min


def one_node(op: str, inputs: list, attrs: dict, n_out: int = 1) -> Graph:
    """inputs: (name, array, dims, is_constant); dims name the symbolic dimensions."""
    return one_node_graph(op, inputs, attrs, n_out=n_out)


def hf_mask(b: int, s: int) -> np.ndarray:
    """transformers' additive mask: causal plus left padding (a third of row 0)."""
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    m = np.where(j > i, F32_MIN, 0).astype(np.float32)[None, None].repeat(b, 0)
    m[0, ..., : s // 3] = F32_MIN
    return m


def attention_site(b: int, s: int, *, heads=12, kv_heads=12, head=64, mask=True, causal=False, rank=3):
    """(one-node graph, feeds) for an attention site of transformers' shape."""
    rng = np.random.default_rng(0)
    if rank == 3:
        q = rng.standard_normal((b, s, heads * head)).astype(np.float32)
        kv = [rng.standard_normal((b, s, kv_heads * head)).astype(np.float32) for _ in range(2)]
        dims = ("batch", "seq", None)
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
    else:
        q = rng.standard_normal((b, heads, s, head)).astype(np.float32)
        kv = [rng.standard_normal((b, kv_heads, s, head)).astype(np.float32) for _ in range(2)]
        dims = ("batch", None, "seq", None)
        attrs = {}
    inputs = [("Q", q, dims, False), ("K", kv[0], dims, False), ("V", kv[1], dims, False)]
    if mask:
        inputs.append(("attn_mask", hf_mask(b, s), ("batch", None, "seq", "seq"), False))
    if causal:
        attrs["causal"] = 1
    return one_node("Attention", inputs, attrs), {name: a for name, a, _, _ in inputs}


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def variants_for(g: Graph, names: list[str]) -> dict:
    """name -> ONNX model; names: kernel (the default lowering), gqa, mha, onnx (opset-23
    Attention), decompose (every graphopt op decomposed)."""
    from graphopt.backends.onnxruntime import lower
    from graphopt.backends.onnxruntime.lowering import LoweringReport
    from graphopt.onnx_io import to_onnx_model

    out = {}
    for name in names:
        if name == "decompose":
            from graphopt.lowering import decompose_graphopt_ops

            d = g.copy()
            decompose_graphopt_ops(d)
            out[name] = to_onnx_model(d)
            continue
        report = LoweringReport()
        lowered = lower(g, "cpu", report, {"attention_kernel": "auto" if name in ("auto", "kernel") else name})
        if name in ("gqa", "mha") and not report.kernels:
            continue  # that kernel does not run this site
        out[name] = to_onnx_model(lowered)
    return out


def time_row(g: Graph, feeds: dict, names: list[str], threads: int, budget_s: float = 2.0, rounds: int = 3) -> dict:
    """Best-round median milliseconds per variant (checked against the reference first)."""
    from graphopt.interpreter import run

    want = list(run(g, feeds).values())[0]
    sessions = {}
    for name, model in variants_for(g, names).items():
        sess = _session(model, threads)
        got = sess.run(None, feeds)[0]
        err = float(np.abs(got - want).max())
        if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
            raise AssertionError(f"{name}: max error {err} against the reference")
        sessions[name] = sess
    return _time_sessions(sessions, feeds, rounds, budget_s, max_reps=200)


def attention_rows(quick: bool):
    shapes = [(1, 8), (4, 8), (1, 128), (4, 128), (1, 512)] + ([] if quick else [(4, 512)])
    for b, s in shapes:
        for label, kw in (("3-D, hf mask", dict(mask=True)), ("3-D, causal=1", dict(mask=False, causal=True)),
                          ("4-D, hf mask", dict(mask=True, rank=4)),
                          ("3-D GQA 32/8, hf mask", dict(mask=True, heads=32, kv_heads=8))):
            if quick and label.startswith("4-D") and s > 128:
                continue
            g, feeds = attention_site(b, s, **kw)
            yield f"Attention {label}, B={b} S={s}", g, feeds, ["gqa", "mha", "decompose", "onnx"]


def other_rows(quick: bool):
    rng = np.random.default_rng(2)
    d, ff = 768, 3072
    for b, s in ((1, 128), (4, 128)):
        x = ("X", rng.standard_normal((b, s, d)).astype(np.float32), ("batch", "seq", None), False)
        skip = ("skip", rng.standard_normal((b, s, d)).astype(np.float32), ("batch", "seq", None), False)
        vec = lambda name: (name, rng.standard_normal(d).astype(np.float32), (None,), True)  # noqa: E731
        g = one_node("SkipNorm", [x, skip, vec("gamma"), vec("beta"), vec("bias")], {"norm": "layer"}, 2)
        yield (f"SkipNorm layer (+beta, bias, sum), B={b} S={s} D={d}", g, {"X": x[1], "skip": skip[1]},
               ["kernel", "decompose"])
        g = one_node("SkipNorm", [x, skip, vec("gamma")], {"norm": "rms"}, 2)
        yield f"SkipNorm rms (+sum), B={b} S={s} D={d}", g, {"X": x[1], "skip": skip[1]}, ["kernel", "decompose"]
        g = one_node("RMSNorm", [x, vec("scale")], {"epsilon": 1e-6})
        yield f"RMSNorm, B={b} S={s} D={d}", g, {"X": x[1]}, ["kernel", "decompose"]
        w = ("W", (rng.standard_normal((d, ff)) * 0.02).astype(np.float32), (None, None), True)
        bias = ("B", rng.standard_normal(ff).astype(np.float32), (None,), True)
        for act in ("gelu", "gelu_tanh"):
            g = one_node("Linear", [x, w, bias], {"activation": act})
            yield f"Linear {act} + bias, B={b} S={s} {d}x{ff}", g, {"X": x[1]}, ["kernel", "decompose"]
        wt = ("W", np.ascontiguousarray(w[1].T), (None, None), False)
        g = one_node("Linear", [x, wt], {"trans_w": 1})
        yield f"Linear trans_w (weight an input: tied), B={b} S={s} {d}x{ff}", g, \
            {"X": x[1], "W": wt[1]}, ["kernel", "decompose"]
        heads, head = 12, 64
        q = ("input", rng.standard_normal((b, heads, s, head)).astype(np.float32), ("batch", None, "seq", None), False)
        angles = rng.uniform(0, 6.3, (b, s, head // 2))
        cos = ("cos_cache", np.cos(angles).astype(np.float32), ("batch", "seq", None), False)
        sin = ("sin_cache", np.sin(angles).astype(np.float32), ("batch", "seq", None), False)
        g = one_node("RotaryEmbedding", [q, cos, sin], {})
        yield f"RotaryEmbedding BNSH, per-batch caches, B={b} S={s} 12x64", g, \
            {"input": q[1], "cos_cache": cos[1], "sin_cache": sin[1]}, ["kernel", "decompose"]


def model_rows(quick: bool):
    """Whole transformers models (random weights, 2 layers, 768 wide) through graphopt's
    default recipe, lowered each way; feeds left-pad row 0 as batched prompts do."""
    import contextlib
    import io
    import tempfile
    import warnings

    import torch
    import transformers as tf

    from graphopt.driver import optimize
    from graphopt.onnx_io import load_onnx
    from graphopt.testing import LMWrapper, token_feeds

    configs = {
        "gpt2 12x64": tf.GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=512),
        "llama GQA 12/4x64": tf.LlamaConfig(num_hidden_layers=2, hidden_size=768, num_attention_heads=12,
                                             num_key_value_heads=4, intermediate_size=2048,
                                             max_position_embeddings=1024, vocab_size=512),
    }
    variants = {"auto (GQA, split norms)": {}, "mha": {"attention_kernel": "mha"},
                "onnx opset-23 Attention": {"attention_kernel": "onnx"},
                "attention decomposed": {"attention_kernel": "decompose"},
                "fused Skip*Norm kernels": {"skip_norm": "fused"}}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        cfg._attn_implementation = "eager"
        cls = tf.GPT2LMHeadModel if name.startswith("gpt2") else tf.LlamaForCausalLM
        module = LMWrapper(cls(cfg).eval()).eval()
        feeds = token_feeds(2, 8, vocab=512)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            b, sq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=1024)
            args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
            torch.onnx.export(module, args, f"{tmp}/m.onnx", dynamo=True, external_data=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"],
                              dynamic_shapes={"input_ids": {0: b, 1: sq}, "attention_mask": {0: b, 1: sq}})
            graph = optimize(load_onnx(f"{tmp}/m.onnx")).graph
        for bsz, seq in [(1, 8), (4, 8), (1, 128), (4, 128), (1, 512)] + ([] if quick else [(4, 512)]):
            yield f"{name}, B={bsz} S={seq}", graph, token_feeds(bsz, seq, vocab=512), variants


def time_model(graph, feeds: dict, variants: dict, threads: int, budget_s: float = 3.0, rounds: int = 3) -> dict:
    import onnxruntime as ort

    from graphopt.backends.onnxruntime import lower, session_options_for
    from graphopt.onnx_io import to_onnx_model

    sessions, first = {}, None
    for name, options in variants.items():
        lowered = lower(graph, "cpu", None, options)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(to_onnx_model(lowered).SerializeToString(), so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=session_options_for(lowered, "cpu").get("disabled_optimizers"))
        out = sess.run(None, feeds)[0]
        if first is None:
            first = out
        elif not np.allclose(out, first, rtol=1e-4, atol=1e-4):
            raise AssertionError(f"{name}: results differ from the first variant's")
        sessions[name] = sess
    return _time_sessions(sessions, feeds, rounds, budget_s, max_reps=100)



def _time_sessions(sessions: dict, feeds: dict, rounds: int, budget_s: float, max_reps: int) -> dict[str, float]:
    """Best-of-rounds median latency (ms) per session, interleaving the sessions each round
    so that drift in machine load hits all of them alike."""
    t0 = time.perf_counter()
    next(iter(sessions.values())).run(None, feeds)
    reps = max(3, min(max_reps, int(budget_s / rounds / len(sessions) / max(time.perf_counter() - t0, 1e-5))))
    best = {name: float("inf") for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            sess.run(None, feeds)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                sess.run(None, feeds)
                ts.append(time.perf_counter() - t)
            best[name] = min(best[name], float(np.median(ts)) * 1e3)
    return best


def main(argv=None) -> None:
    import onnx
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["attention", "other", "models"])
    p.add_argument("--json")
    args = p.parse_args(argv)
    header = {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "processor": platform.processor()}
    print("# " + ", ".join(f"{k} {v}" for k, v in header.items()))
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        rows = []
        if args.only in (None, "attention"):
            for title, g, feeds, names in attention_rows(args.quick):
                rows.append((title, time_row(g, feeds, names, threads)))
                print(_fmt(threads, *rows[-1]), flush=True)
        if args.only in (None, "other"):
            for title, g, feeds, names in other_rows(args.quick):
                rows.append((title, time_row(g, feeds, names, threads)))
                print(_fmt(threads, *rows[-1]), flush=True)
        if args.only in (None, "models"):
            for title, graph, feeds, variants in model_rows(args.quick):
                rows.append((title, time_model(graph, feeds, variants, threads)))
                print(_fmt(threads, *rows[-1], base_name="auto (GQA, split norms)"), flush=True)
        results.append({"threads": threads, "rows": [{"site": t, "ms": r} for t, r in rows]})
    if args.json:
        from graphopt.fileutil import write_text_atomic

        write_text_atomic(args.json, json.dumps({"versions": header, "results": results}, indent=2))


def _fmt(threads: int, title: str, ms: dict, base_name: str = "decompose") -> str:
    base = ms.get(base_name)
    cells = "  ".join(f"{k}={v:.3f}ms" + (f" ({base / v:.2f}x)" if base and k != base_name else "")
                      for k, v in ms.items())
    return f"t={threads}  {title:58s} {cells}"


if __name__ == "__main__":
    main()
