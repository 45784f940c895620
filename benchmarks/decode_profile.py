"""Where a one-token decode step's time goes on ORT, op class by op class (issues 12, 13).

    python benchmarks/decode_profile.py --threads 2 --out benchmarks/results/decode_profile.json
    python benchmarks/decode_profile.py --tiny        # toy sizes: checks the script runs (no claims)

Each group below is a set of models of the same network, prefilled with `--cached` tokens and
stepped by benchmarks/generation.py's harness (`session_decode_step`: the same feeds, each
model's cache in its own layout); the models of a group run interleaved, round by round, in
sessions with ORT's profiler on (`SessionOptions.enable_profiling`). For each model: its node
count, the nodes one step executes, the median of `model_run`, and per op class the sum over
its nodes of each node's median kernel time (so one slow round does not count), with how many
nodes of that class ran. The profiler's own cost is in these numbers (`model_run` is a little
above an unprofiled step); compare models with each other, not with generation.py's timings.

Groups:
1. llama-fp32: the Llama-style Hugging Face folder of benchmarks/generation.py: graphopt's ORT
   artifact (fused SkipSimplifiedLayerNormalization, the default for a decoder), the same with the
   residual Add and SimplifiedLayerNormalization split (backend option skip_norm=split, the
   default before), and onnxruntime-genai's model builder (`-p fp32 -e cpu`);
2. llama-int4: graphopt int4 (block 32, RTN) and the model builder's `-p int4`;
3. gpt2-fp32: GPT-2 small (the `transformers` default config, random weights), graphopt's fp32
   artifact with the growing BNSH cache and with the static one (GroupQueryAttention's shared buffer);
4. gpt2-int4: the same, int4 block 32 with the embeddings and the tied LM head quantized
   (benchmarks/quantization.py's row).
For every model also `weight_reads`: per weight-reading op and weight shape (MatMul, Gemm,
MatMulNBits, the gathers), its nodes' time and the GB/s their weight bytes come to, beside
`numpy_read_gb_s`: what numpy reads from memory on the same threads before and after the group.

    python benchmarks/decode_profile.py --threads 2 --groups gpt2-fp32,gpt2-int4 --out benchmarks/results/decode_profile_gpt2.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/generation.py


def profiled_session(path: Path, threads: int, prefix: Path):
    """A non-spinning session on `path` with the profiler on (a graphopt artifact's session
    settings from its manifest)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    manifest = path.parent / "manifest.json"
    disabled = json.loads(manifest.read_text()).get("ort_session", {}).get(
        "disabled_optimizers") if manifest.is_file() else None
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or None)


# Ops that read a weight matrix once a step: their achieved read rate is the decode's bound.
WEIGHT_READERS = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                  "GatherBlockQuantized", "Gather")


