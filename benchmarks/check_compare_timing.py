"""Check `graphopt compare`'s ratios against an independent timing of the same artifacts.

    python benchmarks/check_compare_timing.py examples/default --seq 128 --threads 2
    python benchmarks/check_compare_timing.py examples/default --quick      # a smoke test

Runs `graphopt compare MODEL --keep DIR` (ORT cells only), then times every ORT model it built
again, independently: a fresh ORT session per model, built here from the session settings the
compare report states for that cell (threads, spinning, optimization level, disabled
optimizers: what a user who copies them gets), one session alive at a time, warm-up, then the
median of many runs, the whole sequence repeated in alternating order (`--repeats`) --
nothing shared with compare's timing code. Prints both the absolute p50s and the ratios
(against `ort-plain`), their disagreement and the independent timing's own spread; on an idle
machine they should agree within 10 %. Exit 1 if the ratios do not. `--json FILE` writes all
of it, with the settings, for the record.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def model_file(cell: dict) -> Path:
    """The .onnx file a cell ran: its path, or the model an artifact folder's manifest names."""
    path = Path(cell["path"])
    if path.is_dir():
        return path / json.loads((path / "manifest.json").read_text()).get("model", "model.onnx")
    return path


def session(path: Path, settings: dict):
    """A plain ORT session with the settings the compare report states for the cell (written
    here, not imported from graphopt.compare: the check shares only the stated settings)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = settings["intra_op_num_threads"]
    so.inter_op_num_threads = settings["inter_op_num_threads"]
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[settings["graph_optimization_level"]]
    for key, value in settings["config"].items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=settings["disabled_optimizers"] or None)


def median_ms(sess, feeds, runs: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="independent runs per model")
    ap.add_argument("--repeats", type=int, default=5, help="independent sequences, alternating in order")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the timings, ratios and session settings here")
    args = ap.parse_args()
    runs = 10 if args.quick else args.runs
    with tempfile.TemporaryDirectory() as tmp:
        keep, out = Path(tmp) / "keep", Path(tmp) / "compare.json"
        cmd = [sys.executable, "-m", "graphopt", "compare", args.model, "--backends", "ort", "--seq", str(args.seq),
               "--batch", str(args.batch), "--threads", str(args.threads), "--keep", str(keep), "--json", str(out), "-q", "--no-memory"]
        if args.quick:
            cmd += ["--runs", "5", "--min-time", "0.2"]
        else:
            cmd += ["--runs", "100", "--min-time", "5"]
        subprocess.run(cmd, check=True)
        report = json.loads(out.read_text())
        from graphopt.compare.run import _make_feeds  # the same inputs compare used
        from graphopt.onnx_io import load_onnx

        graph = load_onnx(keep / "export" / "model.onnx")
        feeds = _make_feeds(graph, None, {"batch": args.batch, "seq": args.seq})
        cells = {c["id"]: c for c in report["cells"] if c["backend"] == "ort" and c["status"] == "ok"
                 and "p50_ms" in c["results"][0] and "intra_op_num_threads" in c["settings"]}
        compare_ms = {cid: c["results"][0]["p50_ms"] for cid, c in cells.items()}
        compare_spread = {cid: c["results"][0]["p90_ms"] / c["results"][0]["p50_ms"] for cid, c in cells.items()}
        # One session alive at a time, as a user times one model; the whole sequence is
        # repeated in alternating order and each model's median taken over the repeats, so a
        # slow drift of the machine does not land on whichever model happened to run last.
        samples: dict[str, list[float]] = {cid: [] for cid in compare_ms}
        order = list(compare_ms)
        for r in range(args.repeats):
            for cid in (order if r % 2 == 0 else order[::-1]):
                sess = session(model_file(cells[cid]), cells[cid]["settings"])
                samples[cid].append(median_ms(sess, feeds, runs))
                del sess
                gc.collect()
        own_ms = {cid: statistics.median(v) for cid, v in samples.items()}
        spread = max((max(v) - min(v)) / statistics.median(v) for v in samples.values())
    base = "ort/ort-plain"
    worst = 0.0
    rows = {}
    print(f"{'cell':20} {'compare p50':>12} {'p90/p50':>7} {'ratio':>7} {'independent':>12} {'ratio':>7} "
          f"{'ratios':>7} {'p50s':>7}")
    for cid in compare_ms:
        a, b = compare_ms[base] / compare_ms[cid], own_ms[base] / own_ms[cid]
        worst = max(worst, abs(a / b - 1))
        rows[cid] = {"compare_p50_ms": compare_ms[cid], "compare_p90_over_p50": compare_spread[cid],
                     "independent_ms": own_ms[cid], "independent_repeats_ms": samples[cid],
                     "compare_ratio": a, "independent_ratio": b, "ratio_differs": a / b - 1,
                     "p50_differs": compare_ms[cid] / own_ms[cid] - 1, "settings": cells[cid]["settings"]}
        print(f"{cid:20} {compare_ms[cid]:10.2f}ms {compare_spread[cid]:6.2f}x {a:6.2f}x {own_ms[cid]:10.2f}ms "
              f"{b:6.2f}x {100 * (a / b - 1):+6.1f}% {100 * (compare_ms[cid] / own_ms[cid] - 1):+6.1f}%")
    print(f"largest disagreement of the ratios: {100 * worst:.1f}% (threads {args.threads}, "
          f"batch {args.batch} x seq {args.seq}); the independent timing's own spread over "
          f"{args.repeats} repeats: up to {100 * spread:.1f}% of a model's median")
    print(f"session settings (from the compare report): {json.dumps(cells[base]['settings'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "batch": args.batch,
                                               "seq": args.seq, "runs": runs, "repeats": args.repeats,
                                               "largest_ratio_disagreement": worst, "independent_spread": spread,
                                               "machine": report["machine"], "cells": rows}, indent=1) + "\n")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
