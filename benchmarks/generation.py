"""Generation benchmarks (issue 12), side by side in one run, fp32, batch 1.

    python benchmarks/generation.py --threads 2 --out docs/generation_bench.json
    python benchmarks/generation.py --tiny            # a smoke run at toy sizes (no claims)
    python benchmarks/generation.py --llama-only --threads 2   # only 3. (the Llama-style step vs the genai builder)

Measures, with the machine's read bandwidth from the same run (graphopt/compare/machine.py's
`ReadProbe`, on `--threads` threads, from memory):
1. a decode step with `--cached` (128) tokens in the cache on GPT-2 (the `transformers`
   default config, random weights): graphopt's ORT artifact; ORT on a cache-aware export of
   the same model (torch.onnx, TorchScript) optimized by `onnxruntime.transformers.optimizer`;
   graphopt's static-layout artifact stepped the way its Generator runs it (IO binding: past and
   present one buffer, written in place, no cache copy); and the bound that reading the bytes a
   step reads (`step_bytes_read`: the weights it touches, one row of a gathered table, the past
   cache) sets at the measured bandwidth. The rows are timed in `--rounds` rounds of one bandwidth
   sample and a block of steps per row (`bound_rounds`), each block against the higher of the
   samples around its round: the ratio to the bound is the median over rounds, with its spread;
2. prefill at `--cached` tokens on the same model with and without slice-last-token-logits;
3. a decode step with `--cached` tokens on a Llama-style Hugging Face folder (hidden 512, 8
   layers, 8 heads, 2 key/value heads, intermediate 1408, vocab 8192, random weights):
   graphopt's ORT artifact (growing and static cache; the static one also through IO binding,
   as above) and the model onnxruntime-genai's model builder makes from the same folder (fp32,
   cpu), prefilled and stepped by the same harness and timed interleaved (`--llama-rounds`
   rounds, the order rotated each round, each timed step right after an untimed one of the same
   model), with the median per-round speedup over the builder beside the p50/min ratio, and each
   model's op counts after ORT's optimizer (the nodes a step runs);
4. decode tokens/s of a `--new-tokens` (128) greedy generation on the shipped model with torch
   (the checkpoint's own loop), the ORT artifact (Generator with IO binding, and without) and
   (with --tvm) the TVM artifact.
Every decode step is the same call repeated: `session.run`-style feeds of one token over a
cache that prefill filled, the cache of each model in its own layout (the IO-binding rows: the
same one-token step, bound once, its position rewritten in place each repeat).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"p50_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": repeats}


def weight_bytes(artifact_dir: Path) -> int:
    import onnx

    model = onnx.load(str(artifact_dir / "model.onnx"))
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


# Inputs of a gather whose rows a step reads one index at a time (op -> input positions).
ROW_READS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}
GREEDY_ROUNDS = 7  # alternated generations per runner in the greedy table (4.)
GREEDY_PAUSE_S = 0.3  # before each of them


def step_bytes_read(model_path: Path, step: dict) -> dict:
    """The bytes a one-token decode step over `step`'s feeds reads from memory: every
    initializer a node reads in full (a tied LM head's table counts once, in full), one row of a
    table that only gathers read (an embedding: one token, one row), and the past cache of the
    growing layout's `step` (every cached position of every layer, read by attention once).
    Read from the model's header: external data is not loaded."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    full: set[str] = set()
    rows: set[str] = set()
    for node in model.graph.node:
        gathered = ROW_READS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            (rows if i in gathered else full).add(name)
    weights = 0
    for t in model.graph.initializer:
        nbytes = int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if t.name in full:
            weights += nbytes
        elif t.name in rows:
            weights += nbytes // max(t.dims[0], 1) * int(np.asarray(step["input_ids"]).size)
    cache = sum(np.asarray(v).nbytes for k, v in step.items() if k.startswith("past_key_values."))
    return {"weights": weights, "cache": cache, "total": weights + cache}


def gpt2_folder(work: Path, tiny: bool) -> Path:
    import torch
    import transformers as tf

    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=512) if tiny else tf.GPT2Config()
    torch.manual_seed(0)
    folder = work / "gpt2"
    tf.GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    return folder


