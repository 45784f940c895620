"""TVM on CUDA (dlight GPU schedules, no tuning) against ONNX Runtime's CUDA provider and
eager PyTorch, on one model, side by side in one run.

    python benchmarks/tvm_cuda.py [MODEL] [--shapes 1x1,1x128,8x128] [--out FILE]

MODEL defaults to the shipped checkpoint (examples/default). Needs a GPU, nvcc or NVRTC
(`pip install cuda-bindings`), and a TVM whose runtime loads CUDA code: the PyPI
apache-tvm wheels compile for cuda but their runtime is CPU-only, so on such an install
the script builds the artifact, says so, and stops. ORT is measured where
onnxruntime-gpu is installed, PyTorch where torch sees the GPU. Writes JSON with the
device, versions, shapes and per-shape median latencies.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from tvm_cpu import median_ms  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=str(ROOT / "examples" / "default"))
    ap.add_argument("--shapes", default="1x1,1x128,8x128", help="batch x seq, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm_cuda.json"))
    args = ap.parse_args(argv)

    import tvm

    import graphopt
    from graphopt.errors import UserError

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dev = tvm.cuda(0)
    print(f"GPU: {dev.device_name if dev.exist else 'none'}; apache-tvm {tvm.__version__}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="tvm_cuda_bench_")
    work = Path(tmp.name)
    t = time.perf_counter()
    result = graphopt.optimize(args.model, work / "tvm", backend="tvm", target="cuda", kv_cache=False)
    print(f"built for {result.manifest['tvm_target']['arch']} in {time.perf_counter() - t:.1f} s "
          f"(compile {result.manifest['compile_seconds']} s)", flush=True)
    try:
        tvm_art = graphopt.load(work / "tvm")
    except UserError as e:
        print(f"cannot run it here: {e}")
        return 0
    vocab = 4096
    runners = {"tvm": tvm_art.run}
    try:
        graphopt.optimize(result.graph, work / "ort", backend="ort", target="cuda")
        runners["ort"] = graphopt.load(work / "ort").run
    except UserError as e:
        print(f"ort skipped: {e}")
    input_name = tvm_art.inputs[0]["name"]
    rows = []
    for batch, seq in shapes:
        ids = np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int64)
        feeds = {input_name: ids}
        row = {"batch": batch, "seq": seq}
        outs = {}
        for name, run in runners.items():
            outs[name] = next(iter(run(feeds).values()))
            row[f"{name}_ms"] = round(median_ms(lambda run=run: run(feeds)), 3)
        if "ort" in outs:
            row["max_abs_diff_vs_ort"] = float(np.abs(outs["tvm"] - outs["ort"]).max())
        rows.append(row)
        print(row, flush=True)
    out = {"model": args.model, "device": dev.device_name, "arch": result.manifest["tvm_target"]["arch"],
           "tuning": "none (dlight GPU rules)", "versions": {"apache-tvm": tvm.__version__,
                                                              "python": platform.python_version()},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
