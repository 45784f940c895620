"""Generation benchmarks (issue 12), side by side in one run, fp32, batch 1.

    python benchmarks/generation.py --threads 2 --out docs/generation_bench.json
    python benchmarks/generation.py --tiny            # a smoke run at toy sizes (no claims)

Measures, with the machine's read bandwidth from the same run:
1. a decode step with `--cached` (128) tokens in the cache on GPT-2 (the `transformers`
   default config, random weights): graphopt's ORT artifact, and the bound that reading its
   weight bytes once per step sets at the measured bandwidth;
2. prefill at `--cached` tokens on the same model with and without slice-last-token-logits;
3. decode tokens/s of a `--new-tokens` (128) greedy generation on the shipped model with torch
   (the checkpoint's own loop), the ORT artifact and (with --tvm) the TVM artifact.

Not here yet (see docs/generation.md): ORT on a cache-aware export optimized by
`onnxruntime.transformers.optimizer`, and onnxruntime-genai's model builder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second that summing a large float32 array reads (best of `repeats`)."""
    a = np.ones(nbytes // 4, np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"p50_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": repeats}


def weight_bytes(artifact_dir: Path) -> int:
    import onnx

    model = onnx.load(str(artifact_dir / "model.onnx"))
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def gpt2_folder(work: Path, tiny: bool) -> Path:
    import torch
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512) if tiny else tf.GPT2Config()
    torch.manual_seed(0)
    folder = work / "gpt2"
    tf.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder


def decode_step(artifact, cached: int) -> dict:
    """One decode step over a cache of `cached` positions (the same step repeated)."""
    from graphopt.generation import Generator

    gen = Generator.for_artifact(artifact)
    ids = np.arange(cached, dtype=np.int64)[None] % 100 + 1
    prefill = {"input_ids": ids, "attention_mask": np.ones_like(ids), **gen.empty_cache(1)}
    out = artifact.run(prefill)
    step = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, cached + 1), np.int64)}
    for i in range(gen.spec.num_layers):
        step[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        step[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    return {"prefill": prefill, "step": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--tvm", action="store_true", help="also build and run the TVM artifacts")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.cached, args.new_tokens, args.repeats = 16, 8, 3
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import onnxruntime
    import torch

    import graphopt

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "cached": args.cached, "batch": 1, "dtype": "fp32",
                     "versions": {"graphopt": graphopt.__version__, "onnxruntime": onnxruntime.__version__,
                                  "torch": torch.__version__, "python": platform.python_version()},
                     "machine": platform.processor() or platform.machine()}
    bw = read_bandwidth(1 << 24 if args.tiny else 1 << 28)
    results["read_bandwidth_GBps"] = bw / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = gpt2_folder(work, args.tiny)
        last = work / "gpt2_last"
        every = work / "gpt2_all"
        graphopt.optimize(folder, last)
        graphopt.optimize(folder, every, logits="all")
        a_last = graphopt.load(last, threads=args.threads)
        a_all = graphopt.load(every, threads=args.threads)
        feeds = decode_step(a_last, args.cached)
        wb = weight_bytes(last)
        step = timed(lambda: a_last.run(feeds["step"]), args.repeats)
        results["gpt2_decode_step"] = {"graphopt_ort": step, "weight_bytes": wb,
                                       "bandwidth_bound_ms": wb / bw * 1e3,
                                       "ratio_to_bound": step["p50_ms"] / (wb / bw * 1e3)}
        results["gpt2_prefill"] = {
            "slice_last_token_logits": timed(lambda: a_last.run(feeds["prefill"]), args.repeats),
            "all_logits": timed(lambda: a_all.run(feeds["prefill"]), args.repeats)}
        p = results["gpt2_prefill"]
        p["speedup"] = p["all_logits"]["p50_ms"] / p["slice_last_token_logits"]["p50_ms"]

        # the shipped model: a greedy generation on every backend
        prompt = [0, 11, 57, 300, 12]
        table = {}
        from graphopt.train import load_model

        model, _ = load_model(ROOT / "examples" / "default")
        t = time.perf_counter()
        logits, cache = model.forward_cached(torch.tensor([prompt]), None)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            nxt = int(logits[0, -1].argmax())
            logits, cache = model.forward_cached(torch.tensor([[nxt]]), cache)
        table["torch"] = {"ttft_ms": ttft * 1e3, "decode_tokens_per_s": (args.new_tokens - 1) / (time.perf_counter() - t)}
        backends = ["ort"] + (["tvm"] if args.tvm else [])
        for backend in backends:
            out = work / f"default_{backend}"
            graphopt.optimize(str(ROOT / "examples" / "default"), out, backend=backend)
            r = graphopt.load(out, threads=args.threads).generate([prompt], args.new_tokens, eos_token_id=-1)
            table[backend] = {"ttft_ms": r.ttft_s * 1e3, "decode_tokens_per_s": r.decode_tokens_per_s}
        results["default_greedy"] = table
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
