"""onnxruntime-genai's files beside a generation-ready ORT artifact.

onnxruntime-genai (`og.Model(folder)`) reads `genai_config.json`: which file is the decoder,
its input and output names, the cache geometry (layers, key/value heads, head size), the
context length, the special token ids and the search defaults. Its tokenizer
(onnxruntime-extensions) reads `tokenizer.json` plus `tokenizer_config.json`, which a
graphopt.train checkpoint does not have; one is written from what the checkpoint says.

The schema is the one `onnxruntime_genai.models.builder` writes (0.18). The artifact's I/O
names are already genai's, positions come from the attention mask (no `position_ids`), and
the cache is BNSH. `past_present_share_buffer` is true for a static cache and for a growing one
whose presents GroupQueryAttention computes (the manifest's `generation.past_present_share_buffer`)
where one sequence's cache at the full context is at most 1 GiB: genai then binds one
max-length buffer a layer as both, written in place, as it runs its builder's models; false
otherwise (each step's present a new tensor).
"""
from __future__ import annotations

import json
from pathlib import Path

from graphopt.generation import CacheSpec
from graphopt.ir import GRAPHOPT_DOMAIN, Graph

GENAI_CONFIG = "genai_config.json"
GENAI_LAYOUTS = ("BNSH", "static")  # genai's caches: [batch, kv_heads, seq, head], growing or shared
TOKENIZER_CONFIG = "tokenizer_config.json"
# genai runs these decoder-only types through one pipeline (DecoderOnly), which feeds a key
# and a value cache per layer under the names the config lists: the I/O graphopt writes
# (past_key_values.%d.key|value). Any other family is declared "llama", the same pipeline.
# Not "gpt2": genai runs that type through its legacy class, which feeds one combined
# `past_%d` cache per layer and fails on graphopt's artifacts ("Model input was not found").
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo")


def genai_unsupported(graph: Graph, manifest: dict) -> str | None:
    """Why onnxruntime-genai cannot run this artifact, or None. Its config has one key/value
    head count, one head size and one query head count for every layer; a model pruned per
    layer (global scope) has several."""
    sig = {e["name"]: e["shape"] for e in manifest["signature"]["inputs"]}
    caches = {tuple(shape[1::2]) for name, shape in sig.items() if name.startswith("past_key_values.")}
    heads = {int(n.attr("num_heads")) for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN and n.op_type == "Attention"}
    if len(caches) > 1 or len(heads) > 1:
        return ("its layers differ in key/value heads, head size or query heads (pruned per layer); "
                "genai_config.json has one of each for every layer")
    return None


