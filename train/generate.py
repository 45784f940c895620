"""Text generation with the KV cache: greedy, or sampled with temperature, top-k and top-p."""
from __future__ import annotations

from typing import Callable

import torch

from .tokenizer import EOS


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
    """One token id from `logits: f32[vocab]`; temperature 0 means greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _healing_mask(tokenizer, token_id: int, vocab_size: int) -> torch.Tensor:
    """Tokens whose text starts with the text of `token_id` (in byte-level token space)."""
    prefix = tokenizer.id_to_token(token_id)
    return torch.tensor([(tokenizer.id_to_token(i) or "").startswith(prefix) for i in range(vocab_size)])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             on_text: Callable[[str], None] | None = None) -> str:
    """Continues `prompt`; calls `on_text` with each new piece of text as it is decoded and
    returns the whole continuation.

    Token healing: the prompt's last token is taken back and the first new token must start
    with its text. Without it a prompt such as "def " ends in a lone-space token that the
    model almost never saw (in training the space is merged into the next word, "Ġ__"), and
    the continuation derails. Stops at <|endoftext|>. When the context fills up, the cache is
    rebuilt from the last half of it (a sliding window), so any length can be generated.
    """
    eos_id = tokenizer.token_to_id(EOS)
    prompt_ids = tokenizer.encode(prompt).ids
    allowed_first = None
    healed = ""  # text of the taken-back token, already shown as part of the prompt
    if prompt_ids:
        allowed_first = _healing_mask(tokenizer, prompt_ids[-1], model.config.vocab_size)
        healed = tokenizer.decode(prompt_ids[-1:])
        prompt_ids = prompt_ids[:-1]
    ids = [eos_id] + prompt_ids  # documents start after <eos> in training
    max_len = model.config.max_seq_len
    ids = ids[-max_len:]
    generator = torch.Generator().manual_seed(seed)
    logits, cache = model.forward_cached(torch.tensor([ids]), None)
    new_ids: list[int] = []
    printed = healed
    for _ in range(max_new_tokens):
        next_logits = logits[0, -1]
        if allowed_first is not None:
            next_logits = next_logits.masked_fill(~allowed_first, float("-inf"))
            allowed_first = None
        next_id = sample_next(next_logits, temperature, top_k, top_p, generator)
        if next_id == eos_id:
            break
        new_ids.append(next_id)
        ids.append(next_id)
        text = tokenizer.decode(new_ids)
        if on_text and not text.endswith("\ufffd") and len(text) > len(printed):
            on_text(text[len(printed):])  # (a split UTF-8 character waits for its rest)
            printed = text
        if len(ids) >= max_len:
            ids = ids[-(max_len // 2):]
            logits, cache = model.forward_cached(torch.tensor([ids]), None)
        else:
            logits, cache = model.forward_cached(torch.tensor([[next_id]]), cache)
    text = tokenizer.decode(new_ids)
    if on_text and len(text) > len(printed):
        on_text(text[len(printed):])
    return text[len(healed):] if text.startswith(healed) else text
