"""The two decoder families: a GPT (learned positions, LayerNorm, GELU MLP) and a Llama-style
decoder (RoPE, RMSNorm, SwiGLU, grouped-query attention).

Both take token ids `idx: int64[batch, seq]` and return `logits: f32[batch, seq, vocab_size]`.
`forward` has no cache so it exports as one clean graph; `forward_cached` appends to a
per-layer key/value cache (`k_cache_BNSD`, `v_cache_BNSD`) for eager generation. Attention is
`F.scaled_dot_product_attention` in both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from graphopt.errors import UserError

KVCache = list  # one (k_cache_BNSD, v_cache_BNSD) pair per layer


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    max_seq_len: int = 256
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    mlp_hidden: int = 1024
    dropout: float = 0.0
    tie_embeddings: bool = True
    arch: str = "gpt"
    head_dim: int | None = None     # None = dim // num_heads
    per_layer: list | None = None   # per-block overrides of num_heads / mlp_hidden (a pruned model)

    def validate(self) -> "GPTConfig":
        _check_common(self)
        return self

    def layer(self, i: int) -> "GPTConfig":
        return _layer(self, i)


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    max_seq_len: int = 256
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_hidden: int = 704
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    arch: str = "llama"
    head_dim: int | None = None     # None = dim // num_heads
    per_layer: list | None = None   # per-block overrides of num_heads / num_kv_heads / mlp_hidden

    def validate(self) -> "LlamaConfig":
        _check_common(self)
        for i in range(self.num_layers):
            block = self.layer(i)
            if not isinstance(block.num_kv_heads, int) or block.num_kv_heads <= 0 \
                    or block.num_heads % block.num_kv_heads:
                raise UserError(f"model config: {_where(self, i)}num_kv_heads={block.num_kv_heads!r} must divide "
                                f"num_heads={block.num_heads}")
        if head_size(self) % 2:
            raise UserError(f"model config: head dim {head_size(self)} must be even for RoPE")
        return self

    def layer(self, i: int) -> "LlamaConfig":
        return _layer(self, i)


CONFIGS = {"gpt": GPTConfig, "llama": LlamaConfig}


# What a `per_layer` entry may override, per arch: the sizes structured pruning shrinks.
PER_LAYER_FIELDS = {"gpt": ("num_heads", "mlp_hidden"), "llama": ("num_heads", "num_kv_heads", "mlp_hidden")}


def head_size(cfg) -> int:
    """The attention head width: `head_dim`, or `dim // num_heads` when it is not given."""
    return cfg.head_dim if cfg.head_dim is not None else cfg.dim // cfg.num_heads


def _layer(cfg, i: int):
    """The config block `i` is built from: `cfg` with that block's `per_layer` overrides
    (and `head_dim` pinned, so fewer heads keep their width)."""
    if not cfg.per_layer:
        return cfg
    return replace(cfg, head_dim=head_size(cfg), per_layer=None, **cfg.per_layer[i])


def _where(cfg, i: int) -> str:
    return f"per_layer[{i}] " if cfg.per_layer else ""


def _check_common(cfg) -> None:
    for name in ("vocab_size", "max_seq_len", "dim", "num_layers", "num_heads", "mlp_hidden"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"model config: {name}={value!r} must be a positive integer")
    if cfg.head_dim is None:
        if cfg.dim % cfg.num_heads:
            raise UserError(f"model config: num_heads={cfg.num_heads} does not divide dim={cfg.dim}")
    elif not isinstance(cfg.head_dim, int) or cfg.head_dim <= 0:
        raise UserError(f"model config: head_dim={cfg.head_dim!r} must be a positive integer")
    if cfg.per_layer is not None:
        allowed = PER_LAYER_FIELDS[cfg.arch]
        if not isinstance(cfg.per_layer, list) or len(cfg.per_layer) != cfg.num_layers:
            raise UserError(f"model config: per_layer must be a list of num_layers={cfg.num_layers} objects")
        for i, entry in enumerate(cfg.per_layer):
            if not isinstance(entry, dict) or set(entry) - set(allowed):
                raise UserError(f"model config: per_layer[{i}] must be an object with only "
                                f"{', '.join(allowed)}, not {entry!r}")
            for name, value in entry.items():
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise UserError(f"model config: per_layer[{i}] {name}={value!r} must be a positive integer")
    if cfg.vocab_size > 65535:
        raise UserError(f"model config: vocab_size={cfg.vocab_size} exceeds 65535 (tokens are stored as uint16)")


def config_from_dict(d: dict):
    """Builds and validates a config from its JSON form; unknown keys are an error."""
    arch = d.get("arch", "llama")
    if arch not in CONFIGS:
        raise UserError(f"model config: unknown arch {arch!r} (expected one of {sorted(CONFIGS)})")
    cls = CONFIGS[arch]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"model config: unknown field(s) {', '.join(unknown)} for arch {arch!r}")
    return cls(**d).validate()


def config_to_dict(cfg) -> dict:
    """The JSON form; the optional fields of a pruned model (`head_dim`, `per_layer`) are
    written only when set, so an unpruned config reads as it always did."""
    d = asdict(cfg)
    for name in ("head_dim", "per_layer"):
        if d.get(name) is None:
            d.pop(name, None)
    return d


def build_model(cfg) -> nn.Module:
    cfg.validate()
    return GPT(cfg) if cfg.arch == "gpt" else Llama(cfg)


# ---------------------------------------------------------------- shared pieces

def _attend(q_BNSD, k_BNSD, v_BNSD, past_len: int) -> torch.Tensor:
    """Causal attention of `seq` new queries over `past_len + seq` keys."""
    seq = q_BNSD.shape[2]
    if past_len == 0:
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, is_causal=True)
    if seq == 1:
        return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD)
    total = k_BNSD.shape[2]
    mask = torch.ones(seq, total, dtype=torch.bool, device=q_BNSD.device).tril(diagonal=past_len)
    return F.scaled_dot_product_attention(q_BNSD, k_BNSD, v_BNSD, attn_mask=mask)


def _append_cache(k_BNSD, v_BNSD, layer_cache):
    if layer_cache is not None:
        k_BNSD = torch.cat([layer_cache[0], k_BNSD], dim=2)
        v_BNSD = torch.cat([layer_cache[1], v_BNSD], dim=2)
    return k_BNSD, v_BNSD


class _Decoder(nn.Module):
    """Embedding, a stack of blocks, final norm, LM head; shared by both families."""

    gradient_checkpointing: bool = False

    def _blocks_forward(self, x, cache: KVCache | None, past_len: int):
        new_cache = [] if cache is not None else None
        rope = self._rope(past_len, x.shape[1], x.dtype)
        for i, block in enumerate(self.blocks):
            layer_cache = cache[i] if cache else None
            if self.gradient_checkpointing and self.training and cache is None:
                x, kv = checkpoint(block, x, rope, None, 0, use_reentrant=False)
            else:
                x, kv = block(x, rope, layer_cache, past_len)
            if new_cache is not None:
                new_cache.append(kv)
        return self.lm_head(self.norm(x)), new_cache

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits, _ = self._blocks_forward(self._embed(idx, 0), None, 0)
        return logits

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache | None):
        """Eager generation step: returns logits for `idx` and the cache extended by it."""
        past_len = cache[0][0].shape[2] if cache else 0
        if past_len + idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {past_len + idx.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        return self._blocks_forward(self._embed(idx, past_len), cache if cache else [], past_len)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# Projections that write into the residual stream; scaled down with depth (GPT-2 style).
_RESIDUAL_OUT = ("attn_proj.weight", "mlp_proj.weight", "wo.weight", "w_down.weight")


def _init_weights(module: nn.Module, num_layers: int) -> None:
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(_RESIDUAL_OUT) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


# ---------------------------------------------------------------- GPT

class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.inner = cfg.num_heads * head_size(cfg)  # = dim unless heads were pruned
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * self.inner)
        self.attn_proj = nn.Linear(self.inner, cfg.dim)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp_fc = nn.Linear(cfg.dim, cfg.mlp_hidden)
        self.mlp_proj = nn.Linear(cfg.mlp_hidden, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, layer_cache, past_len: int):
        batch, seq, _ = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(self.inner, dim=2)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        k, v = _append_cache(k, v, layer_cache)
        a = _attend(q, k, v, past_len).transpose(1, 2).reshape(batch, seq, self.inner)
        x = x + self.dropout(self.attn_proj(a))
        x = x + self.dropout(self.mlp_proj(F.gelu(self.mlp_fc(self.ln_2(x)))))
        return x, (k, v)


class GPT(_Decoder):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg.layer(i)) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        _init_weights(self, cfg.num_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _rope(self, past_len: int, seq: int, dtype):
        return None

    def _embed(self, idx, past_len: int):
        pos = torch.arange(past_len, past_len + idx.shape[1], device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))


# ---------------------------------------------------------------- Llama

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = head_size(cfg)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x, rope, layer_cache, past_len: int):
        batch, seq, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(h).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = _append_cache(k, v, layer_cache)  # the cache holds kv heads, before repetition
        group = self.num_heads // self.num_kv_heads
        k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k
        v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v
        a = _attend(q, k_rep, v_rep, past_len).transpose(1, 2).reshape(batch, seq, -1)
        x = x + self.wo(a)
        h = self.mlp_norm(x)
        x = x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))
        return x, (k, v)


class Llama(_Decoder):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(LlamaBlock(cfg.layer(i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        head_dim = head_size(cfg)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [seq, head_dim], rotate-half layout
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        _init_weights(self, cfg.num_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _rope(self, past_len: int, seq: int, dtype):
        return (self.rope_cos[past_len:past_len + seq].to(dtype),
                self.rope_sin[past_len:past_len + seq].to(dtype))

    def _embed(self, idx, past_len: int):
        return self.tok_emb(idx)