def initializer_bytes_by_node(model_path: Path) -> dict[str, tuple[int, list]]:
    """node name -> (bytes of the initializers a one-token step makes it read, the first one's
    shape), from the model's header (external data not loaded): a gather reads one row of its
    table. Nodes ORT fuses get new names: they are not here."""
    import onnx

    from generation import ROW_READS

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {t.name: (int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize,
                      list(t.dims)) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in sizes:  # ORT folds it at load: the copy is the weight
            sizes[node.output[0]] = sizes[node.input[0]]
            continue
        rows = ROW_READS.get(node.op_type, ())
        reads = [(sizes[i][0] // max(sizes[i][1][0], 1), sizes[i][1]) if j in rows else sizes[i]
                 for j, i in enumerate(node.input) if i in sizes]
        if reads:
            out[node.name] = (sum(b for b, _ in reads), reads[0][1])
    return out


def breakdown(profile_file: str, skip: int, weights: dict | None = None) -> dict:
    """The profile of a session's runs, the first `skip` rounds left out. With `weights`
    (initializer_bytes_by_node), also per weight-reading op and weight shape: its nodes' summed
    median time and the GB/s that reading their weights once a step comes to."""
    events = json.loads(Path(profile_file).read_text())
    runs = [e["dur"] for e in events if e.get("name") == "model_run"][skip:]
    per_node: dict[str, list[int]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = e["args"]["op_name"]
    classes: dict[str, dict] = {}
    shapes: dict[str, dict] = {}
    for name, durations in per_node.items():
        us = statistics.median(durations[skip:] or durations)
        c = classes.setdefault(op_of[name], {"nodes": 0, "us": 0.0})
        c["nodes"] += 1
        c["us"] += us
        read = (weights or {}).get(name.removesuffix("_kernel_time"))
        if read and op_of[name] in WEIGHT_READERS:
            sh = shapes.setdefault(f"{op_of[name]} {read[1]}", {"nodes": 0, "us": 0.0, "bytes": 0})
            sh["nodes"] += 1
            sh["us"] += us
            sh["bytes"] += read[0]
    ordered = dict(sorted(((k, {"nodes": v["nodes"], "us": round(v["us"], 1)}) for k, v in classes.items()),
                          key=lambda kv: -kv[1]["us"]))
    out = {"model_run_p50_ms": round(statistics.median(runs) / 1e3, 3), "nodes_executed": len(per_node),
           "kernel_sum_ms": round(sum(v["us"] for v in ordered.values()) / 1e3, 3), "op_classes": ordered}
    if weights:
        out["weight_reads"] = {k: {"nodes": v["nodes"], "ms": round(v["us"] / 1e3, 3), "bytes": v["bytes"],
                                   "gb_s": round(v["bytes"] / max(v["us"], 1e-9) / 1e3, 2)}
                               for k, v in sorted(shapes.items(), key=lambda kv: -kv[1]["us"])}
    return out


def shared_cache_step(sess, step: dict):
    """A zero-argument step over `sess` that runs `step` as graphopt's Generator runs a static
    cache: through IO binding, each present bound to the very buffer its past is fed from, so
    GroupQueryAttention writes the new position in place (a plain `run` gives present its own
    buffer, and the kernel copies the whole max-seq buffer into it every step). A growing cache
    is run plainly: its present is a new, longer tensor."""
    static = any(o.name.startswith("present.") and all(isinstance(d, int) for d in o.shape[1:])
                 for o in sess.get_outputs())
    if not static:
        return lambda: sess.run(None, step)
    feeds = {k: np.ascontiguousarray(v) for k, v in step.items()}
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for o in sess.get_outputs():
        if o.name.startswith("present."):
            buf = feeds[o.name.replace("present", "past_key_values")]
            binding.bind_output(o.name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            binding.bind_output(o.name, "cpu")
    return lambda: sess.run_with_iobinding(binding)


def profile_group(models: dict, args, work: Path) -> dict:
    """name -> model path; each prefilled by the shared harness, then stepped interleaved; the
    machine's read rate (2 threads, from memory) sampled before and after, beside the GB/s of
    each weight-reading op (an op reads a step's weights once: a Gather only its rows)."""
    import onnx

    from generation import session_decode_step
    from graphopt.compare.machine import ReadProbe

    sessions = {}
    for name, path in models.items():
        _, step = session_decode_step(path, args.cached, args.threads, spinning=False)  # the step's feeds
        sess = profiled_session(path, args.threads, work / f"profile_{name}")
        sessions[name] = (sess, shared_cache_step(sess, step))
    warmup = 5
    with ReadProbe(16 << 20 if args.tiny else None, args.threads) as probe:
        read = [probe.sample()]
        for _ in range(warmup + args.repeats):
            for _, step in sessions.values():
                step()
        read.append(probe.sample())
    out = {"numpy_read_gb_s": read}
    for name, (sess, _) in sessions.items():
        nodes = len(onnx.load(str(models[name]), load_external_data=False).graph.node)
        out[name] = {"nodes_in_model": nodes,
                     **breakdown(sess.end_profiling(), warmup, initializer_bytes_by_node(models[name]))}
        print(name, json.dumps(out[name])[:300], flush=True)
    return out


GROUPS = ("llama-fp32", "llama-int4", "gpt2-fp32", "gpt2-int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--groups", default=",".join(GROUPS),
                    help=f"comma-separated groups to profile, of {','.join(GROUPS)} (e.g. --groups gpt2-fp32,gpt2-int4)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    groups = args.groups.split(",")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        ap.error(f"--groups: unknown {', '.join(unknown)} (known: {', '.join(GROUPS)})")
    if args.tiny:
        args.cached, args.repeats = 16, 5
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import graphopt
    from generation import genai_builder_model, gpt2_folder, llama_folder
    from graphopt.compare.machine import library_versions

    int4 = "quantize-weights{bits=4,block-size=32}"
    results: dict = {"threads": args.threads, "cached": args.cached, "batch": 1, "tiny": args.tiny,
                     "versions": library_versions(), "groups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "llama-fp32" in groups or "llama-int4" in groups:
            llama = llama_folder(work, args.tiny)
            fp32 = graphopt.optimize(llama, work / "llama_fp32")
        if "llama-fp32" in groups:
            graphopt.optimize(fp32.graph, work / "llama_fp32_split", backend_options={"skip_norm": "split"})
            results["groups"]["llama-fp32"] = profile_group({
                "graphopt": work / "llama_fp32" / "model.onnx",
                "graphopt-skip-norm-split": work / "llama_fp32_split" / "model.onnx",
                "genai-builder": genai_builder_model(llama, work)}, args, work)
        if "llama-int4" in groups:
            graphopt.optimize(fp32.graph, work / "llama_int4", passes=int4)
            results["groups"]["llama-int4"] = profile_group({
                "graphopt": work / "llama_int4" / "model.onnx",
                "genai-builder": genai_builder_model(llama, work, "int4")}, args, work)
        if "gpt2-fp32" in groups or "gpt2-int4" in groups:
            gpt2 = gpt2_folder(work, args.tiny)
            fp32_models, int4_models = {}, {}
            for layout in ("BNSH", "static"):
                g = graphopt.optimize(gpt2, work / f"gpt2_fp32_{layout}", kv_layout=layout)
                fp32_models[f"graphopt-{layout}"] = work / f"gpt2_fp32_{layout}" / "model.onnx"
                if "gpt2-int4" in groups:
                    graphopt.optimize(g.graph, work / f"gpt2_int4_{layout}",
                                      passes=int4.replace("}", ",embeddings=true}"))
                    int4_models[f"graphopt-{layout}"] = work / f"gpt2_int4_{layout}" / "model.onnx"
            if "gpt2-fp32" in groups:
                results["groups"]["gpt2-fp32"] = profile_group(fp32_models, args, work)
            if "gpt2-int4" in groups:
                results["groups"]["gpt2-int4"] = profile_group(int4_models, args, work)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