def llama_folder(work: Path, tiny: bool) -> Path:
    """The issue's Llama-style decoder as a Hugging Face folder, with a tokenizer (the model
    builder saves one beside its model): the shipped model's."""
    import shutil

    import torch
    import transformers as tf

    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=512) if tiny else dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408,
        vocab_size=8192)
    cfg = tf.LlamaConfig(max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, pad_token_id=0, **size)
    torch.manual_seed(0)
    folder = work / "llama"
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    shutil.copyfile(ROOT / "examples" / "default" / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    return folder


def genai_builder_model(folder: Path, work: Path, precision: str = "fp32") -> Path:
    """onnxruntime-genai's model builder on the folder: `precision` (fp32, int4), cpu."""
    import subprocess
    import sys

    out = work / ("genai_builder" if precision == "fp32" else f"genai_builder_{precision}")
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(work / "genai_cache")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"model builder failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return out / "model.onnx"


def gpt2_cache_export(folder: Path, work: Path) -> tuple[Path, dict]:
    """GPT-2 with its KV cache as transformers computes it (positions from the mask), exported
    by torch.onnx with the Optimum / genai I/O names, then optimized by
    `onnxruntime.transformers.optimizer` (model_type gpt2); returns the model and the ops it fused."""
    import collections

    import onnx
    import torch
    import transformers as tf
    from onnxruntime.transformers.optimizer import optimize_model

    model = tf.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    cfg = model.config
    layers, heads, head = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head

    class WithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = tf.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    ids = torch.ones((1, 4), dtype=torch.long)
    past = [torch.zeros((1, heads, 3, head)) for _ in past_names]
    raw = work / "gpt2_cache_raw.onnx"
    # TorchScript export: the graph form onnxruntime.transformers' GPT-2 fusions were written for
    # (on a dynamo export its gpt2 post-processing fails on a bias-less Gemm)
    out_names = ["logits", *[n.replace("past_key_values", "present") for n in past_names]]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total_seq"},
            **{n: {0: "batch", 2: "past_seq"} for n in past_names}, "logits": {0: "batch", 1: "seq"},
            **{n: {0: "batch", 2: "total_seq"} for n in out_names[1:]}}
    torch.onnx.export(WithCache().eval(), (ids, torch.ones((1, 7), dtype=torch.long), *past), str(raw), dynamo=False,
                      input_names=["input_ids", "attention_mask", *past_names], output_names=out_names,
                      dynamic_axes=axes, opset_version=17)
    optimized = optimize_model(str(raw), model_type="gpt2", num_heads=heads, hidden_size=cfg.n_embd,
                               opt_level=1, use_gpu=False, only_onnxruntime=False)
    path = work / "gpt2_cache_ort_optimizer.onnx"
    optimized.save_model_to_file(str(path), use_external_data_format=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return path, dict(ops.most_common())


def disabled_optimizers(path: Path) -> list | None:
    """The ORT optimizers a graphopt artifact's manifest turns off (None for any other model)."""
    manifest = path.parent / "manifest.json"
    disabled = json.loads(manifest.read_text()).get("ort_session", {}).get(
        "disabled_optimizers") if manifest.is_file() else None
    return disabled or None


def session_decode_step(path: Path, cached: int, threads: int, spinning: bool = True):
    """(session, step feeds): prefill `cached` tokens through an ONNX model with the Optimum /
    genai I/O names, with an empty cache in its own layout (a growing one: no positions; a
    static buffer: zeros), and the one-token step after it. A cache dimension the model
    leaves symbolic other than batch and sequence comes from its genai_config.json; a
    graphopt artifact's session settings from its manifest. `spinning=False` for sessions
    that are timed interleaved (live sessions must not spin on each other)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(path))
    names = [i.name for i in sess.get_inputs()]
    ids = np.arange(cached, dtype=np.int64)[None] % 100 + 1
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    config = path.parent / "genai_config.json"
    decoder = json.loads(config.read_text())["model"]["decoder"] if config.is_file() else {}
    known = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            shape = [d if isinstance(d, int) else {0: 1, 2: 0}.get(j, known.get(j)) for j, d in enumerate(i.shape)]
            if any(d is None for d in shape):
                raise RuntimeError(f"{path.name}: cannot tell the shape of {i.name} {i.shape}")
            feeds[i.name] = np.zeros(shape, np.float32)
    extra = sorted(set(names) - set(feeds))
    if extra:
        raise RuntimeError(f"{path.name}: inputs this harness does not feed: {extra}")
    outs = [o.name for o in sess.get_outputs()]
    out = dict(zip(outs, sess.run(outs, feeds)))
    step = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, cached + 1), np.int64)}
    for name in names:
        if name.startswith("past_key_values."):
            step[name] = out[name.replace("past_key_values", "present")]
    return sess, step


def shared_buffer_decode_step(path: Path, cached: int, threads: int, max_positions: int):
    """The way onnxruntime-genai runs a model-builder model whose attention is
    GroupQueryAttention (its `past_present_share_buffer`): each cache one [batch, kv_heads,
    max_positions, head] buffer bound as the past and as the present (IO binding), which
    GroupQueryAttention then writes in place. Prefills `cached` tokens, then returns
    (the one-token step at position `cached` as a callable, its logits as a callable); each
    call rewrites that one position, as the other rows repeat theirs. Session spinning as
    ORT's default (a decode loop's)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    decoder = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
    kv, head = decoder["num_key_value_heads"], decoder["head_size"]
    binding = sess.io_binding()
    binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
    buffers = []
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            buf = np.zeros((1, kv, max_positions, head), np.float32)
            buffers.append(buf)
            binding.bind_cpu_input(i.name, buf)
            binding.bind_output(i.name.replace("past_key_values", "present"), "cpu", 0, np.float32,
                                list(buf.shape), buf.ctypes.data)

    def run(ids, mask, _caches=buffers):  # the binding reads these arrays' memory: all kept alive
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    prompt = np.arange(cached, dtype=np.int64)[None] % 100 + 1
    vocab = run(prompt, np.ones_like(prompt)).shape()[-1]
    logits = np.empty((1, 1, vocab), np.float32)  # a step's, written in place as genai does
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
    step, mask = np.array([[7]], np.int64), np.ones((1, cached + 1), np.int64)

    def logits_of_step():
        run(step, mask)
        return logits.copy()
    return (lambda: run(step, mask)), logits_of_step


