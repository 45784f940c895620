"""Mixture-of-experts generation, side by side in one run, batch 1.

    python benchmarks/moe.py --threads 2 --out benchmarks/results/moe_decode.json
    python benchmarks/moe.py --family gpt_oss --threads 2 --out benchmarks/results/moe_decode_gpt_oss.json
    python benchmarks/moe.py --tiny          # a smoke run at toy sizes (no claims)

`--family gpt_oss`: a GPT-OSS-style folder of the same sizes (head size 64, attention sinks,
sliding-window layers of 128 between full ones, YaRN rotary, biased experts with the clamped
SwiGLU); torch.onnx does export it (its experts are a loop over the chosen ones), but
onnxruntime-genai's builder needs its MXFP4 checkpoint layout.

A Mixtral-style Hugging Face folder (hidden 512, 4 layers, 8 heads, 2 key/value heads, 8
experts of inner size 1408, top-2, vocab 8192, random weights). No runtime users have today
takes it as it is: the model does not export through torch.onnx (its experts count tokens with
`histc`), and onnxruntime-genai's model builder does not know Mixtral. The rows:

- torch: transformers' own model in eager mode (its default experts implementation), greedy
  with its DynamicCache, the loop written out (no `generate` overhead);
- graphopt ORT: the default artifact, whose experts are one graphopt.MoE a layer run as
  com.microsoft.MoE (only the chosen experts);
- graphopt ORT dense: the same export with graphopt.MoE decomposed before optimize (every
  expert on every token: what a traceable dense rewrite of the experts gives, and the graph
  compare's ort-plain anchor runs);
- graphopt ORT int4 (`--quantize int4`, RTN: graphopt.QuantMoE, run as com.microsoft.QMoE with
  4-bit experts, only the chosen ones) and the same with graphopt.MoE decomposed first (dense:
  every expert a MatMulNBits, what --quant-method gptq / awq give);
- graphopt TVM (only the chosen experts, backends/tvm/moe_panels.py), TVM int4 (graphopt.QuantMoE:
  the chosen experts' 4-bit panels, quant_panels.moe_gemv_source) and TVM int4 dense (graphopt.MoE
  decomposed first: a QuantLinear per expert projection, every expert on every token).

1. A decode step with `--cached` (128) tokens cached: the ORT sessions stepped on the same
   one-token feeds, timed interleaved (`--rounds` rounds, the order rotated, each timed step
   after an untimed one of the same model), median per-round speedup over the dense artifact.
2. Greedy generation of `--new-tokens` (128) after a 32-token prompt: time to first token and
   decode tokens/s, one generation per runner a round, `--greedy-rounds` rounds alternated with
   a pause between runners; all runners must produce torch's tokens (int4 excepted).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

PAUSE_S = 0.3


def mixtral_folder(work: Path, tiny: bool) -> Path:
    import torch
    import transformers as tf

    size = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                num_local_experts=4, vocab_size=512) if tiny else dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        num_local_experts=8, vocab_size=8192)
    cfg = tf.MixtralConfig(num_experts_per_tok=2, max_position_embeddings=1024, **size)
    torch.manual_seed(0)
    folder = work / "mixtral"
    tf.MixtralForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def gpt_oss_folder(work: Path, tiny: bool) -> Path:
    import torch
    import transformers as tf

    size = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_local_experts=4, vocab_size=512) if tiny else dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, num_local_experts=8, vocab_size=8192)
    layers = size["num_hidden_layers"]
    cfg = tf.GptOssConfig(num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=128,
                          layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                          rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                           "rope_theta": 150000.0, "original_max_position_embeddings": 128},
                          **size)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # sinks and biases of a trained model's size, not the initializer's zeros
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("_bias"):
                p.normal_(0, 0.5)
    folder = work / "gpt_oss"
    model.save_pretrained(folder)
    return folder


def dense_artifact(folder: Path, out: Path, **kwargs) -> None:
    import graphopt
    from graphopt.lowering import decompose_graphopt_ops
    from graphopt.models import load_graph

    graph = load_graph(folder)
    assert decompose_graphopt_ops(graph) > 0, "the export holds no graphopt.MoE"
    graphopt.optimize(graph, out, **kwargs)


def torch_greedy(model, prompt: list[int], new_tokens: int):
    """(ttft s, decode tok/s, tokens): transformers' model stepped with its DynamicCache."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        t = time.perf_counter()
        logits = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits
        ttft = time.perf_counter() - t
        tokens = [int(logits[0, -1].argmax())]
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
        return ttft, (new_tokens - 1) / (time.perf_counter() - t), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds of the decode-step timing")
    ap.add_argument("--greedy-rounds", type=int, default=5)
    ap.add_argument("--no-tvm", action="store_true", help="skip the TVM artifact")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--family", choices=("mixtral", "gpt_oss"), default="mixtral")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import onnxruntime
    import torch
    import transformers

    import graphopt
    from graphopt.generation import Generator

    from generation import session_decode_step
    from quantization import interleaved

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "batch": 1, "cached": args.cached, "new_tokens": args.new_tokens,
                     "load_average_at_start": list(os.getloadavg()),
                     "versions": {"graphopt": graphopt.__version__, "onnxruntime": onnxruntime.__version__,
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "python": platform.python_version()},
                     "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = (gpt_oss_folder if args.family == "gpt_oss" else mixtral_folder)(work, args.tiny)
        results["family"] = args.family
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results["model"] = {k: getattr(model.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_local_experts",
            "num_experts_per_tok", "intermediate_size", "vocab_size")}
        results["torch_experts_implementation"] = model.config._experts_implementation
        arts = {"graphopt-ort": work / "ort", "graphopt-ort-dense": work / "ort_dense",
                "graphopt-ort-int4": work / "ort_int4", "graphopt-ort-int4-dense": work / "ort_int4_dense"}
        graphopt.optimize(folder, arts["graphopt-ort"])
        dense_artifact(folder, arts["graphopt-ort-dense"])
        graphopt.optimize(folder, arts["graphopt-ort-int4"], quantize="int4")
        dense_artifact(folder, arts["graphopt-ort-int4-dense"], quantize="int4")
        if not args.no_tvm:
            arts["graphopt-tvm"] = work / "tvm"
            graphopt.optimize(folder, arts["graphopt-tvm"], backend="tvm")
            arts["graphopt-tvm-int4"] = work / "tvm_int4"
            graphopt.optimize(folder, arts["graphopt-tvm-int4"], backend="tvm", quantize="int4")
            arts["graphopt-tvm-int4-dense"] = work / "tvm_int4_dense"
            dense_artifact(folder, arts["graphopt-tvm-int4-dense"], backend="tvm", quantize="int4")
        import onnx
        results["moe_nodes"] = {name: sum(n.op_type in ("MoE", "QMoE") for n in onnx.load(
            str(path / "model.onnx"), load_external_data=False).graph.node)
            for name, path in arts.items() if (path / "model.onnx").is_file()}
        results["accuracy_level"] = {name: graphopt.load(path).manifest.get("quant_accuracy_level")
                                     for name, path in arts.items() if "int4" in name}

        # 1. a decode step, the ORT sessions interleaved
        steps = {}
        for name in ("graphopt-ort", "graphopt-ort-dense", "graphopt-ort-int4", "graphopt-ort-int4-dense"):
            sess, feeds = session_decode_step(arts[name] / "model.onnx", args.cached, args.threads, spinning=False)
            steps[name] = lambda s=sess, f=feeds: s.run(None, f)
        results["decode_step"] = interleaved(steps, args.rounds, warm_calls=1, anchor="graphopt-ort-dense")

        # 2. greedy generation
        prompt = list(range(1, 33))
        runners = {"torch": lambda: torch_greedy(model, prompt, args.new_tokens)}
        for name, path in arts.items():
            gen = Generator.for_artifact(graphopt.load(path, threads=args.threads))

            def run(gen=gen):
                r = gen.generate([prompt], args.new_tokens, eos_token_id=-1)
                return r.ttft_s, r.decode_tokens_per_s, r.tokens[0]
            runners[name] = run
        samples: dict = {name: [] for name in runners}
        tokens = {}
        for name, run in runners.items():
            tokens[name] = run()[2]
        for _ in range(args.greedy_rounds):
            for name, run in runners.items():
                time.sleep(PAUSE_S)
                samples[name].append(run()[:2])
        results["greedy"] = {name: {"ttft_ms": float(np.median([t for t, _ in v])) * 1e3,
                                    "decode_tokens_per_s": float(np.median([r for _, r in v])),
                                    "same_tokens_as_torch": tokens[name] == tokens["torch"],
                                    "leading_tokens_equal_to_torch": next(
                                        (i for i, (a, b) in enumerate(zip(tokens[name], tokens["torch"])) if a != b),
                                        len(tokens["torch"])),
                                    "rounds": args.greedy_rounds} for name, v in samples.items()}
        torch_tps = results["greedy"]["torch"]["decode_tokens_per_s"]
        for row in results["greedy"].values():
            row["speedup_vs_torch"] = round(row["decode_tokens_per_s"] / torch_tps, 3)
        for name, row in results["greedy"].items():  # the int4 runners against one int4 reference
            if "int4" in name:
                row["same_tokens_as_ort_int4"] = tokens[name] == tokens["graphopt-ort-int4"]
        bad = [n for n, r in results["greedy"].items() if not r["same_tokens_as_torch"] and "int4" not in n]
        if bad:
            raise SystemExit(f"greedy tokens differ from torch's: {bad}")
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
