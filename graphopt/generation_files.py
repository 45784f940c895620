"""What a generation-ready artifact carries besides its model: the manifest's `generation`
section (cache layout, logits mode, context, EOS ids, the tokenizer), and the tokenizer and
Hugging Face config files copied from the model's folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from graphopt.frontends.training import is_run_folder
from graphopt.generation_text import TRAINING_EOS, is_int, load_tokenizer
from graphopt.passes.kvcache.last_token import META_LOGITS
from graphopt.passes.kvcache.rewrite import (META_BLOCK_SIZE, META_LAYERS, META_LAYOUT, META_MAX_POSITIONS,
                                             META_RECOMPUTE_AT)

# Tokenizer files copied beside a generation-ready artifact when the model folder has them:
# tokenizer.json (tokenizers, onnxruntime-genai) and what transformers' tokenizer classes read
# besides (a SentencePiece model, a chat template saved on its own, added tokens).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")

def generation_manifest(graph, model_path) -> dict | None:
    """The manifest's `generation` section for a graph rewrite-kv-cache made, else None."""
    props = graph.metadata.metadata_props
    if META_LAYOUT not in props:
        return None
    section = {"kv_layout": props[META_LAYOUT], "logits": props.get(META_LOGITS, "all"),
               "num_layers": int(props.get(META_LAYERS, 0)), "max_positions": int(props.get(META_MAX_POSITIONS, 0))}
    if META_BLOCK_SIZE in props:
        section["block_size"] = int(props[META_BLOCK_SIZE])
    if META_RECOMPUTE_AT in props:
        section["recompute_cache_at"] = int(props[META_RECOMPUTE_AT])
    folder = _model_folder(model_path)
    config = model_config(model_path)
    if folder is not None and (folder / "tokenizer.json").is_file():
        section["tokenizer"] = "tokenizer.json"
        if isinstance(config, dict) and str(config.get("format", "")).startswith("graphopt.train"):
            eos = load_tokenizer(folder).token_to_id(TRAINING_EOS)
            if eos is not None:
                section.update(eos_token_id=eos, prompt_prefix_ids=[eos], token_healing=True)
    if "eos_token_id" not in section and isinstance(config, dict):
        eos = model_eos_ids(folder, config)
        if eos:  # one id as an int (as manifests always had it), several as a list
            section["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    return section


def model_eos_ids(folder: Path, config: dict) -> tuple[int, ...]:
    """Every EOS id of a Hugging Face folder, as transformers reads them: generation_config.json's,
    else config.json's (one id or a list; an entry that is not an id is ignored)."""
    gen_cfg = _read_json(folder / "generation_config.json")
    eos = (gen_cfg if isinstance(gen_cfg, dict) and "eos_token_id" in gen_cfg else config).get("eos_token_id")
    return tuple(dict.fromkeys(int(t) for t in (eos if isinstance(eos, list) else [eos]) if is_int(t)))


def copy_tokenizer(model_path, outdir: Path) -> list[str]:
    folder = _model_folder(model_path)
    copied = []
    if folder is None:
        return copied
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, outdir / name)
            copied.append(name)
    return copied


def copy_hf_config(model_path, outdir: Path) -> list[str]:
    """A Hugging Face folder's config.json beside the artifact (Hugging Face Optimum's
    ORTModelForCausalLM reads the model type and sizes from it); nothing for other sources."""
    config = model_config(model_path)
    if config is None or "model_type" not in config:
        return []
    shutil.copyfile(_model_folder(model_path) / "config.json", outdir / "config.json")
    return ["config.json"]


def model_config(model_path) -> dict | None:
    """The config.json of the checkpoint or Hugging Face folder `model_path` names, if any."""
    folder = _model_folder(model_path)
    config = _read_json(folder / "config.json") if folder is not None else None
    return config if isinstance(config, dict) else None


def _model_folder(model_path) -> Path | None:
    """The folder holding the model's config.json and tokenizer: the model's own, a file's
    parent, or a training run folder's latest checkpoint (`checkpoints/latest` names it)."""
    if model_path is None or not isinstance(model_path, (str, Path)):
        return None
    p = Path(model_path)
    if is_run_folder(p):
        name = (p / "checkpoints" / "latest").read_text().strip()
        checkpoint = p / "checkpoints" / name
        # a plain name inside checkpoints/ (the frontend refuses any other before this is asked)
        return checkpoint if name and Path(name).name == name and name != ".." and checkpoint.is_dir() else p
    return p if p.is_dir() else (p.parent if p.exists() else None)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
