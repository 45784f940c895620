"""Pruning and its recovery on the shipped model: prune examples/default (`graphopt prune`),
score it, recover it by fine-tuning with distillation from the unpruned model (`graphopt
finetune --distill-from`), and score it again -- perplexity on examples/default/val.txt (the
text `graphopt eval` scores; never trained on: fine-tuning reads the stdlib's train split).

    python benchmarks/prune_recovery.py                  # writes benchmarks/results/prune_recovery.md (+ .json)
    python benchmarks/prune_recovery.py --quick          # 2 steps, 4096 tokens scored: a smoke test

The recovery's wall time and steps/s depend on the machine (run it idle); the perplexities
do not. The run folder (--work) is kept: `graphopt optimize WORK/recovered -o out/pruned`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "examples" / "default"
VAL = DEFAULT / "val.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads-ratio", type=float, default=0.5)
    ap.add_argument("--mlp-ratio", type=float, default=0.25)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--distill-alpha", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "prune_recovery")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "prune_recovery.md")
    ap.add_argument("--quick", action="store_true", help="2 steps and 4096 scored tokens (a smoke test)")
    args = ap.parse_args()
    max_tokens = 4096 if args.quick else 0
    steps = 2 if args.quick else args.max_steps

    import torch

    from graphopt.train.finetune import FinetuneConfig, finetune
    from graphopt.train.prune import describe, prune_checkpoint

    torch.set_num_threads(args.threads)
    pruned, run = args.work / "pruned", args.work / "recovery"
    # The perplexities are the ones `graphopt prune` and `graphopt finetune` record in their
    # checkpoints (what `graphopt optimize` reports), on VAL.
    summary = prune_checkpoint(DEFAULT, pruned, args.heads_ratio, args.mlp_ratio, val=VAL, val_tokens=max_tokens)
    print(describe(summary), flush=True)
    before = {k: summary["perplexity"][k] for k in ("unpruned", "pruned")}
    cfg = FinetuneConfig(checkpoint=str(pruned), distill_from=str(DEFAULT), out=str(run), max_steps=steps,
                         batch_size=args.batch_size, lr=args.lr, distill_alpha=args.distill_alpha,
                         eval_interval=max(steps // 4, 1), eval_tokens=8192, checkpoint_interval=max(steps // 4, 1),
                         log_interval=10, threads=args.threads, val=str(VAL), val_tokens=max_tokens)
    t0 = time.perf_counter()
    folder = finetune(cfg, resume=False)
    seconds = time.perf_counter() - t0
    after = json.loads((folder / "config.json").read_text())["finetune"]["perplexity"]["after"]
    (p0, p1), (f0, f1) = summary["parameters"], summary["block_flops_per_token_seq128"]
    record = {
        "heads_ratio": args.heads_ratio, "mlp_ratio": args.mlp_ratio, "parameters": [p0, p1],
        "block_flops_per_token_seq128": [f0, f1], "block_flops_removed": 1 - f1 / f0,
        "perplexity_unpruned": before["unpruned"], "perplexity_pruned": before["pruned"],
        "perplexity_recovered": after, "recovered_vs_unpruned": after / before["unpruned"] - 1,
        "recovery": {"steps": steps, "batch_size": args.batch_size, "seq_len": 256, "lr": args.lr,
                     "distill_alpha": args.distill_alpha, "temperature": cfg.distill_temperature,
                     "threads": args.threads, "wall_s_with_data_prep_and_final_perplexity": seconds, "steps_per_s": steps / seconds},
        "scored_tokens": max_tokens or "all", "torch": torch.__version__, "quick": args.quick,
    }
    lines = [
        "# Pruning and recovery on examples/default", "",
        f"`python benchmarks/prune_recovery.py{' --quick' if args.quick else ''} --heads-ratio {args.heads_ratio} "
        f"--mlp-ratio {args.mlp_ratio} --max-steps {steps} --batch-size {args.batch_size} --lr {args.lr} "
        f"--threads {args.threads}`", "",
        "| model | parameters | block FLOPs/token (seq 128) | perplexity (val.txt) |", "| --- | --- | --- | --- |",
        f"| unpruned | {p0:,} | {f0:,} | {before['unpruned']:.2f} |",
        f"| pruned | {p1:,} | {f1:,} (-{1 - f1 / f0:.1%}) | {before['pruned']:.2f} |",
        f"| pruned + recovery | {p1:,} | {f1:,} | {after:.2f} ({after / before['unpruned'] - 1:+.1%} vs unpruned) |", "",
        f"Recovery: {steps} steps of batch {args.batch_size} x 256 tokens, distillation (T={cfg.distill_temperature}, "
        f"alpha={args.distill_alpha}) from the unpruned model, peak lr {args.lr}, {args.threads} threads: "
        f"{seconds / 60:.1f} min including data preparation and the final perplexity ({steps / seconds:.3f} steps/s).",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
