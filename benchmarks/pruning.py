"""Pruning benchmark (issue 15), side by side in one run: the shipped model's generation-ready
ONNX Runtime artifact, dense and pruned, fp32, batch 1.

    python benchmarks/pruning.py --threads 2 --out docs/pruning_bench.json
    python benchmarks/pruning.py --tiny              # a smoke run at toy sizes (no claims)

Variants, all built from one export of examples/default by `graphopt.optimize`:
  dense      the default recipe
  pruned     the default recipe + `--prune` (default heads=0.5,mlp=0.5: half of every layer's
             KV groups with their query heads, half of its MLP channels)
  nm-2:4     the default recipe + prune-nm{n=2,m=4}         (masks: the shapes stay dense)
  magnitude  the default recipe + prune-magnitude{sparsity=0.5}

Measured, interleaved by rounds (every round times each variant once, in an order that
alternates) so that load drifting on the machine hits all of them alike:
  prefill    one call with `--seq` (128) tokens and an empty cache
  decode     one decode step with `--seq` tokens in the cache
Reported per variant: p50 and min over the rounds, and the ratio to dense (>1: faster);
for `pruned`, the parameters and block FLOPs removed, from its report.json.

With `--perplexity`, also each variant's perplexity on examples/default/val.txt (full-sequence
artifacts, `--max-tokens` of it; 0 = all), plus `pruned-wanda` (the same spec with
importance=wanda, calibrated on the checkpoint's training split). No recovery fine-tuning.
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

from generation import decode_step  # benchmarks/generation.py: prefill and decode-step feeds

ROOT = Path(__file__).resolve().parents[1]


def variants(prune: str) -> dict[str, dict]:
    from graphopt.driver import default_pipeline

    generation = "rewrite-kv-cache,slice-last-token-logits"
    masked = lambda p: {"passes": f"{default_pipeline()},{p},{generation}"}  # noqa: E731
    return {"dense": {}, "pruned": {"prune": prune},
            "nm-2:4": masked("prune-nm{n=2,m=4}"), "magnitude": masked("prune-magnitude{sparsity=0.5}")}


def perplexities(graph, work: Path, prune: str, max_tokens: int) -> dict[str, float]:
    """Each variant's perplexity on the shipped model's val.txt, through full-sequence ORT artifacts."""
    import graphopt
    from graphopt.evaluation import evaluate_artifact

    out = {}
    options = dict(variants(prune), **{"pruned-wanda": {"prune": f"{prune},importance=wanda"}})
    for name, opts in options.items():
        if "passes" in opts:  # without the generation passes: every position's logits
            opts = {"passes": opts["passes"].removesuffix(",rewrite-kv-cache,slice-last-token-logits")}
        else:
            opts = dict(opts, kv_cache=False)
        folder = work / f"ppl_{name.replace(':', '_')}"
        graphopt.optimize(graph.copy(), folder, **opts)
        result, _ = evaluate_artifact(folder, ROOT / "examples" / "default" / "val.txt", max_tokens=max_tokens)
        out[name] = result.perplexity
    return out


def _runner(session):
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: session.run(names, feeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128, help="prefill length, and cache length of the decode step")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--prune", default="heads=0.5,mlp=0.5", help="the --prune spec of the pruned variant")
    ap.add_argument("--perplexity", action="store_true", help="also each variant's perplexity on val.txt")
    ap.add_argument("--max-tokens", type=int, default=0, help="--perplexity: score the first N tokens (0 = all)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.rounds, args.max_tokens = 16, 3, 2000
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import onnxruntime

    import graphopt
    from graphopt.compare.variants import ort_session_from, ort_settings
    from graphopt.models import load_graph

    results: dict = {"model": "examples/default", "backend": "onnxruntime cpu", "threads": args.threads,
                     "batch": 1, "seq": args.seq, "rounds": args.rounds, "dtype": "fp32", "prune": args.prune,
                     "versions": {"graphopt": graphopt.__version__, "onnxruntime": onnxruntime.__version__,
                                  "python": platform.python_version()},
                     "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    graph = load_graph(str(ROOT / "examples" / "default"))
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, feeds = {}, {}
        for name, options in variants(args.prune).items():
            res = graphopt.optimize(graph.copy(), Path(tmp) / name.replace(":", "_"), **options)
            if name == "pruned":
                p = res.report["pruning"]
                results["pruned"] = {"parameters_removed": p["parameters_removed"],
                                     "parameters_before": p["parameters_before"], "block_flops": p["block_flops"]}
            feeds[name] = decode_step(graphopt.load(res.output_dir, threads=args.threads), args.seq)
            # timed in sessions that do not spin (as compare's cells): five live sessions whose idle
            # threads spin would slow each other and make the p50s lie
            manifest = json.loads((res.output_dir / "manifest.json").read_text())
            settings = ort_settings(args.threads, disabled_optimizers=manifest.get("ort_session", {})
                                    .get("disabled_optimizers"))
            session = ort_session_from(res.output_dir / manifest.get("model", "model.onnx"), settings)
            artifacts[name] = _runner(session)
        results["ort_session"] = settings
        times: dict = {name: {"prefill": [], "decode": []} for name in artifacts}
        order = list(artifacts)
        for r in range(args.rounds + 2):  # the first two rounds warm up
            for name in (order if r % 2 else order[::-1]):
                for phase, key in (("prefill", "prefill"), ("decode", "step")):
                    t = time.perf_counter()
                    artifacts[name](feeds[name][key])
                    if r >= 2:
                        times[name][phase].append(time.perf_counter() - t)
        if args.perplexity:
            results["perplexity"] = perplexities(graph, Path(tmp), args.prune, args.max_tokens)
    table = {}
    for name, phases in times.items():
        table[name] = {phase: {"p50_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
                       for phase, ts in phases.items()}
    for name in table:
        for phase in ("prefill", "decode"):
            table[name][phase]["speedup_vs_dense"] = table["dense"][phase]["p50_ms"] / table[name][phase]["p50_ms"]
    results["latency"] = table
    print(json.dumps(results, indent=2))
    print(f"\n{'variant':<10} {'prefill p50 ms':>15} {'vs dense':>9} {'decode p50 ms':>14} {'vs dense':>9}")
    for name, t in table.items():
        print(f"{name:<10} {t['prefill']['p50_ms']:>15.2f} {t['prefill']['speedup_vs_dense']:>8.2f}x "
              f"{t['decode']['p50_ms']:>14.3f} {t['decode']['speedup_vs_dense']:>8.2f}x")
    for name, ppl in results.get("perplexity", {}).items():
        print(f"perplexity {name:<13} {ppl:.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
