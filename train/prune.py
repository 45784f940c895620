"""Structured pruning of a training checkpoint in torch space: whole key/value groups (with
the query heads that read them) and MLP channels are removed, and the checkpoint is written
with the smaller config, so `graphopt finetune` can recover it and `graphopt optimize` take it.

The rule is the one of the IR passes `prune-heads` and `prune-mlp` (passes/pruning), so both
paths remove the same units (tests/train/test_prune.py checks that the logits agree):

- a unit's importance is the L2 norm of every weight that touches it (magnitude): for a KV
  group its Q, K and V rows and its output-projection columns, for an MLP channel its rows of
  the gate/up (or fc) weight and its column of the down weight; biases do not count;
- or (wanda, structured as Wanda-sp) the summed |W| * ||x|| of the output-side weights the
  unit takes with it: per input column r of the output (down) projection, the L2 norm of its
  activations over the calibration tokens times the L1 norm of that column, summed over a KV
  group's query-head columns (one column for an MLP channel);
- each layer removes floor(ratio * units) of its units, never leaving fewer than `min_keep`
  (`scope="layer"`), or the floor(ratio * all units) lowest scores of the whole model go, no
  layer keeping fewer than `min_keep` (`scope="global"`: layers end up with different sizes);
- the lowest scores go (ties keep the earlier unit), and the kept units keep their order.

train/ may not import the compiler, so these few lines mirror passes/pruning/common.py
rather than call it; the agreement test is what holds the two together.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from graphopt.errors import UserError

from . import checkpoint as ckpt
from .models import build_model, config_to_dict, head_size

IMPORTANCE = ("magnitude", "wanda")
# Calibration windows, as graphopt.calibration cuts them for the IR passes: up to
# CALIBRATION_SAMPLES windows of min(context, CALIBRATION_SEQ_LEN) tokens spread over the
# text, run CALIBRATION_BATCH at a time.
CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN, CALIBRATION_BATCH = 32, 256, 4
SCOPES = ("layer", "global")


@dataclass
class LayerPlan:
    """What one block keeps: its KV groups and MLP channels, as sorted indices."""
    kv_groups: torch.Tensor
    channels: torch.Tensor


def count_to_remove(total: int, ratio: float, min_keep: int) -> int:
    return max(0, min(int(math.floor(ratio * total + 1e-9)), total - max(min_keep, 1)))


def keep_top(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    order = torch.sort(-scores, stable=True).indices
    return torch.sort(order[: len(scores) - n_remove]).values


def global_removals(scores: list[torch.Tensor], ratio: float, min_keep: int) -> list[int]:
    """How many units each layer loses when the floor(ratio * all units) lowest scores of the
    whole model go, no layer keeping fewer than `min_keep`; ties go in layer, then unit order."""
    budget = int(math.floor(ratio * sum(len(s) for s in scores) + 1e-9))
    room = [max(0, len(s) - max(min_keep, 1)) for s in scores]
    removed = [0] * len(scores)
    for _, layer, _ in sorted((float(v), i, u) for i, s in enumerate(scores) for u, v in enumerate(s)):
        if budget == 0:
            break
        if removed[layer] < room[layer]:
            removed[layer] += 1
            budget -= 1
    return removed


def _rows(units: torch.Tensor, width: int, offset: int = 0) -> torch.Tensor:
    """The rows (output features) of `units`, each `width` wide, starting at `offset`."""
    return (offset + units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _attention(block, arch: str):
    """(q, k, v weights [out, in], their biases or None, output weight [dim, inner], query
    heads, KV heads, head width) of a block, whatever its family."""
    d = block.head_dim if arch == "llama" else block.inner // block.num_heads
    if arch == "llama":
        return (block.wq.weight, block.wk.weight, block.wv.weight), (None, None, None), block.wo.weight, \
            block.num_heads, block.num_kv_heads, d
    w, b, n = block.qkv.weight, block.qkv.bias, block.inner
    return w.split(n), (b.split(n) if b is not None else (None,) * 3), block.attn_proj.weight, \
        block.num_heads, block.num_heads, d


def _mlp(block, arch: str):
    """(weights whose rows are the channels, biases sliced with them, down weight [dim, hidden])."""
    if arch == "llama":
        return [block.w_gate.weight, block.w_up.weight], [], block.w_down.weight
    return [block.mlp_fc.weight], [block.mlp_fc.bias], block.mlp_proj.weight


@torch.no_grad()
def group_scores(block, arch: str) -> torch.Tensor:
    (wq, wk, wv), _, wo, nq, nkv, d = _attention(block, arch)
    g = nq // nkv
    sq = torch.zeros(nkv, dtype=torch.float64)
    for j in range(nkv):
        q_rows, kv_rows = _rows(torch.arange(j * g, (j + 1) * g), d), _rows(torch.tensor([j]), d)
        sq[j] = sum((w.double()[rows] ** 2).sum() for w, rows in ((wq, q_rows), (wk, kv_rows), (wv, kv_rows))) \
            + (wo.double()[:, q_rows] ** 2).sum()
    return sq.sqrt()


@torch.no_grad()
def channel_scores(block, arch: str) -> torch.Tensor:
    ups, _, down = _mlp(block, arch)
    sq = sum((w.double() ** 2).sum(dim=1) for w in ups) + (down.double() ** 2).sum(dim=0)
    return sq.sqrt()


@torch.no_grad()
def input_sq_norms(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, the summed squared activations (float64) of each input column of the
    attention-output and MLP-down projections over `windows` [n, seq] of token ids."""
    arch = model.config.arch
    outs = [(b.wo if arch == "llama" else b.attn_proj, b.w_down if arch == "llama" else b.mlp_proj) for b in model.blocks]
    sums = [[torch.zeros(m.in_features, dtype=torch.float64) for m in pair] for pair in outs]
    hooks = []
    for pair, acc in zip(outs, sums):
        for module, total in zip(pair, acc):
            def hook(_, args, total=total):
                x = args[0].detach().double().reshape(-1, total.shape[0])
                total += (x * x).sum(dim=0)
            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(windows), CALIBRATION_BATCH):
            model(windows[i:i + CALIBRATION_BATCH])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [a for a, _ in sums], [m for _, m in sums]


