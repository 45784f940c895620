"""onnxruntime-genai's files beside a generation-ready ORT artifact.

onnxruntime-genai (`og.Model(folder)`) reads `genai_config.json`: which file is the decoder,
its input and output names, the cache geometry (layers, key/value heads, head size), the
context length, the special token ids and the search defaults. Its tokenizer
(onnxruntime-extensions) reads `tokenizer.json` plus `tokenizer_config.json`, which a
graphopt.train checkpoint does not have; one is written from what the checkpoint says.

The schema is the one `onnxruntime_genai.models.builder` writes (0.18). The artifact's I/O
names are already genai's, positions come from the attention mask (no `position_ids`), and
the growing BNSH cache is genai's default (`past_present_share_buffer` false).
"""
from __future__ import annotations

import json
from pathlib import Path

from graphopt.ir import GRAPHOPT_DOMAIN, Graph

GENAI_CONFIG = "genai_config.json"
GENAI_LAYOUTS = ("BNSH", "static")  # genai's caches: [batch, kv_heads, seq, head], growing or shared
TOKENIZER_CONFIG = "tokenizer_config.json"
# genai runs every decoder-only type through the same pipeline; these are the ones it knows
# that graphopt's frontends produce. Any other decoder is declared "llama", whose pipeline
# needs nothing but the I/O names the config lists.
GENAI_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "granite", "olmo")


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
    vocab = int(sig["outputs"][0]["shape"][-1])
    context = int(gen["max_positions"])
    # graphopt.train: <|endoftext|> ends a document and starts the next; Hugging Face: the config's
    eos = gen.get("eos_token_id")
    hf = model_config if isinstance(model_config, dict) and "model_type" in model_config else {}
    bos = hf.get("bos_token_id", (gen.get("prompt_prefix_ids") or [eos])[0])
    pad = hf.get("pad_token_id")
    arch = str(hf.get("model_type") or (model_config or {}).get("model", {}).get("arch", ""))
    model_type = arch if arch in GENAI_TYPES else ("gpt2" if arch == "gpt" else "llama")
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
            "eos_token_id": eos if eos is not None else -1,  # -1: no token stops it
            "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
            "type": model_type,
            "vocab_size": vocab,
        },
        "search": {  # greedy, as `graphopt generate` defaults to; a caller sets its own options
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": gen["kv_layout"] == "static",
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


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