def ort_optimized_ops(path: Path, threads: int) -> dict:
    """op type -> count in the graph ORT's optimizer makes of an ONNX model (the nodes a step
    runs), with the session settings the harness uses (a graphopt artifact's from its manifest)."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_optimizers(path))
        nodes = onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
    return dict(collections.Counter(n.op_type for n in nodes).most_common())


def max_abs_diff(sess, feeds: dict, want: dict) -> float:
    """How far a session's decode-step logits are from graphopt's on the same cache: the
    anchors compute the same model, so this is a check that they do."""
    (got,) = sess.run(["logits"], feeds)
    return float(np.abs(got[:, -1] - np.asarray(want["logits"])[:, -1]).max())


def decode_step(artifact, cached: int) -> dict:
    """One decode step over a cache of `cached` positions (the same step repeated)."""
    from graphopt.generation import Generator

    gen = Generator.for_artifact(artifact, io_binding=False)  # a growing cache's feeds, run by artifact.run
    ids = np.arange(cached, dtype=np.int64)[None] % 100 + 1
    prefill = {"input_ids": ids, "attention_mask": np.ones_like(ids), **gen.empty_cache(1)}
    out = artifact.run(prefill)
    step = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, cached + 1), np.int64)}
    for i in range(gen.spec.num_layers):
        step[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        step[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    return {"prefill": prefill, "step": step}


def logits_diff(run, want) -> float:
    """How far a step callable's last logits are from `want` (the same step through a session)."""
    return float(np.abs(np.asarray(run()["logits"])[:, -1] - np.asarray(want)[:, -1]).max())


