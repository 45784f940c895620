"""Which attention kernel a GPT-2-style decode site (no rotary inside GroupQueryAttention) should
lower to on ORT CPU, measured as the artifact is driven (docs/ort_lowering.md, issues 12 and 13).

    python benchmarks/attention_choice.py --threads 2 --out benchmarks/results/attention_choice.json
    python benchmarks/attention_choice.py --tiny      # toy sizes: checks the script runs (no claims)

GPT-2 small (the `transformers` default config, random weights), one decode step with `--cached`
tokens, fp32 and int4 (block 32, embeddings and tied head quantized), each lowered two ways:
`attention_kernel=onnx` (opset-23 Attention: the past concatenated in the graph, a new present
every step) and `attention_kernel=gqa` (GroupQueryAttention). Rows: each artifact driven with a
growing cache (`session.run`, as Optimum drives it) and, where its presents are GroupQueryAttention's,
shared (past and present one buffer written in place: graphopt's Generator and onnxruntime-genai);
timed as a decode loop (blocks of consecutive steps on spinning sessions, rounds interleaved;
benchmarks/quantization.py `decode_loop_timing`), ratios against the opset-23 growing row.
Also which kernel `auto` picks for each precision.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--precisions", default="fp32,int4",
                    help="comma-separated, of fp32, int4 (block 32, embeddings too) and int8 (--quantize int8's "
                         "block 128, embeddings float)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import graphopt
    from generation import bound_static_decode_step, gpt2_folder, session_decode_step
    from quantization import decode_loop_timing

    from graphopt.compare.machine import library_versions, machine_record

    quantize = {"int4": "quantize-weights{bits=4,block-size=32,embeddings=true}",
                "int8": "quantize-weights{bits=8,block-size=128}"}
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "int4", "int8"}:
        ap.error(f"--precisions {args.precisions!r}: expected fp32, int4 and/or int8")
    work = Path(tempfile.mkdtemp(prefix="attention_choice_"))
    folder = gpt2_folder(work, args.tiny)
    if args.tiny:
        args.cached, args.rounds = 16, 2
    result: dict = {"cached": args.cached, "threads": args.threads, "batch": 1, "tiny": args.tiny,
                    "machine": machine_record(measure_bandwidth=False), "versions": library_versions()}
    graphs = {}  # kernel -> the fp32 generation-ready graph (the quantized artifacts are quantized from it)
    for prec in ["fp32"] + [p for p in precisions if p != "fp32"]:
        steps, picked = {}, {}
        for kernel in ("onnx", "gqa", "auto"):
            out = work / f"{prec}-{kernel}"
            options = {"backend_options": {"attention_kernel": kernel}}
            if prec == "fp32":
                graphs[kernel] = graphopt.optimize(folder, out, **options).graph
            else:
                graphopt.optimize(graphs[kernel], out, passes=quantize[prec], **options)
            if prec not in precisions:
                continue
            artifact = graphopt.load(out, threads=args.threads)
            kernels = artifact.manifest["lowering"]["kernels"]
            if kernel == "auto":
                picked = {k: v for k, v in kernels.items() if "Attention" in k}
                continue
            steps[f"{kernel}-growing"] = session_decode_step(out / "model.onnx", args.cached, args.threads)
            if artifact.shares_cache_buffer:
                steps[f"{kernel}-shared"] = bound_static_decode_step(artifact, args.cached)
        if prec not in precisions:
            continue
        timing = decode_loop_timing(steps, args.rounds, "onnx-growing")
        result[prec] = {"auto_picks": picked, "timing": timing}
        for name, t in timing.items():
            print(prec, name, t["p50_ms"], t.get("speedup_vs_anchor_median_round"), flush=True)
        del steps
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
