"""Why every ORT session in `graphopt compare` runs without spinning threads: one model's
latency alone and among other live sessions of it, with ORT's default spinning and without.

    python benchmarks/ort_spinning.py ARTIFACT [--threads 2] [--seq 128] [--sessions 4] [--repeats 4]
    python benchmarks/ort_spinning.py build/demo/fp32 --quick      # a smoke test

ARTIFACT is a full-sequence ORT artifact folder (`graphopt optimize MODEL -o OUT --no-kv-cache`).
"alone" is the median of back-to-back runs of one session; "among N" is the median p50 of N
sessions of the same model timed by compare's own interleaved loop
(graphopt.compare.timing.time_interleaved), as compare times its cells. Each setting is
measured `--repeats` times, alone and among alternating in order. With spinning, the idle
threads of the sessions not being timed take the cores of the one that is, so "among" is
slower than "alone"; without spinning they should agree. Prints one line per measurement and
the medians; `--json FILE` writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def session(model: Path, threads: int, spinning: bool, disabled: list[str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from graphopt.compare.timing import TimingSettings, time_interleaved
    from graphopt.manifest import artifact_file, read_manifest

    folder = Path(args.artifact)
    manifest = read_manifest(folder)
    model = artifact_file(folder, manifest.get("model", "model.onnx"), f"{folder}: the manifest")
    disabled = manifest.get("ort_session", {}).get("disabled_optimizers", [])
    runs = 10 if args.quick else 150
    timing = TimingSettings(min_runs=5, min_time=0.2) if args.quick else TimingSettings(min_runs=60, min_time=2.0)
    probe = session(model, 1, True, disabled)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in probe.get_inputs():  # token ids and an all-ones mask: a decoder's full-sequence inputs
        feeds[i.name] = (rng.integers(0, 100, (1, args.seq)) if i.name == "input_ids" else np.ones((1, args.seq))).astype(np.int64)

    def alone(spinning: bool) -> float:
        s = session(model, args.threads, spinning, disabled)
        for _ in range(5):
            s.run(None, feeds)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run(None, feeds)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    def among(spinning: bool) -> float:
        sessions = [session(model, args.threads, spinning, disabled) for _ in range(args.sessions)]
        fns = {f"s{i}": (lambda s=s: s.run(None, feeds)) for i, s in enumerate(sessions)}
        samples, _ = time_interleaved(fns, timing)
        return statistics.median(statistics.median(v) for v in samples.values())

    got: dict[str, list[float]] = {}
    for r in range(args.repeats):
        for spinning in (True, False):
            name = "spinning" if spinning else "no spinning"
            steps = [("alone", alone), (f"among {args.sessions}", among)]
            for what, fn in (steps if r % 2 == 0 else steps[::-1]):
                ms = fn(spinning)
                got.setdefault(f"{name}, {what}", []).append(ms)
                print(f"repeat {r}: {name:11}, {what:9}: {ms:7.2f} ms", flush=True)
    print(f"medians (threads {args.threads}, batch 1 x seq {args.seq}, {args.sessions} live sessions):")
    medians = {k: statistics.median(v) for k, v in got.items()}
    for k, v in medians.items():
        print(f"  {k:26} {v:7.2f} ms")
    for name in ("spinning", "no spinning"):
        print(f"  {name}: among / alone = {medians[f'{name}, among {args.sessions}'] / medians[f'{name}, alone']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"artifact": str(folder), "threads": args.threads, "seq": args.seq,
                                               "sessions": args.sessions, "samples_ms": got, "medians_ms": medians},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
