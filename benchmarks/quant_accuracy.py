"""Accuracy of weight quantization on the shipped model: perplexity of examples/default on
its validation text (examples/default/val.txt, the text `graphopt eval` scores), through
each variant's ONNX Runtime artifact, fp32 next to int8 and int4 (RTN, GPTQ, AWQ) and int8
static (QDQ).

    python benchmarks/quant_accuracy.py                       # writes benchmarks/results/quant_accuracy.md
    python benchmarks/quant_accuracy.py --quick               # first 8192 tokens, a smoke test

These are accuracy figures, not timings: they do not depend on the machine's load. GPTQ
AWQ and quantize-static calibrate on the model's training corpus (graphopt.calibration),
never on val.txt. MatMulNBits runs at accuracy_level 0 (float compute) unless a row says
otherwise, so the figures do not depend on the level `auto` picks on a given CPU.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Q = "quantize-weights"
VARIANTS = [  # (name, the pass appended to the default pipeline, backend options)
    ("fp32", None, {}),
    ("int8 b128 rtn", f"{Q}{{bits=8,block-size=128}}", {}),
    ("int8 b32 rtn", f"{Q}{{bits=8,block-size=32}}", {}),
    ("int8 b128 rtn +emb", f"{Q}{{bits=8,block-size=128,embeddings=true}}", {}),
    ("int4 b32 rtn", f"{Q}{{bits=4,block-size=32}}", {}),
    ("int4 b32 gptq", f"{Q}{{bits=4,block-size=32,method=gptq}}", {}),
    ("int4 b32 gptq +emb", f"{Q}{{bits=4,block-size=32,method=gptq,embeddings=true}}", {}),
    ("int4 b32 rtn +emb", f"{Q}{{bits=4,block-size=32,embeddings=true}}", {}),
    ("int4 b32 gptq symmetric", f"{Q}{{bits=4,block-size=32,method=gptq,symmetric=true}}", {}),
    ("int4 b128 rtn", f"{Q}{{bits=4,block-size=128}}", {}),
    ("int4 b128 gptq", f"{Q}{{bits=4,block-size=128,method=gptq}}", {}),
    ("int4 b32 awq", f"{Q}{{bits=4,block-size=32,method=awq}}", {}),
    ("int4 b32 awq-then-rtn", f"{Q}{{bits=4,block-size=32,method=awq,awq-then=rtn}}", {}),
    ("int4 b32 gptq acc4", f"{Q}{{bits=4,block-size=32,method=gptq}}", {"quant_accuracy_level": "4"}),
    ("int8 dynamic per-channel", "quantize-dynamic{per-channel=true}", {}),
    ("int8 static minmax", "quantize-static{calibration=minmax}", {}),
    ("int8 static percentile", "quantize-static{calibration=percentile}", {}),
    ("int8 static entropy", "quantize-static{calibration=entropy}", {}),
]
FLOAT_COMPUTE = {"quant_accuracy_level": "0"}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:

    import graphopt
    from graphopt.accuracy import artifact_logits, perplexity
    from graphopt.models import load_graph
    from graphopt.train.data import encode_documents, read_val_text
    from graphopt.train.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "examples/default"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="variant names separated by ';'")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quant_accuracy.md"))
    args = ap.parse_args()
    model = Path(args.model)
    ids = encode_documents(load_tokenizer(model / "tokenizer.json"), read_val_text(model / "val.txt"))
    if args.quick:
        ids = ids[:8193]
    seq_len = json.loads((model / "config.json").read_text())["model"]["max_seq_len"]
    graph = load_graph(str(model))
    rows = []
    from graphopt.driver import default_pipeline

    for name, quant_pass, options in VARIANTS:
        if args.only and name not in args.only.split(";"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            passes = default_pipeline() + (f",{quant_pass}" if quant_pass else "")
            res = graphopt.optimize(graph, Path(tmp) / "a", passes=passes, backend_options=options or FLOAT_COMPUTE,
                                    progress=lambda m: None)
            seconds = time.perf_counter() - t0
            art = graphopt.load(Path(tmp) / "a", threads=2)
            ppl = perplexity(artifact_logits(art), ids, seq_len).perplexity
            size = sum(f.stat().st_size for f in (Path(tmp) / "a").iterdir())
        q = res.report.get("quantization", {})
        rows.append({"variant": name, "perplexity": ppl, "artifact_bytes": size,
                     "linear_weight_bytes": q.get("quantized_weight_bytes"), "optimize_seconds": round(seconds, 1)})
        print(f"{name:34s} perplexity {ppl:8.4f}  artifact {size / 1e6:6.2f} MB", flush=True)
    base = next((r["perplexity"] for r in rows if r["variant"] == "fp32"), None)
    lines = ["# Weight quantization: perplexity of examples/default", "",
             f"Validation text: {_shown(model / 'val.txt')} ({len(ids) - 1} predicted tokens, windows of {seq_len}); "
             "ONNX Runtime artifacts (MatMulNBits at accuracy_level 0 unless the row says acc4), CPU. GPTQ, AWQ and "
             "int8 static calibrate on 32 windows of the training split.", "",
             "| variant | perplexity | vs fp32 | artifact |", "| --- | --- | --- | --- |"]
    for r in rows:
        delta = f"{(r['perplexity'] / base - 1) * 100:+.2f} %" if base else ""
        lines.append(f"| {r['variant']} | {r['perplexity']:.4f} | {delta} | {r['artifact_bytes'] / 1e6:.2f} MB |")
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