def bound_static_decode_step(artifact, cached: int):
    """The way graphopt's Generator runs a static-layout artifact, or a growing (BNSH) one whose
    presents GroupQueryAttention computes (`generation.past_present_share_buffer`): through IO
    binding (`artifact.decode_run()`), each cache one buffer that is both past and present (the
    model's every position, as onnxruntime-genai allocates it), the step's position written in
    place (GroupQueryAttention shares the buffer: no cache copy). Prefills `cached` tokens, then
    returns the one-token step at position `cached` as a callable (each repeat rewrites that one
    position: the same work every call, as the other rows repeat theirs)."""
    from graphopt.generation import Generator

    gen = Generator.for_artifact(artifact)
    if gen.spec.layout != "static" and not gen.spec.shared:
        raise ValueError(f"{artifact.path}: kv_layout {gen.spec.layout}, neither static nor shared")
    run = artifact.decode_run(shared=gen.spec.shared)
    ids = np.arange(cached, dtype=np.int64)[None] % 100 + 1
    out = run({"input_ids": ids, "attention_mask": np.ones_like(ids),
               **gen.empty_cache(1, positions=gen.spec.max_positions)})
    step = {"input_ids": np.array([[7]], np.int64), "attention_mask": np.ones((1, cached + 1), np.int64)}
    for i in range(gen.spec.num_layers):
        for kind in ("key", "value"):
            step[f"past_key_values.{i}.{kind}"] = out[f"present.{i}.{kind}"]
    return lambda: run(step)