@torch.no_grad()
def group_wanda(block, arch: str, sq_norm: torch.Tensor) -> torch.Tensor:
    _, _, wo, nq, nkv, d = _attention(block, arch)
    per_column = sq_norm.sqrt() * wo.double().abs().sum(dim=0)
    g = nq // nkv
    return torch.stack([per_column[_rows(torch.arange(j * g, (j + 1) * g), d)].sum() for j in range(nkv)])


@torch.no_grad()
def channel_wanda(block, arch: str, sq_norm: torch.Tensor) -> torch.Tensor:
    _, _, down = _mlp(block, arch)
    return sq_norm.sqrt() * down.double().abs().sum(dim=0)


def plan(model, heads_ratio: float, mlp_ratio: float, min_keep: int = 1, scope: str = "layer",
         calibration: torch.Tensor | None = None) -> list[LayerPlan]:
    """What each block keeps; with `calibration` (token windows [n, seq]) the units are scored
    by Wanda, else by magnitude. As in the IR pipeline, where prune-mlp runs after
    prune-heads, Wanda scores the MLP channels on the model with its heads already pruned."""
    arch = model.config.arch

    def removals(scores, ratio):
        if scope == "global":
            return global_removals(scores, ratio, min_keep)
        return [count_to_remove(len(s), ratio, min_keep) for s in scores]

    if calibration is None:
        groups = [group_scores(block, arch) for block in model.blocks]
    else:
        attn_sq, _ = input_sq_norms(model, calibration)
        groups = [group_wanda(block, arch, sq) for block, sq in zip(model.blocks, attn_sq)]
    kv_groups = [keep_top(g, n) for g, n in zip(groups, removals(groups, heads_ratio))]
    if calibration is None:
        channels = [channel_scores(block, arch) for block in model.blocks]
    else:
        all_channels = [torch.arange(_mlp(block, arch)[2].shape[1]) for block in model.blocks]
        heads_pruned = prune_model(model, [LayerPlan(g, c) for g, c in zip(kv_groups, all_channels)])
        _, mlp_sq = input_sq_norms(heads_pruned, calibration)
        channels = [channel_wanda(block, arch, sq) for block, sq in zip(model.blocks, mlp_sq)]
    return [LayerPlan(g, keep_top(c, n)) for g, c, n in zip(kv_groups, channels, removals(channels, mlp_ratio))]


