"""Quantization speed (issue 13), side by side in one run, batch 1, with the anchors.

    python benchmarks/quantization.py --threads 2 --out benchmarks/results/quantization.json
    python benchmarks/quantization.py --tiny          # toy sizes: checks the script runs (no claims)
    python benchmarks/quantization.py --tvm --skip-prefill --threads 2   # the decode rows with TVM's int4
    python benchmarks/quantization.py --llama-only --threads 2   # only the Llama-style int4 row vs the genai builder

On GPT-2 small (the `transformers` default config, random weights: no hub access):
1. prefill at `--seq` (128) tokens, full-sequence logits: graphopt's fp32 ORT artifact,
   graphopt int8 dynamic and int8 static (QDQ, calibrated on random token windows), and ONNX
   Runtime's `quantize_dynamic` on the plain export (the exporter's graph, no graphopt passes),
   each with its logit error against the fp32 artifact (max and mean absolute);
2. a decode step with `--cached` (128) tokens in the cache: graphopt's fp32 and int4 (block 32,
   RTN, embeddings and the tied LM head quantized too; MatMulNBits accuracy_level chosen by
   `auto`) artifacts, and ORT's `MatMulNBitsQuantizer` (block 32, MatMul and Gather) applied to
   the same fp32 decode graph, all driven by the same feeds; the bandwidth bound is the bytes a
   step reads (weights it touches, one row of a gathered table, the past cache) over the read
   bandwidth measured round by round between the timings (graphopt.compare.machine.bound_rounds:
   `--rounds` rounds of one bandwidth sample, then a block of steps per row; each block against
   the higher of the samples around its round, the median ratio and its spread reported). Beside them, graphopt's
   int4 artifact with a static cache stepped through IO binding, as its Generator runs it (no
   cache copy a step), and both forms again at block 128 (`graphopt-int4-b128*`: fewer scale
   bytes, fewer per-block steps in MatMulNBits; +1.13 % perplexity with gptq on examples/default). With `--tvm`, graphopt's int4 artifact for TVM
   too (the dequantize-fused kernels of backends/tvm/schedules_quant.py; its weight bytes are
   those of its weights.safetensors), and the fp32 one for TVM beside it;
3. a decode step with `--cached` tokens on the Llama-style Hugging Face folder of
   benchmarks/generation.py (hidden 512, 8 layers, 8 heads, 2 key/value heads, vocabulary 8192):
   graphopt int4 (block 32, RTN; asymmetric as `--quantize int4` makes it, and symmetric, the
   builder's grid) against onnxruntime-genai's model builder `-p int4 -e cpu` on the same folder,
   all driven by the same harness, timed interleaved for `--llama-rounds` rounds with the median
   per-round speedup over the builder (`--no-llama` skips it, `--llama-only` runs it alone); with `--tvm`, the same
   folder's int4 TVM artifact, timed beside graphopt's int4 and fp32 ORT ones, against its bound.
Timings are medians of `--repeats` runs, variants interleaved round by round.

`--gemv-kernels` times instead one int4 kernel at a time (M = 1, block 32, asymmetric), on
GPT-2 small's weight shapes, in GB/s of the bytes it reads (packed weights, scales, zero points):
TVM's QuantLinear kernels (the panel GEMVs that CPU builds use: int8 activations with VNNI where
the CPU has it, X's quantization included, else fp32; and the TE GEMV forms, 1 row and a group
of 4, that the other builds use) against ONNX Runtime's MatMulNBits (accuracy_level 4 and 0)
on the same weights, and numpy summing the same number of bytes on the same threads. Each variant
cycles through enough copies of its weights (over 96 MB) that they come from memory, as in a
decode step, not from the cache:

    python benchmarks/quantization.py --gemv-kernels --threads 2 --out benchmarks/results/quant_gemv.json
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


def session(path: Path, threads: int, spinning: bool = False):
    """`spinning=False` (ORT's default is on) for sessions timed call by call, interleaved: live
    sessions must not spin on each other."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# With TVM rows: a pause before each timed call (not timed). An ORT session's threads spin on
# after a run, and a TVM run right after one shared the cores with them: 2-4x slower on the
# 2-core machine (GPT-2 int4 decode 134 ms after an ORT row vs 32 ms with the pause, same run).
SETTLE_S = 0.05


def interleaved(runs: dict, repeats: int, warmup: int = 2, settle_s: float = 0.0, warm_calls: int = 0,
                anchor: str | None = None, block: int = 1) -> dict:
    """name -> zero-argument callable; each is timed `block` calls in a row per round, rounds
    repeated, the order rotated round by round (each variant takes every place in the order
    equally often: the one right after another model finds the caches holding that model's
    weights, not its own). `warm_calls` untimed calls just before each timed block make it find
    its own weights in the caches, as the steps of its own decode loop do. With `anchor`, each
    variant also gets the median over rounds of anchor time / its time (per round, the median of
    its block; `speedup_vs_anchor_median_round`, > 1: faster than the anchor): the two timings
    of a round share the machine's state of that moment, so the ratio moves less than a ratio
    of medians when the machine's speed drifts."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    names = list(runs)
    times = {name: [] for name in runs}
    per_round = {name: [] for name in runs}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = runs[name]
            time.sleep(settle_s)
            for _ in range(warm_calls):
                fn()
            block_times = []
            for _ in range(block):
                t = time.perf_counter()
                fn()
                block_times.append(time.perf_counter() - t)
            times[name].extend(block_times)
            per_round[name].append(statistics.median(block_times))
    out = {name: {"p50_ms": round(statistics.median(v) * 1e3, 3), "min_ms": round(min(v) * 1e3, 3),
                  "runs": repeats * block} for name, v in times.items()}
    if anchor is not None:
        for name, v in per_round.items():
            out[name]["speedup_vs_anchor_median_round"] = round(
                statistics.median(a / t for a, t in zip(per_round[anchor], v)), 4)
    return out


# The decode-loop timing of the Llama-style rows: blocks of this many steps in a row per model
# and round, on sessions with ORT's default thread spinning (what a generation loop, graphopt's
# or onnxruntime-genai's, runs), a SETTLE_S pause before each block so that the previous
# model's workers have stopped spinning.
LOOP_BLOCK = 16


def decode_loop_timing(steps: dict, rounds: int, anchor: str | None) -> dict:
    """name -> (session, step feeds) of a spinning session, or a step callable that runs on
    one: `interleaved` in blocks of LOOP_BLOCK."""
    calls = {n: step if callable(step) else (lambda s=step[0], f=step[1]: s.run(None, f)) for n, step in steps.items()}
    return interleaved(calls, rounds, settle_s=SETTLE_S, warm_calls=2, anchor=anchor, block=LOOP_BLOCK)


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


def decode(folder: Path, work: Path, args) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import graphopt
    from generation import decode_step, step_bytes_read  # benchmarks/generation.py: the same decode-step feeds

    from graphopt.compare.machine import bound_rounds

    fp32 = graphopt.optimize(folder, work / "dec-fp32")  # generation-ready: KV cache, last-token logits
    dirs = {"graphopt-fp32": work / "dec-fp32", "graphopt-int4": work / "dec-int4"}
    graphopt.optimize(fp32.graph, dirs["graphopt-int4"],
                      passes="quantize-weights{bits=4,block-size=32,embeddings=true}")
    # Block 128: fewer scale bytes and fewer per-block steps in MatMulNBits (its one-row kernel is
    # not memory bound at block 32); on examples/default int4 b128 gptq is +1.13 % perplexity
    # (docs/quantization.md). Here RTN, its logit error beside the others.
    dirs["graphopt-int4-b128"] = work / "dec-int4-b128"
    graphopt.optimize(fp32.graph, dirs["graphopt-int4-b128"],
                      passes="quantize-weights{bits=4,block-size=128,embeddings=true}")
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
    cache = sum(v.nbytes for k, v in step.items() if k.startswith("past_key_values."))

    runners, reads = {}, {}
    for name, d in dirs.items():
        a = graphopt.load(d, threads=args.threads)
        runners[name] = lambda a=a: a.run(step)
        reads[name] = (step_bytes_read(d / "model.onnx", step)["total"] if (d / "model.onnx").exists()
                       else tensor_bytes(d) + cache)  # TVM: its weights.safetensors, every table in full
    for name in ("graphopt-int4", "graphopt-int4-b128"):
        a = graphopt.load(dirs[name], threads=args.threads)
        if a.shares_cache_buffer:  # the default artifact as its Generator and genai drive it: past and present one buffer
            from generation import bound_static_decode_step

            runners[f"{name}-shared"] = bound_static_decode_step(a, args.cached)
            reads[f"{name}-shared"] = reads[name]  # the same weights and cached positions
    s = session(ort_nbits, args.threads, spinning=True)  # as graphopt.load's sessions
    runners["ort-MatMulNBitsQuantizer"] = lambda: s.run(None, step)
    reads["ort-MatMulNBitsQuantizer"] = step_bytes_read(ort_nbits, step)["total"]
    static = graphopt.optimize(folder, work / "dec-fp32-static", kv_layout="static").graph
    for block, name in ((32, "graphopt-int4-static-io-binding"), (128, "graphopt-int4-b128-static-io-binding")):
        runners[name], static_path = int4_static_io_binding(static, work, args, block)
        reads[name] = step_bytes_read(static_path, step)["total"]  # the cached positions only
    rounds = bound_rounds(runners, reads, rounds=args.rounds, steps=max(3, args.repeats // args.rounds),
                          threads=args.threads, buffer_bytes=16 << 20 if args.tiny else None)
    want = runners["graphopt-fp32"]()["logits"].astype(np.float64)
    errors = {n: logit_error(runners[n]()["logits"], want) for n in runners
              if n not in ("graphopt-fp32", "ort-MatMulNBitsQuantizer")}
    errors["ort-MatMulNBitsQuantizer"] = logit_error(s.run(["logits"], step)[0], want)
    manifest = json.loads((dirs["graphopt-int4"] / "manifest.json").read_text())
    out = {"cached": args.cached, "timing": rounds["timing"], "bytes_read": reads,
           "ratio_to_bound": rounds["ratio_to_bound"], "bound": {k: rounds[k] for k in (
               "method", "read_gb_s", "read_gb_s_samples", "bound_ms_at_median_bandwidth")},
           "logit_error_vs_fp32": errors, "accuracy_level": manifest.get("quant_accuracy_level")}
    return out


def int4_static_io_binding(static_graph, work: Path, args, block: int = 32):
    """(step callable, model path): graphopt's int4 artifact (the growing-cache rows'
    quantization, block `block`) of `static_graph` (the fp32 decoder with a static cache), stepped the way its Generator runs it: IO binding, past
    and present one buffer, the step written in place (GroupQueryAttention copies no cache; the
    growing layout copies past -> present every step). Same prompt, token and cached length as
    the other rows (benchmarks/generation.py's `bound_static_decode_step`); its cache is prefilled
    by itself (int4), where the other rows step over the fp32 artifact's cache, so its logit
    error differs from the growing int4 row's a little."""
    import graphopt
    from generation import bound_static_decode_step

    out = work / f"dec-int4-b{block}-static"
    graphopt.optimize(static_graph, out, passes=f"quantize-weights{{bits=4,block-size={block},embeddings=true}}")
    return bound_static_decode_step(graphopt.load(out, threads=args.threads), args.cached), out / "model.onnx"


def llama_decode_int4(work: Path, args) -> dict:
    """A decode step with `--cached` tokens on the issue's Llama-style Hugging Face folder (random
    weights), int4 block 32: graphopt (RTN, `--quantize int4`: a zero point per block) and
    graphopt with the builder's own grid (`quantize-weights{symmetric=true}`: no zero points)
    against the model that onnxruntime-genai's model builder makes from the same folder (`-p int4
    -e cpu`, symmetric RTN), all prefilled and stepped by benchmarks/generation.py's harness
    (`session_decode_step`: the same feeds, each model's cache in its own layout), timed
    interleaved for `--llama-rounds` rounds (each timed step right after an untimed one of the
    same model, on sessions that do not spin), with the median per-round speedup over the builder;
    and again as a decode loop runs them (`timing_decode_loop`: blocks of LOOP_BLOCK steps in a
    row on sessions with ORT's default spinning, `--llama-rounds / 10` rounds);
    with each one's MatMulNBits accuracy_level, its logits' distance from graphopt's fp32
    artifact, and its node count after ORT's optimizer."""
    import onnx

    import graphopt
    from generation import (bound_static_decode_step, genai_builder_model, llama_folder, ort_optimized_ops,
                            session_decode_step, shared_buffer_decode_step)

    folder = llama_folder(work, args.tiny)
    paths = {"graphopt-fp32": work / "llama-fp32" / "model.onnx", "graphopt-int4": work / "llama-int4" / "model.onnx",
             "graphopt-int4-symmetric": work / "llama-int4-symmetric" / "model.onnx"}
    fp32 = graphopt.optimize(folder, paths["graphopt-fp32"].parent)
    graphopt.optimize(fp32.graph, paths["graphopt-int4"].parent, passes="quantize-weights{bits=4,block-size=32}")
    graphopt.optimize(fp32.graph, paths["graphopt-int4-symmetric"].parent,
                      passes="quantize-weights{bits=4,block-size=32,symmetric=true}")
    out: dict = {"cached": args.cached}
    try:
        paths["genai-builder-int4"] = genai_builder_model(folder, work, "int4")
    except Exception as e:  # an outside tool's failure is a result of this benchmark, not its end
        out["genai-builder-int4"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    steps = {name: session_decode_step(p, args.cached, args.threads, spinning=False) for name, p in paths.items()}
    builder = "genai-builder-int4" if "genai-builder-int4" in steps else None
    out["timing"] = interleaved({n: (lambda s=s, f=f: s.run(None, f)) for n, (s, f) in steps.items()},
                                args.llama_rounds, warm_calls=1, anchor=builder)
    loop = {name: session_decode_step(p, args.cached, args.threads) for name, p in paths.items()}
    # and the same int4 artifact with a static cache, stepped as graphopt's Generator steps it
    # (IO binding: one buffer per cache, written in place; no past -> present copy)
    static = work / "llama-int4-static"
    graphopt.optimize(graphopt.optimize(folder, work / "llama-fp32-static", kv_layout="static").graph, static,
                      passes="quantize-weights{bits=4,block-size=32}")
    static_artifact = graphopt.load(static, threads=args.threads)
    loop["graphopt-int4-static-io-binding"] = bound_static_decode_step(static_artifact, args.cached)
    # the default (growing BNSH) int4 artifact as its Generator and genai drive it: GroupQueryAttention
    # computes its presents, so past and present are one buffer there too (past_present_share_buffer)
    default_int4 = graphopt.load(paths["graphopt-int4"].parent, threads=args.threads)
    if default_int4.shares_cache_buffer:
        loop["graphopt-int4-BNSH-shared"] = bound_static_decode_step(default_int4, args.cached)
    if builder:  # and the builder's model as onnxruntime-genai runs it: its caches shared in place too
        step, logits = shared_buffer_decode_step(paths[builder], args.cached, args.threads,
                                                 static_artifact.manifest["generation"]["max_positions"])
        loop["genai-builder-int4-shared-buffer"] = step
        s_, f_ = steps[builder]
        out["builder_shared_buffer_logits_max_abs_diff_vs_growing"] = float(
            np.abs(logits()[:, -1] - s_.run(["logits"], f_)[0][:, -1]).max())
    out["timing_decode_loop"] = decode_loop_timing(loop, max(5, args.llama_rounds // 10), builder)
    del loop
    sess, feeds = steps["graphopt-fp32"]
    want = sess.run(["logits"], feeds)[0][:, -1].astype(np.float64)
    out["logit_error_vs_fp32"] = {n: logit_error(s.run(["logits"], f)[0][:, -1], want)
                                  for n, (s, f) in steps.items() if n != "graphopt-fp32"}
    out["weight_bytes"] = {n: initializer_bytes(p) for n, p in paths.items()}
    out["accuracy_level"] = {n: sorted({a.i for node in onnx.load(str(p), load_external_data=False).graph.node
                                        if node.op_type == "MatMulNBits" for a in node.attribute
                                        if a.name == "accuracy_level"}) for n, p in paths.items() if n != "graphopt-fp32"}
    out["nodes"] = {n: len(onnx.load(str(p), load_external_data=False).graph.node) for n, p in paths.items()}
    out["nodes_after_ort_optimizer"] = {n: sum(ort_optimized_ops(p, args.threads).values()) for n, p in paths.items()}
    if builder:
        for name in ("graphopt-int4", "graphopt-int4-symmetric"):
            t = out["timing"]
            out[f"{name}_speedup_vs_builder"] = {
                "p50": round(t[builder]["p50_ms"] / t[name]["p50_ms"], 3),
                "median_round": t[name]["speedup_vs_anchor_median_round"],
                "decode_loop_median_round": out["timing_decode_loop"][name]["speedup_vs_anchor_median_round"]}
        t = out["timing_decode_loop"]
        for name in ("graphopt-int4-static-io-binding", "graphopt-int4-BNSH-shared"):
            if name not in t:
                continue
            out[f"{name}_speedup_vs_builder"] = {
                "decode_loop_median_round": t[name]["speedup_vs_anchor_median_round"],
                "decode_loop_median_round_vs_builder_shared_buffer": round(
                    t[name]["speedup_vs_anchor_median_round"]
                    / t["genai-builder-int4-shared-buffer"]["speedup_vs_anchor_median_round"], 3)}
    return out


def llama_decode_int4_tvm(work: Path, args) -> dict:
    """With `--tvm`: the Llama-style folder's int4 decode step (block 32, RTN) on TVM, timed
    interleaved with graphopt's int4 and fp32 ORT artifacts of the same graph (the rows that tie
    this table to `llama_decode_int4`'s), each against its weight bytes over the read bandwidth."""
    import graphopt
    from generation import decode_step, llama_folder

    folder = work / "llama" if (work / "llama" / "config.json").exists() else llama_folder(work, args.tiny)
    passes = "quantize-weights{bits=4,block-size=32}"
    dirs = {"graphopt-fp32": work / "llama-tvm-ref-fp32", "graphopt-int4": work / "llama-tvm-ref-int4",
            "graphopt-int4-tvm": work / "llama-int4-tvm"}
    fp32 = graphopt.optimize(folder, dirs["graphopt-fp32"])
    graphopt.optimize(fp32.graph, dirs["graphopt-int4"], passes=passes)
    graphopt.optimize(fp32.graph, dirs["graphopt-int4-tvm"], backend="tvm", passes=passes)
    artifacts = {name: graphopt.load(d, threads=args.threads) for name, d in dirs.items()}
    step = decode_step(artifacts["graphopt-fp32"], args.cached)["step"]
    runners = {name: (lambda a=a: a.run(step)) for name, a in artifacts.items()}
    out = {"cached": args.cached, "timing": interleaved(runners, args.repeats, settle_s=SETTLE_S)}
    want = runners["graphopt-fp32"]()["logits"].astype(np.float64)
    out["logit_error_vs_fp32"] = {n: logit_error(runners[n]()["logits"], want) for n in dirs if n != "graphopt-fp32"}
    out["weight_bytes"] = {n: initializer_bytes(d / "model.onnx") if (d / "model.onnx").exists() else tensor_bytes(d)
                           for n, d in dirs.items()}
    return out


GPT2_GEMV_SHAPES = {"qkv 768x2304": (2304, 768), "attn-out 768x768": (768, 768), "mlp-up 768x3072": (3072, 768),
                    "mlp-down 3072x768": (768, 3072), "lm-head 768x50257": (50257, 768)}  # name: (N, K)


def _copies(nbytes: int, total: int = 96 << 20) -> int:
    """Copies of a weight that together exceed the last-level cache (32 MB here) three times."""
    return max(2, -(-total // nbytes))


def _time_cycling(fns: dict, repeats: int) -> dict:
    """name -> (zero-argument callables, kernels they run in all: one per copy of the weights);
    every round calls each variant's callables once; per kernel: median and min in seconds."""
    for calls, _ in fns.values():
        for fn in calls:
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (calls, kernels) in fns.items():
            t = time.perf_counter()
            for fn in calls:
                fn()
            times[name].append((time.perf_counter() - t) / kernels)
    return {name: (statistics.median(v), min(v)) for name, v in times.items()}


def _tvm_gemv_kernels(packed, scales, zp, k: int, copies: int) -> dict:
    """The TVM kernels for one weight, built alone: name -> (callables, one per copy; copies)."""
    import tvm
    from tvm import te

    from graphopt.backends.tvm import quant_panels, schedules_quant
    from graphopt.backends.tvm.build import cpu_target_spec

    target, dev = tvm.target.Target(cpu_target_spec()), tvm.cpu()
    n, n_blocks = scales.shape
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    out = {}
    panels = [quant_panels.packed_panels(packed), quant_panels.scales_panels(scales),
              quant_panels.zero_panels(zp, 4, n_blocks)]
    func = quant_panels.gemv_func(k=k, n_panels=quant_panels.panel_count(n), n_blocks=n_blocks, bits=4, block_size=32,
                                  symmetric=False, group=1)
    width = quant_panels.panel_count(n) * quant_panels.PANEL
    variants = {"tvm-panels-fp32": (func, panels, (1, width))}
    for group in (1, schedules_quant.GEMV_GROUP):
        holders = [te.placeholder((1 if group == 1 else te.var("rows", "int64"), k), "float32", "x")]
        holders += [te.placeholder(a.shape, str(a.dtype), name) for a, name in
                    ((packed, "packed"), (scales, "scales"), (zp, "zero_points"))]
        f = schedules_quant.quant_linear_func(*holders, bits=4, block_size=32, k=k, gemv_group=group)
        f = schedules_quant.schedule_gemv(f, target).mod["main"]
        variants[f"tvm-te-gemv-group{group}"] = (f, [packed, scales, zp], (1, group, n))
    for name, (f, weights, out_shape) in variants.items():
        fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target).mod["main"]
        y = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
        xt = tvm.runtime.tensor(x, dev)
        sets = [[tvm.runtime.tensor(np.copy(a), dev) for a in weights] for _ in range(copies)]
        out[name] = [lambda fn=fn, w=w, x=xt, y=y: fn(x, *w, y) for w in sets], copies
    if quant_panels.vnni_available():  # what CPU builds run for 4 bits here: X to int8, then the VNNI GEMV
        quantize = quant_panels.prim_func(quant_panels.quantize_rows_source(k=k, n_blocks=n_blocks, block_size=32))
        gemv = quant_panels.prim_func(quant_panels.gemv_vnni_source(
            k=k, n_panels=quant_panels.panel_count(n), n_blocks=n_blocks, block_size=32, symmetric=False))
        lib = tvm.compile(tvm.IRModule({"quantize": quantize.with_attr("global_symbol", "quantize"),
                                        "gemv": gemv.with_attr("global_symbol", "gemv")}), target=target).mod
        xq = [tvm.runtime.tensor(np.zeros((1, c), t), dev) for c, t in ((n_blocks * 32, np.int8),
                                                                        (n_blocks, np.float32), (n_blocks, np.int32))]
        y, xt = tvm.runtime.tensor(np.zeros((1, width), np.float32), dev), tvm.runtime.tensor(x, dev)
        weights = [quant_panels.vnni_panels(packed, 32)] + panels[1:]
        sets = [[tvm.runtime.tensor(np.copy(a), dev) for a in weights] for _ in range(copies)]

        def step(w, q=lib["quantize"], g=lib["gemv"]):
            q(xt, *xq)
            g(*xq, *w, y)

        out["tvm-panels-vnni"] = [lambda w=w: step(w) for w in sets], copies
    return out


def _ort_matmulnbits(packed, scales, zp, k: int, copies: int, threads: int, accuracy_level: int):
    """One session of `copies` MatMulNBits nodes on copies of the same weights, all fed the same
    x: a run computes every copy once (returned as a callable and the copy count)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n, _ = scales.shape
    x = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    inits, nodes, outs = [], [], []
    for i in range(copies):
        inits += [numpy_helper.from_array(np.copy(packed), f"B{i}"), numpy_helper.from_array(scales.reshape(-1), f"scales{i}"),
                  numpy_helper.from_array(zp.reshape(-1), f"zero_points{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"scales{i}", f"zero_points{i}"], [f"y{i}"],
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
                                      accuracy_level=accuracy_level))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    path = Path(tempfile.mkdtemp(prefix="gemv_")) / "gemv.onnx"
    onnx.save(model, str(path), save_as_external_data=True)
    s = session(path, threads)
    return [lambda: s.run(None, x)], copies


def _numpy_reads(nbytes: int, copies: int, threads: int):
    """numpy's maximum over `nbytes` (as float64) split over `threads` threads, one buffer per
    copy (the maximum, as ReadProbe: a sum is limited by its adds, not by the memory)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads)
    per = max(nbytes // 8 // threads, 1)
    sets = [[np.ones(per) for _ in range(threads)] for _ in range(copies)]
    return [lambda bufs=bufs: list(pool.map(np.max, bufs)) for bufs in sets], copies


def gemv_kernels(args) -> dict:
    """One int4 GEMV at a time (see the module docstring): ms and GB/s of the bytes read."""
    from graphopt.backends.tvm.runtime import use_cpu_threads
    from graphopt.ops.quant_format import quantize_blockwise

    use_cpu_threads(args.threads)
    rng = np.random.default_rng(0)
    shapes = {"tiny 64x96": (96, 64)} if args.tiny else GPT2_GEMV_SHAPES
    out = {}
    for name, (n, k) in shapes.items():
        packed, scales, zp = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 4, 32, False)
        nbytes = packed.nbytes + scales.nbytes + zp.nbytes
        copies = 2 if args.tiny else _copies(nbytes)
        fns = _tvm_gemv_kernels(packed, scales, zp, k, copies)
        for level in (4, 0):
            fns[f"ort-matmulnbits-acc{level}"] = _ort_matmulnbits(packed, scales, zp, k, copies, args.threads, level)
        fns["numpy-read"] = _numpy_reads(nbytes, copies, args.threads)
        timing = _time_cycling(fns, args.repeats)
        out[name] = {"bytes": nbytes, "copies": copies,
                     **{v: {"p50_ms": round(p50 * 1e3, 4), "min_ms": round(best * 1e3, 4),
                            "gb_s": round(nbytes / p50 / 1e9, 2)} for v, (p50, best) in timing.items()}}
        print(name, {v: r["gb_s"] for v, r in out[name].items() if isinstance(r, dict)}, file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30, help="timed runs a row (GPT-2 int4 decode: over all rounds)")
    ap.add_argument("--rounds", type=int, default=10,
                    help="GPT-2 int4 decode: rounds of (a read-bandwidth sample, then a block of steps per row)")
    ap.add_argument("--llama-rounds", type=int, default=300,
                    help="interleaved rounds of the Llama-style int4 decode comparison (each a few ms)")
    ap.add_argument("--tvm", action="store_true", help="also build and time the TVM int4 decode artifact")
    ap.add_argument("--skip-prefill", action="store_true", help="only the decode rows (with --tvm: under 8 minutes)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--no-llama", action="store_true",
                    help="skip the Llama-style int4 decode row against onnxruntime-genai's model builder")
    ap.add_argument("--llama-only", action="store_true",
                    help="only the Llama-style int4 decode comparison with the genai builder (3.; with --tvm its TVM table too)")
    ap.add_argument("--gemv-kernels", action="store_true",
                    help="time one int4 GEMV kernel at a time (TVM, ORT MatMulNBits, a numpy read) in GB/s, nothing else")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.seq, args.cached, args.repeats, args.llama_rounds, args.rounds = 16, 16, 3, 5, 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from graphopt.compare.machine import library_versions, machine_record, read_bandwidth

    bandwidth = read_bandwidth(16 << 20 if args.tiny else None, threads=args.threads)
    results = {"threads": args.threads, "batch": 1, "tiny": args.tiny, "machine": machine_record(measure_bandwidth=False),
               "read_bandwidth": bandwidth, "versions": library_versions()}
    if args.gemv_kernels:
        results["gemv_kernels_int4_b32"] = gemv_kernels(args)
        _write(results, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = gpt2_folder(work, args.tiny) if not args.llama_only else None
        if not args.skip_prefill and not args.llama_only:
            results["gpt2_prefill_int8"] = prefill(folder, work, args)
        sections = [("gpt2_decode_int4", lambda: decode(folder, work, args))] if not args.llama_only else []
        if not args.no_llama:
            sections.append(("llama_decode_int4", lambda: llama_decode_int4(work, args)))
            if args.tvm:
                sections.append(("llama_decode_int4_tvm", lambda: llama_decode_int4_tvm(work, args)))
        samples = [bandwidth["read_gb_s"]]
        for name, run in sections:
            before = read_bandwidth(16 << 20 if args.tiny else None, threads=args.threads)["read_gb_s"]
            results[name] = run()
            after = read_bandwidth(16 << 20 if args.tiny else None, threads=args.threads)["read_gb_s"]
            samples += [before, after]
            if "bound" not in results[name]:  # gpt2_decode_int4 measures its bound round by round
                rebound(results[name], max(before, after))
        bandwidth["samples_gb_s"] = samples
    _write(results, args.out)


def rebound(out: dict, gb_s: float) -> None:
    """Each row's bandwidth bound (its weight bytes over `gb_s`) and its time over that bound.
    This machine's read bandwidth moves from minute to minute (33-65 GB/s measured within one
    hour on it), so the bound takes the higher of the readings just before and just after the
    section's timings: the stricter bound, never one flattered by a slow minute."""
    out["read_gb_s"] = gb_s
    out["bandwidth_bound_ms"] = {n: round(b / (gb_s * 1e9) * 1e3, 3) for n, b in out["weight_bytes"].items() if b}
    out["ratio_to_bound"] = {n: round(out["timing"][n]["p50_ms"] / ms, 3)
                             for n, ms in out["bandwidth_bound_ms"].items() if "p50_ms" in out["timing"].get(n, {})}


def _write(results: dict, out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
