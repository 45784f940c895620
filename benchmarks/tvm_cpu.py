"""TVM (untuned, graphopt's default CPU schedules) against ONNX Runtime on one model, side by
side in one run: the same optimized graph, both backends, the same inputs and threads.

    python benchmarks/tvm_cpu.py [MODEL] [--threads N] [--shapes 1x1,1x32,1x128,4x128] [--out FILE]

MODEL defaults to the shipped checkpoint (examples/default). Prints a table and writes JSON
(threads, shapes, versions, per-shape median latencies and their ratio).
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


def _display(model: str) -> str:
    path = Path(model).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples" / "default"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shapes", default="1x1,1x32,1x128,4x128", help="batch x seq, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm_cpu.json"))
    args = ap.parse_args(argv)

    import graphopt
    from graphopt.backends.tvm.build import system_cpu

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="tvm_bench_")
    work = Path(tmp.name)
    t = time.perf_counter()
    ort_result = graphopt.optimize(args.model, work / "ort", backend="ort", kv_cache=False)  # full-sequence forwards
    tvm_result = graphopt.optimize(ort_result.graph, work / "tvm", backend="tvm")
    build_s = time.perf_counter() - t
    ort = graphopt.load(work / "ort", threads=args.threads)
    tvm = graphopt.load(work / "tvm", threads=args.threads)
    (inp,) = [i for i in ort.inputs]  # token ids
    vocab = 4096
    rows = []
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int64)
        feeds = {inp["name"]: ids}
        a, b = ort.run(feeds), tvm.run(feeds)
        err = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        ort_ms = median_ms(lambda: ort.run(feeds))
        tvm_ms = median_ms(lambda: tvm.run(feeds))
        rows.append({"batch": batch, "seq": seq, "ort_ms": round(ort_ms, 3), "tvm_ms": round(tvm_ms, 3),
                     "tvm_over_ort": round(tvm_ms / ort_ms, 2), "max_abs_diff": err})
        print(f"batch {batch:>2} seq {seq:>4}   ort {ort_ms:9.2f} ms   tvm {tvm_ms:9.2f} ms   "
              f"tvm/ort {tvm_ms / ort_ms:6.2f}x   max|diff| {err:.1e}", flush=True)
    import onnxruntime
    import tvm as tvm_module

    result = {
        "model": _display(args.model), "threads": args.threads, "cpu": system_cpu(), "machine": platform.machine(),
        "cores": os.cpu_count(), "tvm_compile_seconds": tvm_result.manifest["compile_seconds"],
        "build_seconds_both": round(build_s, 1), "tuning": "none (dlight CPU rules + graphopt CPU schedules)",
        "versions": {"onnxruntime": onnxruntime.__version__, "apache-tvm": tvm_module.__version__,
                     "python": platform.python_version()},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
