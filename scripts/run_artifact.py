"""Run an optimized artifact on real text and compare it with the PyTorch checkpoint.

    python scripts/run_artifact.py build/demo/default examples/default
"""
from __future__ import annotations

import sys
import time

import numpy as np


def main(artifact_dir: str, checkpoint: str) -> int:
    import torch

    import graphopt
    from graphopt.train import load_model

    artifact = graphopt.load(artifact_dir)
    model, _ = load_model(checkpoint)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{checkpoint}/tokenizer.json")
    ids = np.array([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n").ids], dtype=np.int64)
    feeds = {"input_ids": ids}
    gen = artifact.manifest.get("generation")
    if gen:  # a generation-ready artifact: prefill with an empty KV cache
        from graphopt.generation import CacheSpec, Generator

        spec = CacheSpec.from_signature(artifact.manifest["signature"])
        feeds = {**feeds, "attention_mask": np.ones_like(ids), **Generator(artifact.run, spec).empty_cache(1)}
    t = time.perf_counter()
    out = artifact.run(feeds)
    ms = (time.perf_counter() - t) * 1000
    logits = out["logits"] if "logits" in out else next(iter(out.values()))
    with torch.no_grad():
        want = model(torch.from_numpy(ids))
        want = (want[0] if isinstance(want, tuple) else want).numpy()
    if gen and gen.get("logits") == "last":
        want = want[:, -1:]  # the artifact computes the last position only
    err = float(np.abs(logits - want).max())
    print(f"artifact {artifact_dir}: {ids.shape[1]} tokens in {ms:.1f} ms (first call), "
          f"max |artifact - PyTorch| = {err:.2e}, same next token: {bool((logits.argmax(-1) == want.argmax(-1)).all())}")
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
