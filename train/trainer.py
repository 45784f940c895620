"""The trainer: AdamW, linear warm-up then cosine decay, gradient clipping and accumulation,
optional bf16 autocast and activation checkpointing, periodic validation, atomic checkpoints
and exact resumption, data-parallel under `torchrun` (DDP; gloo on CPU, NCCL on GPU).

Reproducibility: the weights start from `seed`, and the batch of step s, micro-step m is
drawn from a generator seeded by (seed, s, m) -- not from a stream that a resume would have
to replay. Each step draws one global batch of `batch_size * world_size` windows and rank r
takes rows [r*B, (r+1)*B), so 2 processes with batch B see exactly the batch that 1 process
with batch 2B sees, and their all-reduced gradients agree.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from graphopt.errors import UserError
from graphopt.fileutil import write_text_atomic

from . import checkpoint as ckpt
from .data import TEXT_SUFFIXES, DataConfig, default_data_dir, load_split, prepare
from .models import build_model, config_from_dict, config_to_dict
from .options import MIN_VOCAB, check_option

# Model shapes by name; vocab_size also sets the tokenizer size.
PRESETS = {
    "tiny": dict(arch="llama", vocab_size=512, max_seq_len=64, dim=64, num_layers=2,
                 num_heads=4, num_kv_heads=2, mlp_hidden=176),
    "small": dict(arch="llama", vocab_size=2048, max_seq_len=128, dim=128, num_layers=4,
                  num_heads=4, num_kv_heads=2, mlp_hidden=352),
    "default": dict(arch="llama", vocab_size=4096, max_seq_len=256, dim=192, num_layers=6,
                    num_heads=6, num_kv_heads=2, mlp_hidden=512),
    "medium": dict(arch="llama", vocab_size=4096, max_seq_len=256, dim=256, num_layers=6,
                   num_heads=8, num_kv_heads=4, mlp_hidden=704),
    "gpt-small": dict(arch="gpt", vocab_size=2048, max_seq_len=128, dim=128, num_layers=4,
                      num_heads=4, mlp_hidden=512),
}


@dataclass
class TrainConfig:
    data: str = ""                  # folder of text files; "" = the interpreter's stdlib
    out: str = "runs/default"
    model: dict = field(default_factory=lambda: dict(PRESETS["default"]))
    batch_size: int = 16            # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 1800            # the shipped default model's run
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None = 5% of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_tokens: int = 65536        # tokens of val.bin scored at each periodic evaluation
    checkpoint_interval: int = 250
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 1337
    bf16: bool = False
    grad_checkpointing: bool = False
    device: str = "auto"            # auto | cpu | cuda
    threads: int = 0                # torch intra-op threads; 0 = torch's default

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{source}: unknown training option(s) {', '.join(unknown)}{_hint(unknown, known)}")
        for name, value in d.items():
            check_option(name, value, source)
        return cls(**d)

    def validate(self, source: str = "training config") -> "TrainConfig":
        for f in fields(self):
            check_option(f.name, getattr(self, f.name), source)
        self.data, self.out = str(self.data), str(self.out)  # a Path is fine; the saved config is JSON
        if self.warmup_steps is None:
            self.warmup_steps = self.max_steps // 20
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise UserError(f"{source}: warmup_steps={self.warmup_steps} must lie in [0, max_steps={self.max_steps}]")
        config_from_dict(self.model)
        vocab = self.model.get("vocab_size")
        if isinstance(vocab, int) and vocab < MIN_VOCAB:
            raise UserError(f"{source}: vocab_size={vocab} is smaller than the byte-level tokenizer's {MIN_VOCAB} "
                            f"base tokens (256 bytes + <|endoftext|>); use --vocab-size {MIN_VOCAB} or more")
        return self


def _hint(unknown: list[str], known: set[str]) -> str:
    """What an unknown option was probably meant to be: a model option (it goes under "model")
    or a near spelling of a known one."""
    import difflib

    from .models import GPTConfig, LlamaConfig

    model = {f.name for c in (GPTConfig, LlamaConfig) for f in fields(c)}
    misplaced = [u for u in unknown if u in model]
    if misplaced:
        return f' ({", ".join(misplaced)}: model options go under "model", as {{"model": {{"{misplaced[0]}": ...}}}})'
    near = {u: difflib.get_close_matches(u, sorted(known | model), n=1) for u in unknown}
    said = [f"{u}: did you mean {m[0]}?" for u, m in near.items() if m]
    return f" ({'; '.join(said)})" if said else ""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): warm-up, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# What a resumed run may be given anew; the schedule and sampling read them from cfg, the
# optimizer state would bring back the run's own lr, weight decay and betas.
_RESUMABLE = ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip",
              "batch_size", "grad_accum", "seed")


def _apply_settings(optimizer, scheduler, cfg: TrainConfig, step: int, saved: dict, rank: int) -> None:
    """This invocation's settings apply to a resumed run, as its checkpoints will record them:
    the restored optimizer and scheduler get this lr, weight decay and betas, and each value
    that differs from the run's is said (unchanged, the resume continues the run exactly)."""
    changed = [f"{k}={getattr(cfg, k)!r} (was {saved[k]!r})" for k in _RESUMABLE
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        _log(rank, "resuming with " + ", ".join(changed))
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for i, group in enumerate(optimizer.param_groups):  # [the decayed matrices, the rest]
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_factor(step, cfg)
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
        group["betas"] = (cfg.beta1, cfg.beta2)


def get_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int,
              micro: int, rank: int = 0, world_size: int = 1):
    """Rank `rank`'s rows of the global batch for (step, micro): inputs and targets."""
    if len(tokens) <= seq_len + 1:
        raise UserError(f"training data has {len(tokens)} tokens, fewer than seq_len+2={seq_len + 2}")
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) % 2**63)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size * world_size,), generator=g)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def lm_loss(model, x, y) -> tuple[torch.Tensor, dict]:
    """The language-model loss (mean next-token cross-entropy) and no other parts."""
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()), {}


