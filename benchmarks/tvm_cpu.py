"""TVM (untuned, graphopt's default CPU schedules) against ONNX Runtime, side by side in one
run: for each model the same optimized graph on both backends, from the generation-ready
artifacts (KV cache in and out) that `graphopt.optimize` wrote, the same inputs and threads.

    python benchmarks/tvm_cpu.py [--models default,llama512] [--threads 2]
                                 [--prefill 1x128,4x128] [--decode 1x128] [--out FILE]

Models: `default` is the shipped checkpoint (examples/default); `llama512` is a Llama-style
graphopt.train model with random weights (hidden 512, 8 layers, 8 heads, 2 key/value heads,
intermediate 1408, vocab 8192), written to a temporary checkpoint; any other entry is a path
to a model. Workloads: a prefill of batch x tokens (empty cache), and a decode step of one
token per row after batch x cached tokens. Prints a table and writes JSON: threads, the
cores the process may use, versions, per-workload median latencies, their ratio, and each
backend's CPU time over wall time (2.0 at 2 threads: both cores busy throughout; well under
the thread count means a runtime left a core idle or the machine was busy with other work).

A short run (about a minute): `--models default --prefill 1x128 --decode 1x128`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, *, warmup: int = 2, min_runs: int = 5, min_seconds: float = 1.0) -> float:
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
        if len(times) >= 200:
            break
    return statistics.median(times)


LLAMA512 = dict(vocab_size=8192, max_seq_len=512, dim=512, num_layers=8, num_heads=8, num_kv_heads=2,
                mlp_hidden=1408)


def interleaved_ratio(a, b, rounds: int, block: int = 3, settle_s: float = 0.05) -> dict:
    """b's time over a's, per round: a block of `block` calls of each (after one untimed call,
    a `settle_s` pause before each block, the order alternating round by round), the ratio of
    the blocks' medians; the median and quartiles over `rounds`. Both runtimes meet the same
    minute of the machine, so a slow spell (this machine's speed moves from minute to minute)
    moves both sides of a ratio, not one."""
    ratios = []
    for r in range(rounds):
        medians = {}
        for name, fn in ((("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a))):
            time.sleep(settle_s)
            fn()
            times = []
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            medians[name] = statistics.median(times)
        ratios.append(medians["b"] / medians["a"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": round(statistics.median(ratios), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
            "rounds": rounds, "block": block}


def cpu_over_wall(fn, runs: int) -> float:
    """Process CPU time over wall time across `runs` calls (2.0: both cores busy throughout)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def llama512_checkpoint(folder: Path) -> Path:
    """A random-weight Llama-style checkpoint of the issue's size, through train's own API."""
    import torch

    from graphopt.train.checkpoint import save_checkpoint
    from graphopt.train.models import LlamaConfig, build_model, config_to_dict

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA512)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The shipped model's tokenizer (4096 tokens, below this vocabulary): the generation-ready
    # artifact reads its end-of-text id; the benchmark feeds token ids directly.
    tokenizer = ROOT / "examples" / "default" / "tokenizer.json"
    return save_checkpoint(folder, build_model(cfg).eval(), {"model": config_to_dict(cfg)}, tokenizer)


def _display(model: str) -> str:
    path = Path(model).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else model


def workload_feeds(spec, names, batch: int, past: int, seq: int) -> dict[str, np.ndarray]:
    """A forward of a generation-ready artifact: `seq` new tokens after `past` cached ones
    (past 0: a prefill; seq 1: a decode step)."""
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 4096, (batch, seq)).astype(np.int64),  # below every model's vocabulary
             "attention_mask": np.ones((batch, past + seq), spec.mask_dtype)}
    for i in range(spec.num_layers):
        for kind, name in enumerate(("key", "value")):
            feeds[f"past_key_values.{i}.{name}"] = rng.standard_normal(spec.shape(batch, i, kind, past)).astype(spec.dtype)
    return {n: feeds[n] for n in names}


