"""End-to-end latency: PyTorch eager vs ONNX Runtime on the exported file vs ORT's own
transformer optimizer vs the graphopt artifact, side by side in one run.

    python benchmarks/ort_end_to_end.py                 # writes BENCHMARKS.md
    python benchmarks/ort_end_to_end.py --quick         # smaller, for a smoke test

Models are built from configs with random weights (GPT-2, Llama, BERT shapes), exported
with the dynamo exporter, and timed at several batch x sequence shapes with left padding.
Each variant's p50 over the same inputs is reported with its ratio to ORT on the exported
file (higher is faster). Every variant is checked against PyTorch before it is timed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Idle OpenMP threads of PyTorch must not spin while ORT is timed (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build(arch: str, size: str):
    import torch
    import transformers as tf

    from graphopt.testing import LMWrapper

    torch.manual_seed(0)
    layers, hidden, heads = {"small": (4, 256, 4), "base": (6, 768, 12)}[size]
    vocab = 2048
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024, vocab_size=vocab)
        cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 8 // 3,
                             max_position_embeddings=1024, vocab_size=vocab)
        cls = tf.LlamaForCausalLM
    else:
        cfg = tf.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            intermediate_size=hidden * 4, max_position_embeddings=1024, vocab_size=vocab)
        cls = tf.BertModel
    cfg._attn_implementation = "eager"
    return LMWrapper(cls(cfg).eval()).eval(), vocab, cfg


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def ort_session(path, threads: int, level: str = "all"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_transformers_optimizer(path: Path, arch: str, cfg, out: Path) -> str | None:
    """ORT's own optimizer, as users run it; returns an error string when it fails."""
    try:
        from onnxruntime.transformers import optimizer

        heads = getattr(cfg, "n_head", None) or cfg.num_attention_heads
        hidden = getattr(cfg, "n_embd", None) or cfg.hidden_size
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            m = optimizer.optimize_model(str(path), model_type={"llama": "gpt2"}.get(arch, arch), num_heads=heads,
                                         hidden_size=hidden, opt_level=1)
            m.save_model_to_file(str(out))
        return None
    except Exception as e:  # it does fail on some exports; that is part of the comparison
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, few repeats")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import onnxruntime as ort
    import torch

    import graphopt
    from graphopt.testing import export_onnx, token_feeds

    size = "small" if args.quick else "base"
    shapes = [(1, 32), (4, 128)] if args.quick else [(1, 32), (1, 256), (4, 128)]
    repeats = 5 if args.quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch in ("gpt2", "llama", "bert"):
            module, vocab, cfg = build(arch, size)
            path = export_onnx(module, tmp / f"{arch}.onnx", dynamo=True)
            art = tmp / f"{arch}_graphopt"
            t0 = time.perf_counter()
            graphopt.optimize(path, art)
            opt_seconds = time.perf_counter() - t0
            ortopt = tmp / f"{arch}_ortopt.onnx"
            ortopt_error = ort_transformers_optimizer(path, arch, cfg, ortopt)
            for threads in args.threads:
                torch.set_num_threads(threads)
                # One runtime alive at a time: an idle ORT session's spinning threads would
                # steal the cores from the one being timed.
                variants = {"ORT (exported file)": lambda: ort_session(path, threads)}
                if ortopt_error is None:
                    variants["ORT transformers optimizer"] = lambda: ort_session(ortopt, threads)
                variants["graphopt"] = lambda: graphopt.load(art, threads=threads)
                for batch, seq in shapes:
                    feeds = token_feeds(batch, seq, vocab=vocab)
                    tin = {k: torch.from_numpy(v) for k, v in feeds.items()}
                    with torch.no_grad():
                        want = module(tin["input_ids"], tin["attention_mask"]).numpy()
                    real = feeds["attention_mask"].astype(bool)
                    results = {}
                    with torch.no_grad():
                        results["PyTorch eager"] = timeit(lambda: module(tin["input_ids"], tin["attention_mask"]), repeats)
                    for name, make in variants.items():
                        runner = make()
                        run = (lambda r=runner: r.run(feeds)) if name == "graphopt" else (lambda r=runner: r.run(None, feeds))
                        got = run()
                        got = next(iter(got.values())) if isinstance(got, dict) else got[0]
                        err = float(np.abs(got[real] - want[real]).max())
                        if name == "graphopt":
                            assert err < 1e-3, f"graphopt artifact differs from PyTorch by {err}"
                        results[name] = timeit(run, repeats) if err < 1e-3 else None
                        del runner
                        gc.collect()
                    rows.append((arch, threads, batch, seq, results, ortopt_error, opt_seconds))
                    base = results["ORT (exported file)"]
                    print(f"{arch:5} threads={threads} {batch}x{seq}: " + ", ".join(
                        f"{k} {v:.2f} ms ({base / v:.2f}x)" if v else f"{k} n/a" for k, v in results.items()),
                        flush=True)

    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/ort_end_to_end.py` (numbers below are from one run; rerun to",
        "check them on your machine). Latency is the median of {} runs after warm-up; the ratio is".format(repeats),
        "against ONNX Runtime on the exported file with all of ORT's own graph optimizations on",
        "(higher is faster). Inputs are left-padded token batches; every variant is checked",
        "against PyTorch before it is timed. One runtime is alive at a time (idle ORT threads spin),",
        "and OpenMP threads wait passively.",
        "",
        f"- Models: {size} configs with random weights ({'4 layers, 256 wide, 4 heads' if size == 'small' else '6 layers, 768 wide, 12 heads'}; "
        "Llama with grouped-query attention), dynamo export at opset 20, fp32, CPU.",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"graphopt {graphopt.__version__}; {platform.machine()} with {__import__('os').cpu_count()} cores.",
        "",
        "| model | threads | batch x seq | PyTorch eager | ORT (exported file) | ORT transformers optimizer | graphopt |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = {}
    for arch, threads, batch, seq, res, ortopt_error, opt_seconds in rows:
        base = res["ORT (exported file)"]

        def cell(k):
            v = res.get(k)
            return "fails" if v is None else f"{v:.2f} ms ({base / v:.2f}x)"
        ortopt_cell = "fails" if ortopt_error else cell("ORT transformers optimizer")
        lines.append(f"| {arch} | {threads} | {batch} x {seq} | {cell('PyTorch eager')} | {base:.2f} ms (1.00x) | "
                     f"{ortopt_cell} | {cell('graphopt')} |")
        if ortopt_error:
            notes[arch] = ortopt_error
        notes.setdefault(f"{arch}-time", f"graphopt optimize took {opt_seconds:.1f} s")
    lines.append("")
    for k, v in notes.items():
        lines.append(f"- {k.removesuffix('-time')}: {v}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
