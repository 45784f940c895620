"""Fine-tuning a trained checkpoint: LoRA adapters with the base frozen (or every weight),
knowledge distillation from a teacher checkpoint, or both -- the recovery step after pruning.

It is a task for the trainer (`trainer.train(cfg, task=Finetuning(cfg))`), so a fine-tuning
run has the same loop, schedule, atomic checkpoints, metrics, exact resume and `torchrun`
data parallelism as `graphopt train`. What differs:

- the data is tokenized with the checkpoint's own tokenizer (preparation copies it into
  RUN/data instead of training one); `--data` may be one text file;
- the model starts from the checkpoint; with `lora_rank > 0` only the adapters train;
- the loss is `(1 - alpha) * LM + alpha * T^2 * KL(teacher_T || student_T)` with a teacher;
- each checkpoint stores the merged weights (a plain checkpoint that `graphopt optimize`
  takes) and, with LoRA, `adapter.safetensors` beside them; a resume rebuilds the model from
  the base checkpoint plus that adapter, so it continues the same run exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from graphopt.errors import UserError

from . import checkpoint as ckpt
from .data import TEXT_SUFFIXES, DataConfig, prepare
from .evaluate import same_text, skipped, text_perplexity, text_record, validation_text
from .lora import add_lora, adapter_state, load_adapter, merge_lora, parse_targets
from .trainer import TrainConfig, lm_loss

ADAPTER = "adapter.safetensors"


@dataclass
class FinetuneConfig(TrainConfig):
    checkpoint: str = ""            # the model to start from (checkpoint or run folder)
    lora_rank: int = 0              # 0 = train every weight
    lora_alpha: float | None = None  # None = 2 * rank
    lora_targets: str = "all"
    distill_from: str = ""          # teacher checkpoint; "" = no distillation
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5      # weight of the distillation term (1 = KL only)
    max_steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_interval: int = 50
    checkpoint_interval: int = 50
    out: str = "runs/finetune"
    val: str = ""                   # validation text for the perplexity recorded at the end; "" = CHECKPOINT/val.txt
    val_tokens: int = 0             # score its first N tokens (0 = all)

    def validate(self, source: str = "fine-tuning config") -> "FinetuneConfig":
        if not self.checkpoint:
            raise UserError(f"{source}: no CHECKPOINT to fine-tune")
        self.checkpoint = str(self.checkpoint)
        folder = ckpt.resolve_checkpoint(self.checkpoint)
        self.model = ckpt.read_config(folder)["model"]
        self.distill_from, self.val = str(self.distill_from), str(self.val)
        super().validate(source)
        if self.lora_rank == 0 and (self.lora_alpha is not None or self.lora_targets != "all"):
            raise UserError("--lora-alpha and --lora-targets need --lora-rank R > 0")
        return self


class Finetuning:
    """The trainer task of a fine-tuning run (see the module docstring)."""

    accepts_file = True

    def __init__(self, cfg: FinetuneConfig):
        from .models import config_from_dict

        cfg.validate()
        self.cfg = cfg
        self.base = ckpt.resolve_checkpoint(cfg.checkpoint)
        self.model_config = config_from_dict(cfg.model)
        self.targets = parse_targets(cfg.lora_targets, self.model_config.arch) if cfg.lora_rank else []
        self.alpha = (cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank)
        self.base_config = ckpt.read_config(self.base)
        self.val_text = validation_text("--val", cfg.val, self.base)
        self.teacher = None
        if cfg.distill_from:
            self._check_teacher()

    def _check_teacher(self) -> None:
        try:
            self.teacher_folder = ckpt.resolve_checkpoint(self.cfg.distill_from)
            teacher_cfg = ckpt.read_config(self.teacher_folder)["model"]
        except UserError as e:
            raise UserError(f"--distill-from {self.cfg.distill_from}: {e} (the teacher must be a graphopt.train "
                            "checkpoint)") from None
        if teacher_cfg.get("vocab_size") != self.model_config.vocab_size:
            raise UserError(f"--distill-from {self.cfg.distill_from}: vocab_size {teacher_cfg.get('vocab_size')} "
                            f"differs from the student's {self.model_config.vocab_size}")
        a, b = self.teacher_folder / "tokenizer.json", self.base / "tokenizer.json"
        if not a.is_file() or not b.is_file() or a.read_bytes() != b.read_bytes():
            raise UserError(f"--distill-from {self.cfg.distill_from}: its tokenizer.json differs from "
                            f"{b}'s; teacher and student must share one tokenizer")

    def prepare_data(self, data_dir: Path, data_out: Path, progress) -> None:
        suffixes = TEXT_SUFFIXES if self.cfg.data else DataConfig.suffixes
        prepare(data_dir, data_out, DataConfig(vocab_size=self.model_config.vocab_size, suffixes=suffixes),
                progress=progress, tokenizer=self.base / "tokenizer.json")

    def build_model(self, device: str):
        model, _ = ckpt.load_model(self.base, device)
        torch.manual_seed(self.cfg.seed)
        if self.targets:
            add_lora(model, self.targets, self.cfg.lora_rank, self.alpha)
        if self.cfg.distill_from:
            self.teacher, _ = ckpt.load_model(self.teacher_folder, device)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        return model.to(device).train()

    def loss(self, model, x, y):
        if self.teacher is None:
            return lm_loss(model, x, y)
        logits = model(x).float().flatten(0, 1)
        with torch.no_grad():
            teacher_logits = self.teacher(x).float().flatten(0, 1)
        lm = F.cross_entropy(logits, y.flatten())
        kl = distillation_kl(logits, teacher_logits, self.cfg.distill_temperature)
        t2 = self.cfg.distill_temperature ** 2
        loss = (1 - self.cfg.distill_alpha) * lm + self.cfg.distill_alpha * t2 * kl
        return loss, {"lm_loss": lm.item(), "kl": kl.item()}

    def restore(self, model, folder: Path, device: str) -> None:
        if not self.targets:
            loaded, _ = ckpt.load_model(folder, device)
            model.load_state_dict(loaded.state_dict())
            return
        from safetensors.torch import load_file

        path = folder / ADAPTER
        if not path.is_file():
            raise UserError(f"{path}: missing; this run folder was not a LoRA run (use another --out)")
        load_adapter(model, load_file(str(path), device=device), path)

    def export(self, model):
        if not self.targets:
            return model, {}
        return merge_lora(model), {ADAPTER: adapter_state(model)}

    def checkpoint_config(self, final_model=None) -> dict:
        """The run's options, the base's pruning record (so `graphopt optimize` still reports
        it), and, for the run's last checkpoint (`final_model`), the validation perplexity
        before and after fine-tuning."""
        c = self.cfg
        info = {"base": str(self.base), "lora_rank": c.lora_rank,
                "lora_alpha": self.alpha if c.lora_rank else None, "lora_targets": self.targets,
                "distill_from": c.distill_from or None,
                "distill_temperature": c.distill_temperature if c.distill_from else None,
                "distill_alpha": c.distill_alpha if c.distill_from else None}
        if final_model is not None:
            info["perplexity"] = self.perplexity(final_model)
        pruned = self.base_config.get("pruned")
        return {"finetune": info, **({"pruned": pruned} if isinstance(pruned, dict) else {})}

    def perplexity(self, model) -> dict:
        """{text, sha256, max_tokens, tokens, before, after} on the validation text; "before"
        is the base's, taken from its pruning record when that measured the same text."""
        if self.val_text is None:
            note = skipped(self.base, "--val")
            print(f"perplexity: skipped ({note['skipped']})", flush=True)
            return note
        from .models import config_from_dict

        record = text_record(self.val_text, self.cfg.val_tokens)
        tokenizer = self.base / "tokenizer.json"
        after, tokens = text_perplexity(model, self.model_config, tokenizer, self.val_text, self.cfg.val_tokens)
        earlier = (self.base_config.get("pruned") or {}).get("perplexity") or {}
        if same_text(record, earlier) and earlier.get("pruned") is not None:
            before = earlier["pruned"]
        else:
            base, _ = ckpt.load_model(self.base)
            before, _ = text_perplexity(base, config_from_dict(self.base_config["model"]), tokenizer, self.val_text,
                                        self.cfg.val_tokens)
        print(f"perplexity on {self.val_text} ({tokens:,} tokens): before {before:.2f} -> after {after:.2f}", flush=True)
        return {**record, "tokens": tokens, "before": before, "after": after}


def distillation_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher / T) || softmax(student / T))."""
    return F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    log_target=True, reduction="batchmean")


def finetune(cfg: FinetuneConfig, resume: bool = True, stop_after: int | None = None,
             stop_at_step: int | None = None) -> Path:
    """Runs (or resumes) a fine-tuning run into cfg.out; returns the last checkpoint folder."""
    from .trainer import train

    return train(cfg, resume, stop_after, stop_at_step, task=Finetuning(cfg))


__all__ = ["FinetuneConfig", "Finetuning", "finetune", "distillation_kl"]