def bench_model(model: str, label: str, workloads, threads: int, work: Path, rounds: int = 15) -> dict:
    import graphopt
    from graphopt.generation import CacheSpec

    t = time.perf_counter()
    ort_result = graphopt.optimize(model, work / "ort", backend="ort")  # generation-ready: KV cache in and out
    tvm_result = graphopt.optimize(ort_result.graph, work / "tvm", backend="tvm")
    build_s = time.perf_counter() - t
    ort = graphopt.load(work / "ort", threads=threads)
    tvm = graphopt.load(work / "tvm", threads=threads)
    spec = CacheSpec.from_signature(ort.manifest["signature"])
    names = [i["name"] for i in ort.inputs]
    rows = []
    for kind, batch, past, seq in workloads:
        if len(os.sched_getaffinity(0)) < threads:  # what made the first run's Llama rows single-threaded
            raise SystemExit(f"this process may run on cores {sorted(os.sched_getaffinity(0))} only, "
                             f"fewer than --threads {threads}")
        feeds = workload_feeds(spec, names, batch, past, seq)
        a, b = ort.run(feeds), tvm.run(feeds)
        err = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        ort_ms = median_ms(lambda: ort.run(feeds))
        tvm_ms = median_ms(lambda: tvm.run(feeds))
        ort_busy = cpu_over_wall(lambda: ort.run(feeds), max(5, int(500 / max(ort_ms, 0.01))))
        busy = cpu_over_wall(lambda: tvm.run(feeds), max(5, int(500 / max(tvm_ms, 0.01))))
        inter = interleaved_ratio(lambda: ort.run(feeds), lambda: tvm.run(feeds), rounds)
        rows.append({"workload": kind, "batch": batch, "past": past, "seq": seq, "ort_ms": round(ort_ms, 3),
                     "tvm_ms": round(tvm_ms, 3), "tvm_over_ort": round(tvm_ms / ort_ms, 2),
                     "tvm_over_ort_interleaved": inter,
                     "tvm_cpu_over_wall": round(busy, 2), "ort_cpu_over_wall": round(ort_busy, 2),
                     "max_abs_diff": err})
        what = f"{kind} {batch}x{seq}" + (f" after {past}" if past else "")
        print(f"{label:>18} {what:>22}   ort {ort_ms:9.2f} ms   tvm {tvm_ms:9.2f} ms   "
              f"tvm/ort {tvm_ms / ort_ms:6.2f}x (interleaved {inter['median']:.2f}x, q1-q3 {inter['q1']:.2f}-{inter['q3']:.2f})   cpu/wall ort {ort_busy:4.2f} tvm {busy:4.2f}   max|diff| {err:.1e}",
              flush=True)
    return {"model": label, "tvm_compile_seconds": tvm_result.manifest["compile_seconds"],
            "build_seconds_both": round(build_s, 1), "rows": rows}


def parse_workloads(prefill: str, decode: str) -> list[tuple[str, int, int, int]]:
    """(kind, batch, past, seq): prefill BxS (no cache), decode BxP (one token after P cached)."""
    out = []
    for kind, spec in (("prefill", prefill), ("decode", decode)):
        for item in filter(None, spec.split(",")):
            batch, n = (int(v) for v in item.split("x"))
            out.append((kind, batch, 0, n) if kind == "prefill" else (kind, batch, n, 1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,llama512", help="default, llama512 or paths, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default="1x128,4x128", help="batch x prompt tokens, comma-separated ('' for none)")
    ap.add_argument("--decode", default="1x128", help="batch x cached tokens of a one-token step ('' for none)")
    ap.add_argument("--rounds", type=int, default=15,
                    help="interleaved rounds per workload (ORT and TVM alternating, the ratio per round)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm_cpu.json"))
    args = ap.parse_args(argv)

    from graphopt.backends.tvm.build import system_cpu

    workloads = parse_workloads(args.prefill, args.decode)
    tmp = tempfile.TemporaryDirectory(prefix="tvm_bench_")
    work = Path(tmp.name)
    results = []
    for name in args.models.split(","):
        model = {"default": str(ROOT / "examples" / "default"),
                 "llama512": lambda: str(llama512_checkpoint(work / "llama512" / "checkpoint"))}.get(name, name)
        model = model() if callable(model) else model
        label = name if name == "llama512" else _display(model)
        results.append(bench_model(model, label, workloads, args.threads, work / name.replace("/", "_"), args.rounds))
    import onnxruntime
    import tvm as tvm_module

    result = {
        "threads": args.threads, "cores_allowed": sorted(os.sched_getaffinity(0)), "cpu": system_cpu(), "machine": platform.machine(), "cores": os.cpu_count(),
        "tuning": "none (graphopt CPU schedules + dlight CPU rules)",
        "versions": {"onnxruntime": onnxruntime.__version__, "apache-tvm": tvm_module.__version__,
                     "python": platform.python_version()},
        "models": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
