"""Greedy generation on decoder families no anchor runtime takes, side by side in one run, batch 1.

    python benchmarks/families.py --threads 2 --out benchmarks/results/families_decode.json
    python benchmarks/families.py --tiny          # a smoke run at toy sizes (no claims)

For each family a Hugging Face folder of the Llama benchmark's sizes where the family has them
(hidden 512, 8 layers, 8 heads of 64, vocab 8192; random weights, seed 0):

- bloom: ALiBi, attention on the heads merged into the batch (bmm), positions from the mask;
- mpt: ALiBi added before a masked fill, no biases;
- falcon: rotary, one key/value head, Q, K and V interleaved in one projection;
- gpt_neox (Pythia): a partial rotary (a quarter of each head), Q, K and V interleaved per head;
- xglm: sinusoidal positions, the bmm form with the softmax on the merged heads;
- gptj: a partial rotary of pairs (x[2i], x[2i+1]) on [batch, seq, heads, head], from a sin/cos table;
- cohere: a rotary of pairs over the whole head, key/value heads grouped (2 per 8 query heads).

Where `split-interleaved-heads` changes the graph (BLOOM, Falcon, GPT-NeoX: Q, K and V interleaved
head by head), the default artifact is also built without it (`graphopt-ort-4d`: the same pipeline less
that pass; its attention stays 4-D), to measure what the pass gives. Where `fuse-rotary` takes a rotary of pairs (GPT-J, Cohere: left
as elementwise ops before 2026-12-06), it is also built without `fuse-rotary` (`graphopt-ort-unfused-rotary`).

onnxruntime-genai's model builder knows none of them, and Optimum's exporter needs a
transformers older than the one installed, so the anchor is what a user of transformers has:
the model in eager mode, greedy with its DynamicCache, the loop written out (benchmarks/moe.py's
`torch_greedy`). The rows: that, graphopt's default ORT artifact (fp32), the same with
`--quantize int4` (RTN, block 32) and graphopt's TVM artifact (fp32). Greedy generation of
`--new-tokens` (128) after a 32-token prompt: time to first token and decode tokens/s, one
generation per runner a round, `--rounds` rounds alternated with a pause between runners
(median); the fp32 runners must produce PyTorch's tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/moe.py

PAUSE_S = 0.3
FAMILIES = {
    "bloom": ("BloomForCausalLM", lambda h, n, L, v: dict(hidden_size=h, n_head=n, n_layer=L, vocab_size=v)),
    "mpt": ("MptForCausalLM", lambda h, n, L, v: dict(d_model=h, n_heads=n, n_layers=L, vocab_size=v, max_seq_len=2048)),
    "falcon": ("FalconForCausalLM", lambda h, n, L, v: dict(hidden_size=h, num_attention_heads=n, num_hidden_layers=L,
                                                             vocab_size=v, new_decoder_architecture=False,
                                                             multi_query=True, max_position_embeddings=2048)),
    "gpt_neox": ("GPTNeoXForCausalLM", lambda h, n, L, v: dict(hidden_size=h, num_attention_heads=n,
                                                                num_hidden_layers=L, intermediate_size=4 * h,
                                                                vocab_size=v, max_position_embeddings=2048)),
    "xglm": ("XGLMForCausalLM", lambda h, n, L, v: dict(d_model=h, attention_heads=n, num_layers=L, ffn_dim=4 * h,
                                                         vocab_size=v, max_position_embeddings=2048)),
    "gptj": ("GPTJForCausalLM", lambda h, n, L, v: dict(n_embd=h, n_head=n, n_layer=L, rotary_dim=h // n // 4,
                                                         vocab_size=v, n_positions=2048)),
    "cohere": ("CohereForCausalLM", lambda h, n, L, v: dict(hidden_size=h, num_attention_heads=n, num_key_value_heads=n // 4,
                                                             num_hidden_layers=L, intermediate_size=1408, vocab_size=v,
                                                             max_position_embeddings=2048)),
}


def family_folder(family: str, work: Path, tiny: bool) -> Path:
    import torch
    import transformers

    cls_name, config = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    sizes = (64, 4, 2, 256) if tiny else (512, 8, 8, 8192)
    torch.manual_seed(0)
    model = cls(cls.config_class(**config(*sizes))).eval()
    folder = work / family
    model.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    ap.add_argument("--no-tvm", action="store_true", help="skip the TVM artifacts")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, to check that the script runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import onnxruntime
    import torch
    import transformers

    import graphopt
    from graphopt.driver import default_pipeline
    from graphopt.generation import Generator
    from moe import torch_greedy

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "batch": 1, "prompt_tokens": 32, "new_tokens": args.new_tokens,
                     "rounds": args.rounds, "tiny": args.tiny, "load_average_at_start": list(os.getloadavg()),
                     "versions": {"graphopt": graphopt.__version__, "onnxruntime": onnxruntime.__version__,
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "python": platform.python_version()},
                     "machine": platform.machine(), "families": {}}
    if not args.no_tvm:
        import tvm

        results["versions"]["tvm"] = tvm.__version__
    prompt = list(range(1, 33))
    for family in args.families.split(","):
        if family not in FAMILIES:
            raise SystemExit(f"--families: unknown family {family!r} (known: {', '.join(FAMILIES)})")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            folder = family_folder(family, work, args.tiny)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            arts = {"graphopt-ort": work / "ort", "graphopt-ort-int4": work / "ort_int4"}
            graphopt.optimize(folder, arts["graphopt-ort"])
            graphopt.optimize(folder, arts["graphopt-ort-int4"], quantize="int4")
            report = json.loads((arts["graphopt-ort"] / "report.json").read_text())
            if any(r["name"] == "split-interleaved-heads" and r["changed"] for r in report["passes"]):
                arts["graphopt-ort-4d"] = work / "ort_4d"
                graphopt.optimize(folder, arts["graphopt-ort-4d"], passes=default_pipeline().replace(
                    "split-interleaved-heads,", "") + ",rewrite-kv-cache,slice-last-token-logits")
            if any(r["name"] == "fuse-rotary" and (r.get("stats") or {}).get("rotary-interleaved") for r in report["passes"]):
                arts["graphopt-ort-unfused-rotary"] = work / "ort_unfused_rotary"
                graphopt.optimize(folder, arts["graphopt-ort-unfused-rotary"], passes=default_pipeline().replace(
                    "fuse-rotary,", "") + ",rewrite-kv-cache,slice-last-token-logits")
            if not args.no_tvm:
                arts["graphopt-tvm"] = work / "tvm"
                graphopt.optimize(folder, arts["graphopt-tvm"], backend="tvm")
            runners = {"torch": lambda: torch_greedy(model, prompt, args.new_tokens)}
            for name, path in arts.items():
                artifact = graphopt.load(path, threads=args.threads)
                assert "kv_layout" in artifact.manifest.get("generation", {}), (family, name, "not generation-ready")
                gen = Generator.for_artifact(artifact)

                def run(gen=gen):
                    r = gen.generate([prompt], args.new_tokens, eos_token_id=-1)
                    return r.ttft_s, r.decode_tokens_per_s, r.tokens[0]
                runners[name] = run
            tokens = {name: run()[2] for name, run in runners.items()}  # and a warm-up
            samples: dict = {name: [] for name in runners}
            for _ in range(args.rounds):
                for name, run in runners.items():
                    time.sleep(PAUSE_S)
                    samples[name].append(run()[:2])
            rows = {name: {"ttft_ms": round(float(np.median([t for t, _ in v])) * 1e3, 2),
                           "decode_tokens_per_s": round(float(np.median([r for _, r in v])), 1),
                           "same_tokens_as_torch": tokens[name] == tokens["torch"]} for name, v in samples.items()}
            for row in rows.values():
                row["speedup_vs_torch"] = round(row["decode_tokens_per_s"] / rows["torch"]["decode_tokens_per_s"], 3)
            bad = [n for n, r in rows.items() if not r["same_tokens_as_torch"] and "int4" not in n]
            if bad:
                raise SystemExit(f"{family}: greedy tokens differ from torch's: {bad}")
            results["families"][family] = {"model": {k: v for k, v in model.config.to_dict().items()
                                                     if isinstance(v, int) and not isinstance(v, bool)
                                                     and not k.endswith("token_id")},
                                           "greedy": rows}
            print(family, json.dumps(rows), flush=True)
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