def anchor(results: dict, key: str, fn) -> None:
    """Run one measurement; an anchor that cannot be built records its error, the rest go on."""
    try:
        results[key] = fn()
    except Exception as e:  # an outside tool's failure is a result of this benchmark, not its end
        results[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print(key, json.dumps(results[key])[:400], flush=True)


def llama_decode(work: Path, args) -> dict:
    """3: a decode step on the Llama-style folder, graphopt's artifacts (BNSH, static, static
    through IO binding) against onnxruntime-genai's model builder, timed interleaved."""
    from quantization import decode_loop_timing, interleaved

    import graphopt

    llama = llama_folder(work, args.tiny)
    table: dict = {}
    steps: dict = {}  # name -> (step callable, logits of that step)
    paths: dict = {}
    for layout in ("BNSH", "static"):
        def graphopt_llama(layout=layout):
            out = work / f"llama_{layout}"
            graphopt.optimize(llama, out, kv_layout=layout)
            paths[f"graphopt_ort_{layout}"] = out / "model.onnx"
            sess, step_feeds = session_decode_step(out / "model.onnx", args.cached, args.threads, spinning=False)
            steps[f"graphopt_ort_{layout}"] = (lambda: sess.run(None, step_feeds),
                                               lambda: sess.run(["logits"], step_feeds)[0])
            return {"weight_bytes": weight_bytes(out)}
        anchor(table, f"graphopt_ort_{layout}", graphopt_llama)

    def llama_static_io_binding():
        run = bound_static_decode_step(graphopt.load(work / "llama_static", threads=args.threads), args.cached)
        steps["graphopt_ort_static_io_binding"] = (run, lambda: np.asarray(run()["logits"]))
        return {}
    anchor(table, "graphopt_ort_static_io_binding", llama_static_io_binding)

    def llama_bnsh_shared():  # the default artifact as its Generator (and genai) drive it
        run = bound_static_decode_step(graphopt.load(work / "llama_BNSH", threads=args.threads), args.cached)
        steps["graphopt_ort_BNSH_shared"] = (run, lambda: np.asarray(run()["logits"]))
        return {}
    anchor(table, "graphopt_ort_BNSH_shared", llama_bnsh_shared)

    def builder():
        path = genai_builder_model(llama, work)
        paths["genai_model_builder"] = path
        sess, step_feeds = session_decode_step(path, args.cached, args.threads, spinning=False)
        steps["genai_model_builder"] = (lambda: sess.run(None, step_feeds),
                                        lambda: sess.run(["logits"], step_feeds)[0])
        return {}
    anchor(table, "genai_model_builder", builder)
    if "graphopt_ort_BNSH" in steps:  # every variant's logits against graphopt's on the same cache
        want = steps["graphopt_ort_BNSH"][1]()
        for name, (_, logits) in steps.items():
            table[name]["logits_max_abs_diff_vs_graphopt"] = float(np.abs(logits()[:, -1] - want[:, -1]).max())
    ref = "genai_model_builder" if "genai_model_builder" in steps else None
    # Each timed step right after an untimed one of the same model (its own weights in the
    # caches, as in its decode loop), the order rotated round by round; the ratio per round.
    timing = interleaved({name: run for name, (run, _) in steps.items()}, args.llama_rounds, warm_calls=1,
                         anchor=ref)
    for name, t in timing.items():
        table[name].update(t)
    for name, path in paths.items():
        table[name]["ops_after_ort_optimizer"] = ort_optimized_ops(path, args.threads)
        table[name]["nodes_after_ort_optimizer"] = sum(table[name]["ops_after_ort_optimizer"].values())
    if ref:
        for name, key in (("graphopt_ort_BNSH", "graphopt_speedup"),
                          ("graphopt_ort_static_io_binding", "graphopt_static_io_binding_speedup")):
            if name in timing:
                table[key] = timing[ref]["p50_ms"] / timing[name]["p50_ms"]
                table[f"{key}_median_round"] = timing[name]["speedup_vs_anchor_median_round"]
    # Again as a decode loop runs them: blocks of consecutive steps on sessions with ORT's
    # default thread spinning (quantization.decode_loop_timing).
    # The static cache through IO binding as graphopt's Generator drives it (graphopt.load's
    # session spins by default).
    loop = {name: session_decode_step(path, args.cached, args.threads) for name, path in paths.items()}
    for name in ("graphopt_ort_static_io_binding", "graphopt_ort_BNSH_shared"):
        if name in steps:
            loop[name] = steps[name][0]
    if "graphopt_ort_static_io_binding" in steps:
        if ref:  # the builder's model as onnxruntime-genai runs it: its caches shared in place too
            max_positions = graphopt.load(work / "llama_static").manifest["generation"]["max_positions"]
            step, logits = shared_buffer_decode_step(paths[ref], args.cached, args.threads, max_positions)
            loop["genai_model_builder_shared_buffer"] = step
            table["genai_model_builder_shared_buffer"] = {
                "logits_max_abs_diff_vs_growing": float(np.abs(logits()[:, -1] - steps[ref][1]()[:, -1]).max())}
    loop_timing = decode_loop_timing(loop, max(5, args.llama_rounds // 10), ref)
    for name, t in loop_timing.items():
        table[name]["decode_loop"] = t
    if ref:
        for name, key in (("graphopt_ort_BNSH", "graphopt_speedup_decode_loop_median_round"),
                          ("graphopt_ort_static_io_binding", "graphopt_static_io_binding_speedup_decode_loop_median_round")):
            if name in loop_timing:
                table[key] = loop_timing[name]["speedup_vs_anchor_median_round"]
        if "genai_model_builder_shared_buffer" in loop_timing:
            for name, key in (("graphopt_ort_static_io_binding", "graphopt_static_io_binding_vs_builder_shared_buffer_decode_loop"),
                              ("graphopt_ort_BNSH_shared", "graphopt_BNSH_shared_vs_builder_shared_buffer_decode_loop")):
                if name in loop_timing:
                    table[key] = round(loop_timing[name]["speedup_vs_anchor_median_round"]
                                       / loop_timing["genai_model_builder_shared_buffer"]["speedup_vs_anchor_median_round"], 3)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50, help="timed steps a row (GPT-2 decode: over all rounds)")
    ap.add_argument("--rounds", type=int, default=10,
                    help="GPT-2 decode: rounds of (a read-bandwidth sample, then a block of steps per row)")
    ap.add_argument("--llama-rounds", type=int, default=300,
                    help="interleaved rounds of the Llama-style decode comparison (each a few ms)")
    ap.add_argument("--tvm", action="store_true", help="also build and run the TVM artifacts")
    ap.add_argument("--llama-only", action="store_true",
                    help="only the Llama-style decode comparison with the genai builder (3.), a few minutes")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        args.cached, args.new_tokens, args.repeats, args.llama_rounds, args.rounds = 16, 8, 3, 5, 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import onnxruntime
    import torch

    import graphopt

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "cached": args.cached, "batch": 1, "dtype": "fp32",
                     "versions": {"graphopt": graphopt.__version__, "onnxruntime": onnxruntime.__version__,
                                  "torch": torch.__version__, "python": platform.python_version()},
                     "machine": platform.processor() or platform.machine()}
    try:
        import onnxruntime_genai

        results["versions"]["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        pass
    from graphopt.compare.machine import bound_rounds, read_bandwidth

    bandwidth = read_bandwidth(32 << 20 if args.tiny else None, threads=args.threads)
    results["read_bandwidth"] = bandwidth
    if args.llama_only:
        with tempfile.TemporaryDirectory() as tmp:
            results["llama_decode_step"] = llama_decode(Path(tmp), args)
        return _write(results, args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        # 1-2: GPT-2
        folder = gpt2_folder(work, args.tiny)
        last = work / "gpt2_last"
        every = work / "gpt2_all"
        graphopt.optimize(folder, last)
        graphopt.optimize(folder, every, logits="all")
        a_last = graphopt.load(last, threads=args.threads)
        a_all = graphopt.load(every, threads=args.threads)
        feeds = decode_step(a_last, args.cached)
        ours, ours_step = session_decode_step(last / "model.onnx", args.cached, args.threads)
        want = ours.run(["logits"], ours_step)[0]
        runs = {"graphopt_ort": lambda: ours.run(None, ours_step)}  # the harness every anchor gets
        reads = {"graphopt_ort": step_bytes_read(last / "model.onnx", ours_step)}
        decode: dict = {"graphopt_ort": {"weight_bytes": weight_bytes(last)}}

        def ort_optimizer():
            path, ops = gpt2_cache_export(folder, work)
            sess, step_feeds = session_decode_step(path, args.cached, args.threads)
            runs["ort_optimizer_cache_export"] = lambda: sess.run(None, step_feeds)
            reads["ort_optimizer_cache_export"] = step_bytes_read(path, step_feeds)
            return {"ops": ops, "logits_max_abs_diff_vs_graphopt": max_abs_diff(sess, step_feeds, {"logits": want})}
        anchor(decode, "ort_optimizer_cache_export", ort_optimizer)

        def static_io_binding():  # graphopt's fastest honest way: as its Generator runs the artifact
            out = work / "gpt2_static"
            graphopt.optimize(folder, out, kv_layout="static")
            run = bound_static_decode_step(graphopt.load(out, threads=args.threads), args.cached)
            runs["graphopt_ort_static_io_binding"] = run
            # the static buffer holds max-seq positions; the step reads the cached ones (the growing step's)
            reads["graphopt_ort_static_io_binding"] = step_bytes_read(out / "model.onnx", ours_step)
            return {"weight_bytes": weight_bytes(out), "logits_max_abs_diff_vs_graphopt": logits_diff(run, want)}
        anchor(decode, "graphopt_ort_static_io_binding", static_io_binding)
        # This machine's read bandwidth moves from minute to minute (33-65 GB/s within one idle
        # hour): the bound is measured round by round between the timings (bound_rounds).
        timed_rounds = bound_rounds(runs, {n: r["total"] for n, r in reads.items()}, rounds=args.rounds,
                                    steps=max(3, args.repeats // args.rounds), threads=args.threads,
                                    buffer_bytes=32 << 20 if args.tiny else None)
        for name in runs:
            decode[name].update({**timed_rounds["timing"][name], "bytes_read": reads[name],
                                 "ratio_to_bound": timed_rounds["ratio_to_bound"][name]})
        ref = timed_rounds["timing"]["graphopt_ort"]["p50_ms"]
        if "ort_optimizer_cache_export" in runs:
            decode["ort_optimizer_cache_export"]["graphopt_speedup"] = (
                timed_rounds["timing"]["ort_optimizer_cache_export"]["p50_ms"] / ref)
        decode["bound"] = {k: timed_rounds[k] for k in ("method", "read_gb_s", "read_gb_s_samples",
                                                          "bound_ms_at_median_bandwidth")}
        results["gpt2_decode_step"] = decode
        results["gpt2_prefill"] = {
            "slice_last_token_logits": timed(lambda: a_last.run(feeds["prefill"]), args.repeats),
            "all_logits": timed(lambda: a_all.run(feeds["prefill"]), args.repeats)}
        p = results["gpt2_prefill"]
        p["speedup"] = p["all_logits"]["p50_ms"] / p["slice_last_token_logits"]["p50_ms"]

        # 3: the Llama-style folder, graphopt vs onnxruntime-genai's model builder, interleaved
        results["llama_decode_step"] = llama_decode(work, args)

        # 4: the shipped model: a greedy generation on every backend
        from graphopt.generation import Generator
        from graphopt.train import load_model

        prompt = [0, 11, 57, 300, 12]
        model, _ = load_model(ROOT / "examples" / "default")

        def torch_greedy():
            with torch.no_grad():
                t = time.perf_counter()
                logits, cache = model.forward_cached(torch.tensor([prompt]), None)
                ttft = time.perf_counter() - t
                t = time.perf_counter()
                for _ in range(args.new_tokens - 1):
                    nxt = int(logits[0, -1].argmax())
                    logits, cache = model.forward_cached(torch.tensor([[nxt]]), cache)
            return ttft, (args.new_tokens - 1) / (time.perf_counter() - t)

        runners = {"torch": torch_greedy}
        for backend in ["ort"] + (["tvm"] if args.tvm else []):
            out = work / f"default_{backend}"
            graphopt.optimize(str(ROOT / "examples" / "default"), out, backend=backend)
            artifact = graphopt.load(out, threads=args.threads)
            # the Generator's own choice (the shipped model's presents are GroupQueryAttention's:
            # shared buffers through IO binding), and ORT's plain growing drive (session.run)
            variants = {backend: None} if backend != "ort" else {"ort": None, "ort_growing": False}
            for name, binding in variants.items():
                gen = Generator.for_artifact(artifact, io_binding=binding)

                def run(gen=gen):
                    r = gen.generate([prompt], args.new_tokens, eos_token_id=-1)
                    return r.ttft_s, r.decode_tokens_per_s
                runners[name] = run
        # One generation per runner a round, GREEDY_ROUNDS rounds alternated (a slow minute
        # then lands on every runner alike), each after a pause in which the last runner's
        # threads stop spinning (torch's OpenMP pool, ORT's and TVM's spin after their work and
        # would otherwise take a core from the next runner); the medians of its time to first
        # token and tok/s.
        samples = {name: [] for name in runners}
        for name, run in runners.items():
            run()  # warm up
        for _ in range(GREEDY_ROUNDS):
            for name, run in runners.items():
                time.sleep(GREEDY_PAUSE_S)
                samples[name].append(run())
        greedy = {name: {"ttft_ms": float(np.median([t for t, _ in v])) * 1e3,
                         "decode_tokens_per_s": float(np.median([r for _, r in v])),
                         "rounds": GREEDY_ROUNDS} for name, v in samples.items()}
        results["default_greedy"] = greedy
    _write(results, args.out)


def _write(results: dict, out: Path | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