def calibration_windows(folder: Path, cfg, path=None) -> tuple[torch.Tensor, str]:
    """Token windows [n, seq] to score Wanda on, and where they came from: `path` (one text
    file), else -- for a checkpoint trained on the default corpus -- that corpus's training
    documents, never its validation text. Cut as graphopt.calibration cuts them for the IR
    passes."""
    import numpy as np

    from .data import DataConfig, collect_documents, default_data_dir
    from .tokenizer import load_tokenizer

    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder; give a text file" if path.is_dir() else "no such file"
            raise UserError(f"--calibration {path}: {what}")
        if path.suffix in (".jsonl", ".npz"):  # optimize takes these; here the file is read as one text
            raise UserError(f"--calibration {path}: graphopt prune reads one plain text file (not {path.suffix}); "
                            "join the texts into one file")
        try:
            raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError as e:
            raise UserError(f"--calibration {path}: not a UTF-8 text file ({e})") from None
        texts, source = [raw], str(path)
    elif _trained_on_default_corpus(folder):
        docs = [d["text"] for d in collect_documents(default_data_dir(), DataConfig()) if d["split"] == "train"]
        texts, source = docs[::max(1, len(docs) // 64)], f"the training split of {default_data_dir()}"
    else:
        raise UserError(f"--importance wanda: {folder} was not trained on the default corpus, so it has no default "
                        "calibration text; give --calibration FILE (a text file)")
    tok = load_tokenizer(folder / "tokenizer.json")
    ids = np.concatenate([np.asarray(tok.encode(t).ids, np.int64) for t in texts]) if texts else np.zeros(0, np.int64)
    seq = min(cfg.max_seq_len, CALIBRATION_SEQ_LEN)
    n = len(ids) // seq
    if n == 0:
        raise UserError(f"--calibration {source}: {len(ids)} tokens, fewer than one window of {seq}")
    picks = np.linspace(0, n - 1, min(CALIBRATION_SAMPLES, n)).astype(int)  # spread over the text
    return torch.from_numpy(np.stack([ids[i * seq:(i + 1) * seq] for i in picks])), source


def _trained_on_default_corpus(folder: Path) -> bool:
    train = ckpt.read_config(folder).get("train")
    return isinstance(train, dict) and train.get("data") == ""


@torch.no_grad()
def prune_model(model, plans: list[LayerPlan]):
    """A new model of the smaller config with the kept units' weights; `model` is unchanged."""
    cfg, arch = model.config, model.config.arch
    per_layer = []
    for block, p in zip(model.blocks, plans):
        _, _, _, nq, nkv, _ = _attention(block, arch)
        sizes = {"num_heads": len(p.kv_groups) * (nq // nkv), "mlp_hidden": len(p.channels)}
        if arch == "llama":
            sizes["num_kv_heads"] = len(p.kv_groups)
        per_layer.append(sizes)
    if all(s == per_layer[0] for s in per_layer):
        small_cfg = replace(cfg, head_dim=head_size(cfg), per_layer=None, **per_layer[0])
    else:  # the scalar sizes stay the source's; each block reads its own
        small_cfg = replace(cfg, head_dim=head_size(cfg), per_layer=per_layer)
    small_cfg.validate()
    state = {k: v for k, v in model.state_dict().items()}
    for i, (block, p) in enumerate(zip(model.blocks, plans)):
        state.update(_pruned_block_state(block, arch, p, f"blocks.{i}."))
    small = build_model(small_cfg)
    small.load_state_dict(state)
    return small.eval()


def _pruned_block_state(block, arch: str, p: LayerPlan, prefix: str) -> dict:
    (wq, wk, wv), (bq, bk, bv), wo, nq, nkv, d = _attention(block, arch)
    g = nq // nkv
    q_rows = _rows((p.kv_groups[:, None] * g + torch.arange(g)[None, :]).reshape(-1), d)
    kv_rows = _rows(p.kv_groups, d)
    ups, up_biases, down = _mlp(block, arch)
    c = p.channels
    if arch == "llama":
        return {prefix + "wq.weight": wq[q_rows], prefix + "wk.weight": wk[kv_rows], prefix + "wv.weight": wv[kv_rows],
                prefix + "wo.weight": wo[:, q_rows], prefix + "w_gate.weight": ups[0][c],
                prefix + "w_up.weight": ups[1][c], prefix + "w_down.weight": down[:, c]}
    out = {prefix + "qkv.weight": torch.cat([wq[q_rows], wk[kv_rows], wv[kv_rows]]),
           prefix + "attn_proj.weight": wo[:, q_rows], prefix + "mlp_fc.weight": ups[0][c],
           prefix + "mlp_proj.weight": down[:, c]}
    if bq is not None:
        out[prefix + "qkv.bias"] = torch.cat([bq[q_rows], bk[kv_rows], bv[kv_rows]])
    if up_biases[0] is not None:
        out[prefix + "mlp_fc.bias"] = up_biases[0][c]
    return out


def block_flops(cfg, seq: int) -> int:
    """Multiply-add FLOPs per token of all blocks at context `seq`: every projection, plus the
    attention scores and weighted sum over `seq` keys (norms and activations left out)."""
    total = 0
    for i in range(cfg.num_layers):
        c = cfg.layer(i)
        d, nq = head_size(c), c.num_heads
        nkv = getattr(c, "num_kv_heads", nq)
        projections = cfg.dim * d * (2 * nq + 2 * nkv)
        mlp = cfg.dim * c.mlp_hidden * (3 if cfg.arch == "llama" else 2)
        total += 2 * (projections + mlp) + 2 * 2 * seq * nq * d
    return total


def prune_checkpoint(source, out, heads_ratio: float, mlp_ratio: float, min_keep: int = 1,
                     importance: str = "magnitude", scope: str = "layer", seq: int = 128,
                     val=None, val_tokens: int = 0, calibration=None, overwrite: bool = False) -> dict:
    """Writes the pruned checkpoint into `out` (atomically; a folder that is not an earlier
    pruned checkpoint only with `overwrite`); returns the summary it records.

    With a validation text (`val`, default the source's val.txt) the summary's "perplexity"
    holds the unpruned and the pruned model's perplexity on it (the first `val_tokens`
    tokens; 0 = all); without one, why it was skipped. `importance="wanda"` scores on
    `calibration` (a text file; default the checkpoint's training corpus, see
    `calibration_windows`)."""
    from .evaluate import skipped, text_perplexity, text_record, validation_text

    if importance not in IMPORTANCE:
        raise UserError(f"--importance {importance}: must be one of {', '.join(IMPORTANCE)}")
    if calibration is not None and importance != "wanda":
        raise UserError(f"--calibration {calibration}: only --importance wanda reads calibration text")
    if scope not in SCOPES:
        raise UserError(f"--scope {scope}: must be one of {', '.join(SCOPES)}")
    for name, r in (("--heads-ratio", heads_ratio), ("--mlp-ratio", mlp_ratio)):
        if not 0.0 <= r < 1.0:
            raise UserError(f"{name} {r}: must be in [0, 1)")
    if heads_ratio == mlp_ratio == 0.0:
        raise UserError("nothing to prune: give --heads-ratio and/or --mlp-ratio (a fraction in (0, 1))")
    folder = ckpt.resolve_checkpoint(source)
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise UserError(f"--out {out}: is the source checkpoint; give a new folder")
    _check_out(out, overwrite)
    try:
        ckpt.read_config(folder)
    except UserError as e:
        if str(e).endswith("a Hugging Face folder"):  # graphopt prune takes graphopt.train checkpoints
            raise UserError(f"{e}: graphopt optimize MODEL --prune heads=R,mlp=R prunes it") from None
        raise
    text = validation_text("--val", val, folder)
    model, cfg = ckpt.load_model(folder)
    windows, calibrated_on = calibration_windows(folder, cfg, calibration) if importance == "wanda" else (None, None)
    plans = plan(model, heads_ratio, mlp_ratio, min_keep, scope, windows)
    _check_removes_some(model, plans, heads_ratio, mlp_ratio, min_keep, scope)
    small = prune_model(model, plans)
    before, after = block_flops(cfg, seq), block_flops(small.config, seq)
    if text is None:
        perplexity = skipped(folder, "--val")
    else:
        tokenizer = folder / "tokenizer.json"
        unpruned, tokens = text_perplexity(model, cfg, tokenizer, text, val_tokens)
        pruned, _ = text_perplexity(small, small.config, tokenizer, text, val_tokens)
        perplexity = {**text_record(text, val_tokens), "tokens": tokens, "unpruned": unpruned, "pruned": pruned}
    summary = {
        "source": str(folder), "importance": importance, "heads_ratio": heads_ratio, "mlp_ratio": mlp_ratio,
        "min_keep": min_keep, "scope": scope,
        **({"calibration": {"text": calibrated_on, "windows": list(windows.shape)}} if windows is not None else {}),
        "parameters": [model.num_parameters(), small.num_parameters()],
        f"block_flops_per_token_seq{seq}": [before, after],
        "kept": [{"kv_groups": p.kv_groups.tolist(), "mlp_channels": p.channels.tolist()} for p in plans],
        "perplexity": perplexity,
    }
    ckpt.save_checkpoint(out, small, {"model": config_to_dict(small.config), "pruned": summary},
                         folder / "tokenizer.json", folder / "val.txt")
    return summary


def _check_removes_some(model, plans: list[LayerPlan], heads_ratio: float, mlp_ratio: float, min_keep: int,
                        scope: str) -> None:
    """Refuses a plan that removes nothing (it would write a copy of the checkpoint), naming
    why for each ratio given: min-keep keeps every unit, or the ratio rounds down to none."""
    arch = model.config.arch
    units = {"heads": ([len(group_scores(b, arch)) for b in model.blocks], [len(p.kv_groups) for p in plans]),
             "mlp": ([_mlp(b, arch)[2].shape[1] for b in model.blocks], [len(p.channels) for p in plans])}
    if any(sum(before) != sum(after) for before, after in units.values()):
        return
    why = []
    for kind, ratio, noun in (("heads", heads_ratio, "KV groups"), ("mlp", mlp_ratio, "MLP channels")):
        if ratio == 0:
            continue
        have = sorted(set(units[kind][0]))
        sizes = "/".join(map(str, have))
        if min_keep >= max(have):
            why.append(f"--min-keep {min_keep} keeps all {sizes} {noun} of a layer")
        else:
            hint = ("; --scope global counts it over the whole model"
                    if scope == "layer" and math.floor(ratio * sum(units[kind][0]) + 1e-9) >= 1 else "")
            why.append(f"--{kind}-ratio {ratio} of a layer's {sizes} {noun} rounds down to none{hint}")
    raise UserError("nothing to prune: " + "; ".join(why))


# what save_checkpoint writes into a pruned checkpoint
_OUTPUT_FILES = {"model.safetensors", "config.json", "tokenizer.json", "val.txt"}


def _check_out(out: Path, overwrite: bool) -> None:
    """--out may be a new or empty folder, or an earlier output of graphopt prune with nothing
    else in it; any other folder (a trained checkpoint, a run, the user's files) is replaced
    only with --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not entries or overwrite:
        return
    try:
        earlier = "pruned" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        earlier = False
    if earlier and set(entries) <= _OUTPUT_FILES:
        return
    what = ("an earlier pruned checkpoint but also holds " + ", ".join(sorted(set(entries) - _OUTPUT_FILES)[:3])
            if earlier else f"not an earlier output of graphopt prune ({len(entries)} entries in it)")
    raise UserError(f"--out {out}: the folder exists and is {what}; give a new or empty folder, "
                    "or --overwrite to replace it")


def describe(summary: dict, seq: int = 128) -> str:
    (p0, p1), (f0, f1) = summary["parameters"], summary[f"block_flops_per_token_seq{seq}"]
    line = (f"parameters {p0:,} -> {p1:,} (-{1 - p1 / p0:.1%}); "
            f"block FLOPs per token at seq {seq}: {f0:,} -> {f1:,} (-{1 - f1 / f0:.1%})")
    ppl = summary.get("perplexity", {})
    if "skipped" in ppl:
        return line + f"\nperplexity: skipped ({ppl['skipped']})"
    return line + (f"\nperplexity on {ppl['text']} ({ppl['tokens']:,} tokens): "
                   f"unpruned {ppl['unpruned']:.2f} -> pruned {ppl['pruned']:.2f}")


__all__ = ["prune_checkpoint", "prune_model", "plan", "block_flops", "describe"]
