"""End-to-end latency through `graphopt compare`: PyTorch eager, ONNX Runtime on the exported
file, ORT's own transformer optimizer, ORT's dynamic int8 quantization and graphopt's fp32,
int8 and int4 artifacts, side by side on the same inputs, interleaved, in one run per model
and shape set; for the decoders also time to first token and decode tokens/s (`--generate`).

    python benchmarks/ort_end_to_end.py              # writes BENCHMARKS.md and benchmarks/results/compare-*
    python benchmarks/ort_end_to_end.py --quick --out /tmp/b.md   # small models, a smoke test

Models are built from configs with random weights (GPT-2, Llama, BERT shapes) and saved as
Hugging Face folders; `graphopt compare` exports each once and builds every variant from that
export. This script does no timing of its own: every number in the table is a p50 from the
compare report (its JSON, with every sample, and its HTML page go to benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; compare sets it too

COLUMNS = [("torch/fp32", "PyTorch eager"), ("ort/ort-plain", "ORT (exported file)"),
           ("ort/ort-optimizer", "ORT transformers optimizer"), ("ort/ort-int8", "ORT quantize_dynamic int8"),
           ("ort/fp32", "graphopt fp32"), ("ort/int8", "graphopt int8"), ("ort/int4", "graphopt int4")]
GEN_COLUMNS = [("torch/fp32", "PyTorch eager (own cache)"), ("ort/fp32", "graphopt fp32"), ("ort/int8", "graphopt int8"),
               ("ort/int4", "graphopt int4")]


def save_model(arch: str, size: str, folder: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    layers, hidden, heads = {"small": (4, 256, 4), "base": (6, 768, 12)}[size]
    vocab = 2048
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024, vocab_size=vocab)
        cls = tf.GPT2LMHeadModel
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 2), intermediate_size=hidden * 8 // 3,
                             max_position_embeddings=1024, vocab_size=vocab)
        cls = tf.LlamaForCausalLM
    else:
        cfg = tf.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            intermediate_size=hidden * 4, max_position_embeddings=1024, vocab_size=vocab)
        cls = tf.BertModel
    path = folder / f"{arch}-{size}"
    cls(cfg).eval().save_pretrained(path)
    return path


def generation_row(report: dict, arch: str, threads: int) -> str:
    cells = {c["id"]: c for c in report["cells"]}
    n = report["generation"]["new_tokens"]
    out = []
    for cid, _ in GEN_COLUMNS:
        g = (cells.get(cid) or {}).get("generation")
        if g is None or "error" in g:
            out.append("fails")
            continue
        same = "" if g["same_tokens"] in (None, n) else f" ({g['same_tokens']}/{n})"
        out.append(f"{g['ttft_ms']:.1f} ms / {g['decode_tokens_per_s']:.0f} tok/s{same}")
    return f"| {arch} | {threads} | " + " | ".join(out) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, few runs (a smoke test)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--archs", nargs="+", default=["gpt2", "llama", "bert"])
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--generate", type=int, default=None,
                    help="new tokens for the decoders' generation timing [default: 64; --quick: 8]")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for each run's compare JSON and HTML")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import platform

    from graphopt.compare import compare
    from graphopt.compare.command import RichProgress
    from graphopt.compare.html import render_html, report_json
    from graphopt.compare.table import ratio
    from graphopt.compare.timing import TimingSettings

    size = "small" if args.quick else "base"
    groups = [(1, [32]), (4, [128])] if args.quick else [(1, [32, 256]), (4, [128])]
    timing = TimingSettings(min_runs=5, min_time=0.2) if args.quick else TimingSettings(min_runs=30, min_time=2.0)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    new_tokens = args.generate or (8 if args.quick else 64)
    rows, gen_rows, accuracy, reports = [], [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            folder = save_model(arch, size, Path(tmp))
            for threads in args.threads:
                for batch, seqs in groups:
                    progress = RichProgress()
                    try:
                        generate = new_tokens if arch != "bert" and batch == 1 else None
                        report = compare([str(folder)], backends=["torch", "ort"],
                                         variants=["fp32", "int8", "int4", "ort-plain", "ort-optimizer", "ort-int8"],
                                         batch=batch, seqs=seqs, threads=threads, timing=timing, progress=progress,
                                         generate=generate)
                    finally:
                        progress.close()
                    name = f"compare-{arch}-{size}-t{threads}-b{batch}"
                    (results / f"{name}.json").write_text(report_json(report) + "\n")
                    (results / f"{name}.html").write_text(render_html(report))
                    reports.append((name, report))
                    cells = {c["id"]: c for c in report["cells"]}
                    for i, seq in enumerate(seqs):
                        out = []
                        for cid, _ in COLUMNS:
                            c = cells.get(cid)
                            r = c["results"][i] if c and c["status"] == "ok" else None
                            if r is None or "p50_ms" not in r:
                                err = (c or {}).get("error") or (r or {}).get("error") or "not run"
                                out.append("fails")
                                accuracy.setdefault(arch, {})[cid] = err
                                continue
                            k = ratio(report, c, i)
                            out.append(f"{r['p50_ms']:.2f} ms ({k:.2f}x)" if k else f"{r['p50_ms']:.2f} ms")
                            a = r["accuracy"]
                            prev = accuracy.setdefault(arch, {}).get(cid)
                            if not isinstance(prev, str):
                                accuracy[arch][cid] = max(prev or 0.0, a["max_abs_err"])
                        rows.append(f"| {arch} | {threads} | {batch} x {seq} | " + " | ".join(out) + " |")
                        print(rows[-1], flush=True)
                    if report.get("generation"):
                        gen_rows.append(generation_row(report, arch, threads))
                        print(gen_rows[-1], flush=True)
    first = reports[0][1]
    m, v = first["machine"], first["versions"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/ort_end_to_end.py`, which runs `graphopt compare` (no timing loop",
        "of its own); rerun it to check the numbers on your machine. Each cell is the p50 latency of a",
        f"compare run (at least {timing.min_runs} timed runs and {timing.min_time:g} s per cell and shape, every cell",
        "interleaved round by round on the same inputs, with 10 ms of untimed runs at each switch), with its ratio",
        "to ONNX Runtime on the exported file with ORT's own graph optimizations on (`ORT_ENABLE_ALL`;",
        "higher is faster). Every ORT session has the same settings (the stated threads, one inter-op",
        "thread, no spinning threads: `session.intra_op.allow_spinning=0`), recorded per cell in the JSON.",
        "graphopt int8/int4 are weight-only RTN (`--quantize int8|int4`), untuned for accuracy.",
        "Inputs are token batches whose first row is left-padded by a third.",
        "Every compare report, with every sample, is in `benchmarks/results/` (JSON, and an HTML page",
        "with charts that opens offline).",
        "",
        f"- Models: {size} configs with random weights ({'4 layers, 256 wide, 4 heads' if size == 'small' else '6 layers, 768 wide, 12 heads'}; "
        "Llama with grouped-query attention), dynamo export at opset 20, fp32, CPU.",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores, ISA {', '.join(m['isa']) or '-'}; "
        f"read bandwidth {m.get('memory_bandwidth', {}).get('read_gb_s', '-')} GB/s.",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + f"; {platform.machine()}.",
        "",
        "| model | threads | batch x seq | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
        *rows,
        "",
        "Accuracy: the largest |logit (or hidden state) - PyTorch| over the shapes above, on unpadded positions.",
        "",
        "| model | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    notes = []
    for arch, acc in accuracy.items():
        cells = []
        for cid, _ in COLUMNS:
            x = acc.get(cid)
            if isinstance(x, str):
                cells.append("fails")
                notes.append(f"- {arch}, {dict(COLUMNS)[cid]}: {x}")
            else:
                cells.append("-" if x is None else f"{x:.1e}")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    lines += [""] + sorted(set(notes))
    if gen_rows:
        g = next(r for _, r in reports if r.get("generation"))["generation"]
        lines += ["", "## Generation", "",
                  f"`graphopt compare --generate {new_tokens}`: greedy generation of {new_tokens} new tokens after a "
                  f"prompt of {g['prompt_tokens']} tokens (batch 1), every cell with the same loop "
                  "(`graphopt.generation.Generator`; PyTorch eager with its own KV cache); graphopt's cells are its "
                  "generation-ready artifacts (KV cache, last-token logits). Each cell: time to first token / decode "
                  f"tokens/s, medians of {g['rounds']} interleaved rounds; (k/N): only the first k greedy tokens "
                  "equal PyTorch's.", "",
                  "| model | threads | " + " | ".join(title for _, title in GEN_COLUMNS) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in GEN_COLUMNS) + " |", *gen_rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {len(reports)} reports in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