def genai_config(graph: Graph, manifest: dict, model_config: dict | None) -> dict:
    """The `genai_config.json` of an ORT artifact whose manifest has a `generation` section.
    `graph` is the optimized graph (before lowering: its graphopt.Attention nodes say the
    query heads); `model_config` the checkpoint's or Hugging Face folder's config.json."""
    gen = manifest["generation"]
    sig = manifest["signature"]
    inputs = {e["name"]: e for e in sig["inputs"]}
    past = inputs["past_key_values.0.key"]["shape"]  # [batch, kv_heads, past_seq, head] (BNSH)
    kv_heads, head = int(past[1]), int(past[3])
    attention = next(n for n in graph.nodes if n.domain == GRAPHOPT_DOMAIN and n.op_type == "Attention")
    num_heads = int(attention.attr("num_heads"))
    context = int(gen["max_positions"])
    vocab = int(sig["outputs"][0]["shape"][-1])
    # graphopt.train: <|endoftext|> ends a document and starts the next; Hugging Face: the config's,
    # one id or several (genai stops at any of a list, as transformers does). genai refuses an id
    # past the vocabulary (a small model keeping GPT-2's 50256): never sampled, it is left out.
    listed = gen.get("eos_token_id")
    eos = [t for t in (listed if isinstance(listed, list) else [listed]) if isinstance(t, int) and 0 <= t < vocab]
    hf = model_config if isinstance(model_config, dict) and "model_type" in model_config else {}
    bos = hf.get("bos_token_id", (gen.get("prompt_prefix_ids") or eos or [None])[0])
    pad = hf.get("pad_token_id")
    arch = str(hf.get("model_type") or (model_config or {}).get("model", {}).get("arch", ""))
    return {
        "model": {
            "bos_token_id": bos if bos is not None else -1,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest.get("model", "model.onnx"),
                "head_size": head,
                "hidden_size": _hidden_size(model_config) or num_heads * head,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": num_heads,
                "num_hidden_layers": int(gen["num_layers"]),
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,  # []: no token stops it (genai refuses -1)
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "type": genai_type(arch, inputs),
            "vocab_size": vocab,
        },
        "search": {  # greedy, as `graphopt generate` defaults to; a caller sets its own options
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": gen["kv_layout"] == "static" or _share_growing(gen, sig),
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


# genai allocates a shared cache for its max_length (by default the context) at the start: a
# growing cache is shared only while that is at most this much for one sequence
GENAI_SHARED_CACHE_LIMIT = 1 << 30


def _share_growing(gen: dict, sig: dict) -> bool:
    """Whether genai may run a growing (BNSH) cache shared: where GroupQueryAttention computes
    it (`generation.past_present_share_buffer`) and one sequence's cache at the full context
    fits GENAI_SHARED_CACHE_LIMIT (a 128k-context model's would be gigabytes before the first
    token; it grows instead)."""
    if not gen.get("past_present_share_buffer"):
        return False
    spec = CacheSpec.from_signature(sig)
    per_position = sum(h * (k + v) for h, (k, v) in zip(spec.kv_num_heads, spec.head_sizes)) * spec.dtype.itemsize
    return per_position * int(gen["max_positions"]) <= GENAI_SHARED_CACHE_LIMIT


def genai_type(arch: str, inputs: dict) -> str:
    """genai's model type for a decoder of family `arch` whose inputs are `inputs` (by name). The
    type chooses genai's pipeline, and that pipeline must feed the artifact's cache inputs: a
    key and a value per layer (`past_key_values.%d.key|value`, what rewrite-kv-cache writes)
    run in the DecoderOnly pipeline, under the family's own type where genai knows it."""
    if "past_key_values.0.key" not in inputs or "past_key_values.0.value" not in inputs:
        raise ValueError("genai_config.json describes artifacts with past_key_values.%d.key|value inputs")
    return arch if arch in GENAI_TYPES else "llama"


def tokenizer_config(tokenizer_json: Path, manifest: dict) -> dict:
    """A `tokenizer_config.json` for a tokenizer.json that comes without one (graphopt.train's
    byte-level BPE): the class and special tokens onnxruntime-extensions and transformers read.
    The EOS text is looked up among the tokenizer's added tokens (none found: no special tokens)."""
    try:
        added = json.loads(tokenizer_json.read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        added = []  # not a tokenizer this can read: genai's own loader will say so
    gen = manifest["generation"]
    eos = gen.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos  # the end of text, the first of several
    special = next((t.get("content") for t in added if isinstance(t, dict) and eos is not None and t.get("id") == eos),
                   None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(gen["max_positions"]),
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    if special is not None:
        config.update(bos_token=special, eos_token=special, unk_token=special)
    return config


def _hidden_size(model_config: dict | None) -> int | None:
    """The model width from its config (Hugging Face `hidden_size`, graphopt.train `dim`): after
    head pruning, or with a head size of its own, it is not query heads x head size."""
    if not isinstance(model_config, dict):
        return None
    value = model_config.get("hidden_size", (model_config.get("model") or {}).get("dim"))
    return int(value) if isinstance(value, int) else None


def write_genai_files(graph: Graph, manifest: dict, folder: Path, model_config: dict | None) -> list[str]:
    """Write genai_config.json (and tokenizer_config.json where the tokenizer has none) into
    an ORT artifact folder; returns the names written."""
    written = [GENAI_CONFIG]
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(graph, manifest, model_config), indent=2) + "\n")
    if (folder / "tokenizer.json").is_file() and not (folder / TOKENIZER_CONFIG).is_file():
        config = tokenizer_config(folder / "tokenizer.json", manifest)
        (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        written.append(TOKENIZER_CONFIG)
    return written
