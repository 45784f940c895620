"""Quantization speed (issue 13), side by side in one run, batch 1, with the anchors.

    python benchmarks/quantization.py --threads 2 --out benchmarks/results/quantization.json
    python benchmarks/quantization.py --tiny          # toy sizes: checks the script runs (no claims)
    python benchmarks/quantization.py --tvm --skip-prefill --threads 2   # the decode rows with TVM's int4

On GPT-2 small (the `transformers` default config, random weights: no hub access):
1. prefill at `--seq` (128) tokens, full-sequence logits: graphopt's fp32 ORT artifact,
   graphopt int8 dynamic and int8 static (QDQ, calibrated on random token windows), and ONNX
   Runtime's `quantize_dynamic` on the plain export (the exporter's graph, no graphopt passes),
   each with its logit error against the fp32 artifact (max and mean absolute);
2. a decode step with `--cached` (128) tokens in the cache: graphopt's fp32 and int4 (block 32,
   RTN, embeddings and the tied LM head quantized too; MatMulNBits accuracy_level chosen by
   `auto`) artifacts, and ORT's `MatMulNBitsQuantizer` (block 32, MatMul and Gather) applied to
   the same fp32 decode graph, all driven by the same feeds; the bandwidth bound is the bytes of
   each artifact's weights over the read bandwidth measured in this run
   (graphopt.compare.machine.read_bandwidth). Beside them, graphopt's int4 artifact with a static
   cache stepped through IO binding, as its Generator runs it (no cache copy a step). With `--tvm`, graphopt's int4 artifact for TVM
   too (the dequantize-fused kernels of backends/tvm/schedules_quant.py; its weight bytes are
   those of its weights.safetensors), and the fp32 one for TVM beside it;
3. a decode step with `--cached` tokens on the Llama-style Hugging Face folder of
   benchmarks/generation.py (hidden 512, 8 layers, 8 heads, 2 key/value heads, vocabulary 8192):
   graphopt int4 (block 32, RTN) against onnxruntime-genai's model builder `-p int4 -e cpu` on the
   same folder, both driven by the same harness (`--no-llama` skips it).
Timings are medians of `--repeats` runs, variants interleaved round by round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/generation.py


def gpt2_folder(work: Path, tiny: bool) -> Path:
    import torch
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512) if tiny else tf.GPT2Config()
    torch.manual_seed(0)
    folder = work / "gpt2"
    tf.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # live sessions must not spin on each other
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(runs: dict, repeats: int, warmup: int = 2) -> dict:
    """name -> zero-argument callable; each is timed once per round, rounds repeated."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: {"p50_ms": round(statistics.median(v) * 1e3, 3), "min_ms": round(min(v) * 1e3, 3), "runs": repeats}
            for name, v in times.items()}


def initializer_bytes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def tensor_bytes(artifact: Path) -> int:
    """The bytes of a TVM artifact's weights (its weights.safetensors)."""
    from safetensors.numpy import load_file

    return sum(a.nbytes for a in load_file(str(artifact / "weights.safetensors")).values())


def logit_error(got: np.ndarray, want: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - want)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}


