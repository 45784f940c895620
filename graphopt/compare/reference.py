"""The eager fp32 PyTorch model behind a MODEL argument: the reference every accuracy
column is measured against, and the `torch` backend's own column."""
from __future__ import annotations

import json
from pathlib import Path

from graphopt.frontends import _read_config, huggingface, training
from graphopt.train import load_model
from graphopt.train.checkpoint import resolve_checkpoint



class TorchModel:
    """An eval-mode module called with the graph's inputs by name; returns the first output."""

    def __init__(self, module, input_names: list[str], kind: str, source: str, config: dict | None = None):
        self.module = module
        self.input_names = input_names
        self.kind = kind          # "decoder" (logits) or "encoder" (last hidden state)
        self.source = source
        self.config = config or {}

    def __call__(self, feeds):
        import torch

        args = [torch.from_numpy(feeds[n]) for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.numpy()

    def parameter_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if t.data_ptr() in seen:
                continue  # tied weights count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


def load_reference(source: str | Path) -> TorchModel | None:
    """The PyTorch model for `source` (a graphopt training checkpoint or a Hugging Face
    folder), or None for sources that have no PyTorch model (.onnx, .gir)."""
    path = Path(source)
    if training.is_run_folder(path):
        path = resolve_checkpoint(path)  # its latest checkpoint, the one the export reads
    if not path.is_dir() or not (path / "config.json").is_file():
        return None

    config = _read_config(path / "config.json")
    if training.is_training_config(config):
        model, cfg = load_model(path)
        # a pruned config (its own head_dim, or sizes per layer) has no one head count and width
        # for ORT's optimizer: 0 lets it read them from the graph
        uniform = getattr(cfg, "head_dim", None) is None and not getattr(cfg, "per_layer", None)
        info = {"num_heads": cfg.num_heads if uniform else 0, "hidden_size": cfg.dim if uniform else 0,
                "vocab_size": cfg.vocab_size,
                "max_seq_len": cfg.max_seq_len, "family": getattr(cfg, "arch", "llama")}
        return TorchModel(model.eval(), ["input_ids"], "decoder", str(path), info)
    if huggingface.is_hf_config(config):
        module, output = huggingface.load_hf_module(path, config)
        cfg = module.config
        info = {"num_heads": getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None),
                "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
                "vocab_size": getattr(cfg, "vocab_size", None), "max_seq_len": huggingface._max_positions(cfg),
                "family": cfg.model_type}
        wrapper = huggingface._wrapper_class()(module, output).eval()
        kind = "decoder" if output == "logits" else "encoder"
        # the same inputs as the export: BERT-like encoders take the segment ids too
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if huggingface.takes_token_type_ids(
            module, output) else [])
        return TorchModel(wrapper, names, kind, str(path), info)
    return None


def artifact_source(folder: Path) -> str | None:
    """The model an artifact folder was optimized from (its report.json), if still there."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    src = report.get("model") if isinstance(report, dict) else None
    return src if isinstance(src, str) and src and Path(src).exists() else None