def forward_backward(model, batches, bf16: bool, device_type: str, loss_fn=lm_loss) -> tuple[float, dict]:
    """Accumulates gradients of the mean loss over `batches`; returns that loss and the mean
    of each named part `loss_fn` reports beside it.

    Under DDP, gradients are all-reduced only on the last micro-batch (no_sync before it).
    """
    from contextlib import nullcontext

    total, parts = 0.0, {}
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss, named = loss_fn(model, x, y)
            loss = loss / len(batches)
            loss.backward()
        total += loss.item()
        for k, v in named.items():
            parts[k] = parts.get(k, 0.0) + v / len(batches)
    return total, parts


def perplexity_of(loss: float) -> float:
    """exp(loss); past exp's range (a diverged model) inf, not OverflowError (graphopt.accuracy's twin:
    train/ imports no compiler module)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def evaluate_tokens(model, ids, seq_len: int, batch_size: int = 16, device="cpu",
                    bf16: bool = False) -> tuple[float, int]:
    """Summed NLL (nats) and count of predicted tokens over a token stream, scored in
    non-overlapping windows of `seq_len` predictions."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    windows = []
    for start in range(0, len(ids) - 1, seq_len):
        windows.append(ids[start:start + seq_len + 1])
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    device_type = torch.device(device).type
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        by_len: dict[int, list] = {}
        for w in group:  # the last window may be shorter
            by_len.setdefault(len(w), []).append(w)
        for rows in by_len.values():
            rows = torch.stack(rows).to(device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(rows[:, :-1])
            nll += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(),
                                   reduction="sum").item()
            count += rows[:, 1:].numel()
    model.train(was_training)
    return nll, count