def prefill(folder: Path, work: Path, args) -> dict:
    import graphopt
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = rng.integers(0, vocab, (1, args.seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.savez(work / "calibration.npz", input_ids=rng.integers(0, vocab, (8, args.seq), dtype=np.int64),
             attention_mask=np.ones((8, args.seq), np.int64))
    paths = {}
    graphopt.optimize(folder, work / "plain", passes="eliminate-dead-code", kv_cache=False)  # the exporter's graph
    quantize_dynamic(str(work / "plain" / "model.onnx"), str(work / "ort_int8.onnx"), weight_type=QuantType.QInt8)
    paths["ort-quantize_dynamic"] = work / "ort_int8.onnx"
    for name, quantize in (("graphopt-fp32", None), ("graphopt-int8-dynamic", "int8-dynamic"),
                           ("graphopt-int8-static", "int8-static")):
        calibration = work / "calibration.npz" if quantize == "int8-static" else None
        graphopt.optimize(folder, work / name, kv_cache=False, quantize=quantize, calibration=calibration)
        paths[name] = work / name / "model.onnx"
    sessions = {name: session(p, args.threads) for name, p in paths.items()}
    want = sessions["graphopt-fp32"].run(["logits"], feeds)[0].astype(np.float64)
    out = {"seq": args.seq, "timing": interleaved({n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()},
                                                  args.repeats)}
    out["logit_error_vs_fp32"] = {n: logit_error(s.run(["logits"], feeds)[0], want)
                                  for n, s in sessions.items() if n != "graphopt-fp32"}
    out["weight_bytes"] = {n: initializer_bytes(p) for n, p in paths.items()}
    return out


def decode(folder: Path, work: Path, args, bandwidth_gb_s: float) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import graphopt
    from generation import decode_step  # benchmarks/generation.py: the same decode-step feeds

    fp32 = graphopt.optimize(folder, work / "dec-fp32")  # generation-ready: KV cache, last-token logits
    dirs = {"graphopt-fp32": work / "dec-fp32", "graphopt-int4": work / "dec-int4"}
    graphopt.optimize(fp32.graph, dirs["graphopt-int4"],
                      passes="quantize-weights{bits=4,block-size=32,embeddings=true}")
    if args.tvm:  # fp32 too: what the rest of the TVM model costs, apart from the quantized kernels
        dirs["graphopt-fp32-tvm"] = work / "dec-fp32-tvm"
        graphopt.optimize(fp32.graph, dirs["graphopt-fp32-tvm"], backend="tvm")
        dirs["graphopt-int4-tvm"] = work / "dec-int4-tvm"
        graphopt.optimize(fp32.graph, dirs["graphopt-int4-tvm"], backend="tvm",
                          passes="quantize-weights{bits=4,block-size=32,embeddings=true}")
    q = MatMulNBitsQuantizer(onnx.load(str(dirs["graphopt-fp32"] / "model.onnx")), bits=4, block_size=32,
                             is_symmetric=False, op_types_to_quantize=("MatMul", "Gather"),
                             quant_axes=(("MatMul", 0), ("Gather", 1)))
    q.process()
    ort_nbits = work / "ort_matmulnbits.onnx"
    q.model.save_model_to_file(str(ort_nbits), use_external_data_format=False)

    step = decode_step(graphopt.load(dirs["graphopt-fp32"], threads=args.threads), args.cached)["step"]

    runners, sizes = {}, {}
    for name, d in dirs.items():
        a = graphopt.load(d, threads=args.threads)
        runners[name] = lambda a=a: a.run(step)
        sizes[name] = initializer_bytes(d / "model.onnx") if (d / "model.onnx").exists() else tensor_bytes(d)
    s = session(ort_nbits, args.threads)
    runners["ort-MatMulNBitsQuantizer"] = lambda: s.run(None, step)
    sizes["ort-MatMulNBitsQuantizer"] = initializer_bytes(ort_nbits)
    static = int4_static_io_binding(folder, work, args)
    runners["graphopt-int4-static-io-binding"], sizes["graphopt-int4-static-io-binding"] = static
    timing = interleaved(runners, args.repeats)
    want = runners["graphopt-fp32"]()["logits"].astype(np.float64)
    errors = {n: logit_error(runners[n]()["logits"], want) for n in [*dirs, "graphopt-int4-static-io-binding"]
              if n != "graphopt-fp32"}
    errors["ort-MatMulNBitsQuantizer"] = logit_error(s.run(["logits"], step)[0], want)
    manifest = json.loads((dirs["graphopt-int4"] / "manifest.json").read_text())
    out = {"cached": args.cached, "timing": timing, "weight_bytes": sizes, "logit_error_vs_fp32": errors,
           "accuracy_level": manifest.get("quant_accuracy_level")}
    out["bandwidth_bound_ms"] = {n: round(b / (bandwidth_gb_s * 1e9) * 1e3, 3) for n, b in sizes.items() if b}
    out["ratio_to_bound"] = {n: round(timing[n]["p50_ms"] / out["bandwidth_bound_ms"][n], 3)
                             for n in out["bandwidth_bound_ms"]}
    return out


def int4_static_io_binding(folder: Path, work: Path, args):
    """(step callable, weight bytes): graphopt's int4 artifact (the growing-cache row's
    quantization) with a static cache, stepped the way its Generator runs it: IO binding, past
    and present one buffer, the step written in place (GroupQueryAttention copies no cache; the
    growing layout copies past -> present every step). Same prompt, token and cached length as
    the other rows (benchmarks/generation.py's `bound_static_decode_step`); its cache is prefilled
    by itself (int4), where the other rows step over the fp32 artifact's cache, so its logit
    error differs from the growing int4 row's a little."""
    import graphopt
    from generation import bound_static_decode_step

    fp32 = graphopt.optimize(folder, work / "dec-fp32-static", kv_layout="static")
    out = work / "dec-int4-static"
    graphopt.optimize(fp32.graph, out, passes="quantize-weights{bits=4,block-size=32,embeddings=true}")
    return (bound_static_decode_step(graphopt.load(out, threads=args.threads), args.cached),
            initializer_bytes(out / "model.onnx"))


def llama_decode_int4(work: Path, args, bandwidth_gb_s: float) -> dict:
    """A decode step with `--cached` tokens on the issue's Llama-style Hugging Face folder (random
    weights), int4 block 32: graphopt (RTN, `--quantize int4`) against the model that
    onnxruntime-genai's model builder makes from the same folder (`-p int4 -e cpu`), both
    prefilled and stepped by benchmarks/generation.py's harness (`session_decode_step`: the
    same feeds, each model's cache in its own layout), timed interleaved; with each one's
    MatMulNBits accuracy_level and its logits' distance from graphopt's fp32 artifact."""
    import onnx

    import graphopt
    from generation import genai_builder_model, llama_folder, session_decode_step

    folder = llama_folder(work, args.tiny)
    paths = {"graphopt-fp32": work / "llama-fp32" / "model.onnx", "graphopt-int4": work / "llama-int4" / "model.onnx"}
    fp32 = graphopt.optimize(folder, paths["graphopt-fp32"].parent)
    graphopt.optimize(fp32.graph, paths["graphopt-int4"].parent, passes="quantize-weights{bits=4,block-size=32}")
    out: dict = {"cached": args.cached}
    try:
        paths["genai-builder-int4"] = genai_builder_model(folder, work, "int4")
    except Exception as e:  # an outside tool's failure is a result of this benchmark, not its end
        out["genai-builder-int4"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    steps = {name: session_decode_step(p, args.cached, args.threads, spinning=False) for name, p in paths.items()}
    out["timing"] = interleaved({n: (lambda s=s, f=f: s.run(None, f)) for n, (s, f) in steps.items()}, args.repeats)
    sess, feeds = steps["graphopt-fp32"]
    want = sess.run(["logits"], feeds)[0][:, -1].astype(np.float64)
    out["logit_error_vs_fp32"] = {n: logit_error(s.run(["logits"], f)[0][:, -1], want)
                                  for n, (s, f) in steps.items() if n != "graphopt-fp32"}
    out["weight_bytes"] = {n: initializer_bytes(p) for n, p in paths.items()}
    out["bandwidth_bound_ms"] = {n: round(b / (bandwidth_gb_s * 1e9) * 1e3, 3) for n, b in out["weight_bytes"].items()}
    out["accuracy_level"] = {n: sorted({a.i for node in onnx.load(str(p), load_external_data=False).graph.node
                                        if node.op_type == "MatMulNBits" for a in node.attribute
                                        if a.name == "accuracy_level"}) for n, p in paths.items() if n != "graphopt-fp32"}
    out["nodes"] = {n: len(onnx.load(str(p), load_external_data=False).graph.node) for n, p in paths.items()}
    if "genai-builder-int4" in out["timing"]:
        out["graphopt_speedup_vs_builder"] = round(
            out["timing"]["genai-builder-int4"]["p50_ms"] / out["timing"]["graphopt-int4"]["p50_ms"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tvm", action="store_true", help="also build and time the TVM int4 decode artifact")
    ap.add_argument("--skip-prefill", action="store_true", help="only the decode rows (with --tvm: under 8 minutes)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--no-llama", action="store_true",
                    help="skip the Llama-style int4 decode row against onnxruntime-genai's model builder")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.cached, args.repeats = 16, 16, 3
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from graphopt.compare.machine import library_versions, machine_record, read_bandwidth

    bandwidth = read_bandwidth(16 << 20 if args.tiny else None)
    results = {"threads": args.threads, "batch": 1, "tiny": args.tiny, "machine": machine_record(measure_bandwidth=False),
               "read_bandwidth": bandwidth, "versions": library_versions()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = gpt2_folder(work, args.tiny)
        if not args.skip_prefill:
            results["gpt2_prefill_int8"] = prefill(folder, work, args)
        results["gpt2_decode_int4"] = decode(folder, work, args, bandwidth["read_gb_s"])
        if not args.no_llama:
            results["llama_decode_int4"] = llama_decode_int4(work, args, bandwidth["read_gb_s"])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
