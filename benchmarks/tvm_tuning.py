"""ONNX Runtime against TVM untuned and TVM tuned (MetaSchedule, `--tune-minutes`), side by side
in one run, on the generation-ready artifacts (KV cache) that `graphopt.optimize` wrote.

    python benchmarks/tvm_tuning.py [--models default,llama512] [--tune-minutes 3] [--threads 2]
                                    [--workloads 1x128,4x128,1x1+128] [--tune-db DIR] [--out FILE]

Models: `default` is the shipped checkpoint (examples/default); `llama512` the issue's
Llama-style model (hidden 512, 8 layers, 8 heads, 2 KV heads, intermediate 1408, vocab 8192,
random weights; benchmarks/tvm_cpu.py builds it); or a checkpoint path.
A workload is BATCHxSEQ[+PAST]: prefill of SEQ tokens (no cache), or one decode step after
PAST cached tokens (1x1+128). Each model's tuned artifact is tuned at exactly these workloads
(its buckets) for at most --tune-minutes, into --tune-db (default: a fresh folder per model
under the run's temporary folder, so every run tunes from nothing; give the user cache to
reuse records), then its best records are timed against the default schedules.
Prints a table and writes JSON: threads, versions, per model the tuning record from the
manifest (kernels, trials, minutes, which kernels came from the database, how many records
beat the default schedule), build times, per-workload median latencies, the ratios
tvm/ort, tuned/ort and tuned/untuned, the first two also timed interleaved (`--rounds`: ORT
and each TVM build alternating, the median of per-round ratios), and CPU time over wall time.

A short check (a few minutes): `--models default --tune-minutes 0.5 --workloads 1x32`.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tvm_cpu import _display, cpu_over_wall, interleaved_ratio, llama512_checkpoint, median_ms  # noqa: E402  (the untuned benchmark's)


def feeds_for(signature: dict, bucket, vocab: int) -> dict:
    """Inputs of a generation-ready artifact at a workload: ids below `vocab`, a full mask,
    random past keys/values."""
    from graphopt.backends.tvm.tuning import _eval_dim

    rng = np.random.default_rng(0)
    out = {}
    for e in signature["inputs"]:
        shape = tuple(_eval_dim(d, bucket.dims(), e["name"]) for d in e["shape"])
        if e["name"] == "input_ids":
            out[e["name"]] = rng.integers(0, vocab, shape).astype(np.int64)
        elif "mask" in e["name"]:
            out[e["name"]] = np.ones(shape, np.int64)
        else:
            out[e["name"]] = rng.standard_normal(shape).astype(np.float32)
    return out


def bench_model(model: str, label: str, args, buckets, work: Path) -> dict:
    """One model: ORT, TVM untuned and TVM tuned artifacts of the same optimized graph, timed
    side by side at each workload."""
    import graphopt
    from graphopt.manifest import read_manifest
    from graphopt.sample_inputs import index_bound

    t = time.perf_counter()
    ort_result = graphopt.optimize(model, work / "ort", backend="ort")
    ort_s = time.perf_counter() - t
    graph = ort_result.graph  # the same optimized graph on every backend
    t = time.perf_counter()
    graphopt.optimize(graph, work / "tvm", backend="tvm", kv_cache=False, passes="dce")
    untuned_s = time.perf_counter() - t
    t = time.perf_counter()
    graphopt.optimize(graph, work / "tvm-tuned", backend="tvm", kv_cache=False, passes="dce",
                      tune_minutes=args.tune_minutes, tune_shapes=args.workloads,
                      tune_db=args.tune_db or str(work / "tuning-db"), progress=print)
    tuned_s = time.perf_counter() - t
    manifest = read_manifest(work / "tvm-tuned")
    runners = {name: graphopt.load(work / name, threads=args.threads) for name in ("ort", "tvm", "tvm-tuned")}
    signature = read_manifest(work / "ort")["signature"]
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    vocab = index_bound(ids) or 1000
    rows = []
    for bucket in buckets:
        feeds = feeds_for(signature, bucket, vocab)
        outs = {name: r.run(feeds) for name, r in runners.items()}
        err = max(float(np.abs(outs["ort"][k] - outs[name][k]).max()) for name in ("tvm", "tvm-tuned")
                  for k in outs["ort"])
        ms_ = {name: median_ms(lambda r=r: r.run(feeds)) for name, r in runners.items()}
        busy = {name: cpu_over_wall(lambda r=r: r.run(feeds), max(5, int(500 / max(ms_[name], 0.01))))
                for name, r in runners.items()}
        # The same ratios timed interleaved (ORT and each TVM build alternating round by round):
        # the medians above are taken one after the other, minutes apart on a long run.
        ort_run = lambda: runners["ort"].run(feeds)  # noqa: E731
        inter = {name: interleaved_ratio(ort_run, lambda r=runners[name]: r.run(feeds), args.rounds)
                 for name in ("tvm", "tvm-tuned")}
        row = {"workload": bucket.label, **{f"{k}_ms": round(v, 3) for k, v in ms_.items()},
               "tvm_over_ort": round(ms_["tvm"] / ms_["ort"], 2),
               "tuned_over_ort": round(ms_["tvm-tuned"] / ms_["ort"], 2),
               "tuned_over_untuned": round(ms_["tvm-tuned"] / ms_["tvm"], 2),
               "tvm_over_ort_interleaved": inter["tvm"], "tuned_over_ort_interleaved": inter["tvm-tuned"],
               "cpu_over_wall": {k: round(v, 2) for k, v in busy.items()}, "max_abs_diff": err}
        rows.append(row)
        print(f"{label:>10} {bucket.label:>9}   ort {ms_['ort']:8.2f} ms   tvm {ms_['tvm']:8.2f} ms "
              f"({row['tvm_over_ort']:.2f}x)   tvm tuned {ms_['tvm-tuned']:8.2f} ms ({row['tuned_over_ort']:.2f}x ort, "
              f"{row['tuned_over_untuned']:.2f}x untuned)   cpu/wall "
              + " ".join(f"{k} {v:.2f}" for k, v in row["cpu_over_wall"].items()) + f"   max|diff| {err:.1e}"
              + f"\n{'':>20}interleaved ({args.rounds} rounds): tvm/ort {inter['tvm']['median']:.3f}x "
              f"(q1-q3 {inter['tvm']['q1']:.2f}-{inter['tvm']['q3']:.2f}), tuned/ort {inter['tvm-tuned']['median']:.3f}x "
              f"(q1-q3 {inter['tvm-tuned']['q1']:.2f}-{inter['tvm-tuned']['q3']:.2f})", flush=True)
    return {"model": label, "tvm_target": manifest["tvm_target"], "tuning": manifest["tuning"],
            "build_seconds": {"ort": round(ort_s, 1), "tvm": round(untuned_s, 1),
                              "tvm_tuned_with_tuning": round(tuned_s, 1),
                              "tvm_tuned_compile": manifest.get("compile_seconds")},
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default,llama512", help="default, llama512 or paths, comma-separated")
    ap.add_argument("--tune-minutes", type=float, default=3.0, help="per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workloads", default="1x128,4x128,1x1+128")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per workload and TVM build")
    ap.add_argument("--tune-db", default=None, help="default: a fresh folder per model (tuning from nothing)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tvm_tuning.json"))
    args = ap.parse_args(argv)

    from graphopt.backends.tvm import tuning

    buckets = tuning.parse_shapes(args.workloads, "--workloads")
    tmp = tempfile.TemporaryDirectory(prefix="tvm_tuning_bench_")
    work = Path(tmp.name)
    models = []
    for name in args.models.split(","):
        folder = work / name.replace("/", "_")
        model = (str(ROOT / "examples" / "default") if name == "default"
                 else str(llama512_checkpoint(folder / "checkpoint")) if name == "llama512" else name)
        models.append(bench_model(model, name if name == "llama512" else _display(model), args, buckets, folder))
    from graphopt.compare.machine import library_versions

    result = {"threads": args.threads, "machine": platform.machine(), "tune_minutes": args.tune_minutes,
              "rounds": args.rounds,
              "versions": library_versions(), "models": models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