def unigram_perplexity(ids) -> float:
    """Perplexity of a unigram model fitted on the very tokens it scores (its best case)."""
    counts = np.bincount(np.asarray(ids)[1:]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- the run

def _setup_distributed(cfg: TrainConfig):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


class Pretraining:
    """What a run trains and how; `train` drives any such task (`finetune.Finetuning` is the
    other one). This one trains a fresh model of `cfg.model` on data it tokenizes with a BPE
    tokenizer it trains itself, every parameter trainable, with the language-model loss."""

    accepts_file = False  # --data must be a folder

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model_config = config_from_dict(cfg.model)

    def prepare_data(self, data_dir: Path, data_out: Path, progress) -> None:
        suffixes = TEXT_SUFFIXES if self.cfg.data else DataConfig.suffixes
        prepare(data_dir, data_out, DataConfig(vocab_size=self.cfg.model["vocab_size"], suffixes=suffixes),
                progress=progress)

    def build_model(self, device: str):
        """The module to train, its initial weights drawn from the run's seed."""
        torch.manual_seed(self.cfg.seed)
        return build_model(self.model_config).to(device)

    def loss(self, model, x, y) -> tuple[torch.Tensor, dict]:
        """The training loss of one micro-batch and named parts of it to log (floats)."""
        return lm_loss(model, x, y)

    def restore(self, model, folder: Path, device: str) -> None:
        """Loads the trainable state that `export` saved into `folder`, for a resume."""
        loaded, _ = ckpt.load_model(folder, device)
        model.load_state_dict(loaded.state_dict())

    def export(self, model):
        """(the plain model a checkpoint stores, {file name: tensors} saved beside it)."""
        return model, {}

    def checkpoint_config(self, final_model=None) -> dict:
        """Sections added to each checkpoint's config.json; `final_model` (the exported model)
        is given for the run's last checkpoint only."""
        return {}


def train(cfg: TrainConfig, resume: bool = True, stop_after: int | None = None,
          stop_at_step: int | None = None, task=None) -> Path:
    """Runs (or resumes) a training run into cfg.out; returns the last checkpoint folder.

    `task` says what is trained (default `Pretraining(cfg)`). `stop_at_step` ends the run
    early, with a checkpoint, after that step; the schedule still spans cfg.max_steps, so
    resuming later continues the same run. `stop_after` ends the process after that many
    steps of this invocation as if killed (for tests)."""
    cfg.validate()
    if stop_at_step is not None and not 0 < stop_at_step <= cfg.max_steps:
        raise UserError(f"--stop-at-step {stop_at_step}: must lie in [1, max_steps={cfg.max_steps}]")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = task or Pretraining(cfg)
    out = Path(cfg.out)
    data_dir = Path(cfg.data) if cfg.data else default_data_dir()
    if not data_dir.is_dir() and not (task.accepts_file and data_dir.is_file()):
        raise UserError(f"--data {data_dir}: not a directory" + (" or a file" if task.accepts_file else ""))
    check_run_folder(out)
    rank, world_size, device = _setup_distributed(cfg)
    device_type = torch.device(device).type
    data_out = out / "data"
    if rank == 0:
        _log(rank, f"preparing data from {data_dir} into {data_out}")
        task.prepare_data(data_dir, data_out, _progress_printer())
    if world_size > 1:
        torch.distributed.barrier()
    meta = json.loads((data_out / "meta.json").read_text())
    if meta.get("vocab_size", 0) > cfg.model["vocab_size"]:
        raise UserError(f"{data_out / 'tokenizer.json'}: the tokenizer has {meta['vocab_size']} tokens, more than the "
                        f"model's vocab_size={cfg.model['vocab_size']}; use --vocab-size {meta['vocab_size']} or another --out")
    train_tokens, val_tokens = load_split(data_out, "train"), load_split(data_out, "val")

    model_cfg = task.model_config
    model = task.build_model(device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    start_step = 0
    latest = out / "checkpoints" / "latest"
    if resume and latest.is_file():
        folder = ckpt.resolve_checkpoint(out)
        saved = ckpt.read_config(folder)
        if saved["model"] != config_to_dict(model_cfg):
            raise UserError(f"{folder}: model config differs from this run's; use another --out")
        task.restore(model, folder, device)
        state = ckpt.load_training_state(folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        _log(rank, f"resumed from {folder} at step {start_step}")
        _apply_settings(optimizer, scheduler, cfg, start_step, saved.get("train") or {}, rank)
        if rank == 0 and (out / "metrics.jsonl").exists():  # drop steps the resume will redo
            kept = read_metrics(out / "metrics.jsonl", lambda msg: _log(rank, msg))
            write_text_atomic(out / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in kept if r["step"] <= start_step))

    if rank == 0 and start_step == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "metrics.jsonl", "")  # a fresh run starts a fresh curve
    ddp_model = model
    if world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device_type == "cuda" else None)

    seq_len = model_cfg.max_seq_len
    n_params = model.num_parameters()
    n_trainable = sum(p.numel() for p in trainable)
    _log(rank, f"model {model_cfg.arch}: {n_params:,} parameters"
               + (f" ({n_trainable:,} trainable)" if n_trainable != n_params else "")
               + f"; {world_size} process(es) on {device}; "
               f"train {len(train_tokens):,} tokens, val {len(val_tokens):,} tokens")
    metrics_path = out / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world_size * seq_len
    last_folder = None
    t0, tokens_since = time.time(), 0
    model.train()
    for step in range(start_step, cfg.max_steps):
        batches = [tuple(t.to(device) for t in get_batch(train_tokens, seq_len, cfg.batch_size, cfg.seed,
                                                         step, m, rank, world_size))
                   for m in range(cfg.grad_accum)]
        loss, parts = forward_backward(ddp_model, batches, cfg.bf16, device_type, task.loss)
        if world_size > 1:  # the logged losses are global means
            t = torch.tensor([loss, *parts.values()], device=device)
            torch.distributed.all_reduce(t)
            loss, *rest = (t / world_size).tolist()
            parts = dict(zip(parts, rest))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += tokens_per_step
        done = step + 1
        record = {"step": done, "loss": loss, **parts, "lr": lr, "grad_norm": grad_norm}
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            nll, count = evaluate_tokens(model, val_tokens[:cfg.eval_tokens + 1], seq_len,
                                         device=device, bf16=cfg.bf16)
            record["val_loss"] = nll / count
            record["val_ppl"] = perplexity_of(nll / count)
        if done % cfg.log_interval == 0 or "val_loss" in record:
            elapsed = time.time() - t0
            msg = (f"step {done}/{cfg.max_steps} | loss {loss:.4f} | "
                   + "".join(f"{k} {v:.4f} | " for k, v in parts.items())
                   + f"lr {record['lr']:.2e} | grad norm {grad_norm:.2f} | {tokens_since / elapsed:,.0f} tok/s")
            if "val_loss" in record:
                msg += f" | val loss {record['val_loss']:.4f} ppl {record['val_ppl']:.2f}"
            _log(rank, msg)
            t0, tokens_since = time.time(), 0
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if done % cfg.checkpoint_interval == 0 or done in (cfg.max_steps, stop_at_step):
            if rank == 0:
                name = f"step_{done:07d}"
                plain, extra_files = task.export(model)
                final = done in (cfg.max_steps, stop_at_step)
                last_folder = ckpt.save_checkpoint(
                    out / "checkpoints" / name, plain,
                    {"model": config_to_dict(model_cfg), "train": asdict(cfg), "step": done,
                     "metrics": {k: v for k, v in record.items() if k != "step"},
                     "data": meta.get("splits"), **task.checkpoint_config(plain if final else None)},
                    data_out / "tokenizer.json", data_out / "val.txt",
                    {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": done},
                    extra_files)
                ckpt.mark_latest(out, name, cfg.keep_checkpoints)
            if world_size > 1:
                torch.distributed.barrier()
        if done == stop_at_step or (stop_after is not None and done - start_step >= stop_after):
            break
    return last_folder or ckpt.resolve_checkpoint(out)


def check_run_folder(out: Path) -> None:
    """`--out` may be missing, empty, or a graphopt run folder; a folder of other files is
    refused (training writes data/, checkpoints/ and metrics.jsonl into it)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if (out / "data").is_dir() or (out / "checkpoints").is_dir() or (out / "metrics.jsonl").is_file():
        return
    raise UserError(f"--out {out}: the folder exists and is not a graphopt training run; give a new or empty folder")


def read_metrics(path: Path, report=print) -> list[dict]:
    """The records of a metrics.jsonl. A last line cut short (a kill while it was written) is
    dropped and reported; a bad line anywhere else is a one-line `UserError`."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            if i == len(lines) - 1:
                report(f"{path}: dropped a partial last line (the previous run was interrupted while writing it)")
                break
            raise UserError(f"{path}: line {i + 1} is not a metrics record; fix or delete the file to resume") from None
        records.append(record)
    return records


def _progress_printer():
    last = {}

    def progress(stage: str, i: int, n: int) -> None:
        # One line per stage at 0%, every 25%, and 100%, so logs stay short.
        pct = int(100 * i / max(n, 1)) // 25 * 25
        if last.get(stage) != pct:
            last[stage] = pct
            print(f"  {stage}: {i}/{n}", flush=True)

    return progress
