"""`compare --generate N`: time to first token and decode tokens/s of every backend x variant.

Every cell runs the same loop, `graphopt.generation.Generator`, greedy, on the same prompts,
for exactly N new tokens (no EOS stop, so every cell does the same work):

- graphopt's variants on ort/tvm: the generation-ready artifact `graphopt optimize` builds with
  the same options as the cell's full-sequence one (KV cache, last-token logits); an ORT
  artifact runs in a session with compare's settings (`variants.ort_settings`), its cache
  shared between past and present where GroupQueryAttention computes it, as
  `Generator.for_artifact` runs it (`BuildContext.artifact_decode_run`);
- torch/fp32: eager PyTorch with its own cache (a graphopt.train model's `forward_cached`, a
  Hugging Face model's `past_key_values`), behind the same `run(feeds) -> outputs` the
  Generator drives. Its cache stays torch's own object between steps; the Generator only
  passes it back.

The cells take turns round by round (the starting cell rotating), one untimed generation each
first, so drift of the machine lands on every cell alike; each measure is the median over the
rounds. The greedy tokens are compared with torch's: `same_tokens` counts how many of the
first new tokens agree (an fp32 cell should agree on all N).
"""
from __future__ import annotations

import statistics

import numpy as np

from graphopt.compare.timing import describe
from graphopt.compare.variants import BuildContext
from graphopt.errors import UserError
from graphopt.generation import CacheSpec, Generator
from graphopt.manifest import read_manifest

HOW = ("greedy generation of exactly N new tokens with graphopt.generation.Generator on every cell (torch: eager "
       "with its own KV cache); ttft: prefill + first token; decode tokens/s: the later N-1 tokens of every row "
       "over their time; medians over rounds in which the cells take turns")


def artifact_generator(ctx: BuildContext, path) -> Generator:
    """A Generator over a generation-ready artifact, run with compare's session settings."""
    run, shared = ctx.artifact_decode_run(path)
    manifest = read_manifest(path)
    gen = manifest.get("generation") or {}
    spec = CacheSpec.from_signature(manifest["signature"], gen.get("max_positions"), gen.get("kv_layout", "BNSH"))
    spec.shared = shared  # a growing cache fed as one buffer a layer, written in place (as Generator.for_artifact)
    return Generator(run, spec)


def torch_generator(ref) -> Generator:
    """A Generator over the eager PyTorch reference, with the model's own KV cache."""
    import torch

    module = ref.module
    if hasattr(module, "forward_cached"):  # a graphopt.train model: a list of (k, v) tensors per layer
        layers = len(module.blocks)

        def run(feeds):
            past = feeds["past_key_values.0.key"]
            cache = None if isinstance(past, np.ndarray) else [
                (feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]) for i in range(layers)]
            with torch.inference_mode():
                logits, cache = module.forward_cached(torch.from_numpy(feeds["input_ids"]), cache)
            out = {"logits": logits.numpy()}
            for i, (k, v) in enumerate(cache):
                out[f"present.{i}.key"], out[f"present.{i}.value"] = k, v
            return out
    elif hasattr(module, "model") and ref.kind == "decoder":  # Hugging Face: its Cache object, passed whole
        import inspect

        layers = 1
        hf = module.model
        # transformers 5.x names the argument `cache` (`past_key_values` is deprecated there)
        cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

        def run(feeds):
            past = feeds["past_key_values.0.key"]
            with torch.inference_mode():
                out = hf(input_ids=torch.from_numpy(feeds["input_ids"]),
                         attention_mask=torch.from_numpy(feeds["attention_mask"]), use_cache=True,
                         **{cache_arg: None if isinstance(past, np.ndarray) else past})
            cache = getattr(out, cache_arg)
            return {"logits": out.logits.numpy(), "present.0.key": cache, "present.0.value": None}
    else:
        raise UserError("no eager generation for this PyTorch model")
    # Only the layer count and the mask's dtype matter: the empty cache only says "no past".
    spec = CacheSpec(layers, [1] * layers, [(1, 1)] * layers, np.dtype(np.float32), np.dtype(np.int64),
                     ref.config.get("max_seq_len"))
    return Generator(run, spec)


def time_generation(generators: dict[str, Generator], prompts: list[list[int]], new_tokens: int, rounds: int,
                    on_round=None) -> tuple[dict[str, dict], dict[str, str]]:
    """(per cell: ttft and decode tokens/s of every round, their medians, the tokens; errors)."""
    errors: dict[str, str] = {}
    tokens: dict[str, list[list[int]]] = {}
    for name, gen in generators.items():
        try:
            tokens[name] = gen.generate(prompts, new_tokens, eos_token_id=-1).tokens  # untimed warm-up
        except Exception as e:  # noqa: BLE001 - a cell that fails is reported, the others go on
            errors[name] = describe(e)
    live = [n for n in generators if n not in errors]
    samples = {n: {"ttft_ms": [], "decode_tokens_per_s": []} for n in live}
    for rnd in range(rounds):
        for name in live[rnd % max(1, len(live)):] + live[:rnd % max(1, len(live))]:
            if name in errors:
                continue
            try:
                res = generators[name].generate(prompts, new_tokens, eos_token_id=-1)
            except Exception as e:  # noqa: BLE001
                errors[name] = describe(e)
                continue
            samples[name]["ttft_ms"].append(res.ttft_s * 1e3)
            samples[name]["decode_tokens_per_s"].append(res.decode_tokens_per_s if new_tokens > 1 else None)
        if on_round is not None:
            on_round(rnd + 1)
    out = {}
    for name in live:
        if name in errors:
            continue
        s = samples[name]
        rates = [r for r in s["decode_tokens_per_s"] if r is not None]
        out[name] = {"ttft_ms": statistics.median(s["ttft_ms"]),
                     "decode_tokens_per_s": statistics.median(rates) if rates else None,
                     "samples": s, "tokens": tokens[name]}
    return out, errors


def same_tokens(got: list[list[int]], want: list[list[int]]) -> int:
    """How many leading new tokens agree, in the row that agrees least."""
    counts = []
    for g, w in zip(got, want):
        n = 0
        while n < min(len(g), len(w)) and g[n] == w[n]:
            n += 1
        counts.append(n)
    return min(counts) if counts else 0
