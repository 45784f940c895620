"""Generation on a decoder artifact: prefill + decode with the KV cache, on any backend.

A generation-ready artifact (what `graphopt optimize` writes for a decoder) takes
`input_ids [batch, seq]`, `attention_mask [batch, past_seq + seq]` and per layer
`past_key_values.{i}.key|value` and returns `logits` and `present.{i}.key|value`; its
manifest's `generation` section says the cache layout, the logits mode, the maximum context
and the tokenizer beside the model. `Generator` drives it:

    gen = Generator.for_artifact(graphopt.load("out/default"))
    result = gen.generate([[17, 4, 99], [5]], max_new_tokens=32)      # batch, left-padded
    result.tokens, result.ttft_s, result.decode_tokens_per_s

Greedy (temperature 0) or sampled with temperature, top-k and top-p from a seeded numpy
generator; stops at any of the model's EOS ids (per row) or after `max_new_tokens`;
`on_tokens(step, ids)` is called with each step's new ids (streaming). `generate_text` does
the same from and to text with the tokenizer beside the model (graphopt.generation_text reads
prompts and new text; graphopt.generation_files writes the manifest's `generation` section).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from graphopt.errors import UserError
from graphopt.dtypes import DType
from graphopt.generation_text import TextStream, continuation, encode_prompts, is_int, load_tokenizer, logits_vocab
from graphopt.passes.kvcache.rewrite import BLOCK_TABLE

DEFAULT_NEW_TOKENS = 200  # `graphopt generate` without --max-new-tokens (capped to what the context leaves)


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]          # the new ids of each row (EOS not included)
    ttft_s: float                    # prefill + first token
    decode_s: float                  # every later step
    decode_tokens: int               # tokens the decode steps produced (all rows)
    steps: int
    texts: list[str] | None = None   # the new text of each row, when prompted with text

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class CacheSpec:
    """What the Generator needs to know of the graph's cache inputs."""

    num_layers: int
    kv_num_heads: list[int]
    head_sizes: list[tuple[int, int]]  # (key, value) per layer
    dtype: np.dtype
    mask_dtype: np.dtype
    max_positions: int | None
    layout: str = "BNSH"
    block_size: int = 0  # paged: positions per block
    # LongRoPE: once the sequence is longer than this, positions rotate by the long factors, and
    # a cache built while it was not is recomputed (a prefill over the whole sequence), once
    recompute_at: int | None = None
    # BNSH driven as one buffer per layer that is both past and present (an ORT artifact whose
    # attention is GroupQueryAttention, `Artifact.decode_run(shared=True)`): each buffer holds
    # every position the request needs, written in place, as a static cache is
    shared: bool = False

    def shape(self, batch: int, layer: int, kind: int, seq: int = 0, num_blocks: int = 0) -> tuple[int, ...]:
        """The shape of layer's key (kind 0) or value (kind 1) cache holding `seq` positions
        (static: the whole preallocated buffer, `max_positions` of them; paged: the pool of
        `num_blocks` blocks)."""
        heads, head = self.kv_num_heads[layer], self.head_sizes[layer][kind]
        if self.layout == "paged":
            return (num_blocks, self.block_size, heads, head)
        if self.layout == "static":
            return (batch, heads, self.max_positions, head)
        return (batch, seq, heads, head) if self.layout == "BSNH" else (batch, heads, seq, head)

    @staticmethod
    def from_signature(sig: dict, max_positions: int | None = None, layout: str = "BNSH",
                       block_size: int = 0) -> "CacheSpec":
        inputs = {e["name"]: e for e in sig["inputs"]}
        for name in ("input_ids", "attention_mask", "past_key_values.0.key"):
            if name not in inputs:
                raise UserError(f"not a generation-ready decoder: no input {name!r} (optimize it with the default "
                                "pipeline: graphopt optimize MODEL -o OUT)")
        layers = 0
        while f"past_key_values.{layers}.key" in inputs:
            layers += 1
        heads, sizes = [], []
        axis = 2 if layout in ("BSNH", "paged") else 1
        for i in range(layers):
            k, v = inputs[f"past_key_values.{i}.key"]["shape"], inputs[f"past_key_values.{i}.value"]["shape"]
            heads.append(int(k[axis]))
            sizes.append((int(k[3]), int(v[3])))
        dt = DType.from_short(inputs["past_key_values.0.key"]["dtype"]).np_dtype
        mdt = DType.from_short(inputs["attention_mask"]["dtype"]).np_dtype
        if layout == "paged":
            block_size = int(inputs["past_key_values.0.key"]["shape"][1])
        return CacheSpec(layers, heads, sizes, np.dtype(dt), np.dtype(mdt), max_positions, layout, block_size)


class BlockTable:
    """The paged cache's block allocator: a pool of `num_blocks` blocks of `block_size`
    positions, handed to rows as they grow; `cover(length)` is the `block_table [batch,
    width]` (int32) once every row holds `length` positions."""

    def __init__(self, batch: int, block_size: int, num_blocks: int, width: int):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.table = np.zeros((batch, width), np.int32)
        self.used = np.zeros(batch, np.int64)  # blocks each row holds
        self.free = list(range(num_blocks))

    def cover(self, length: int) -> np.ndarray:
        need = -(-length // self.block_size)
        if need > self.table.shape[1]:
            raise UserError(f"{length} positions need {need} blocks of {self.block_size}; the block table has "
                            f"{self.table.shape[1]}")
        for r in range(len(self.table)):
            while self.used[r] < need:
                if not self.free:
                    raise UserError(f"the paged KV cache is out of blocks: {self.num_blocks} blocks of "
                                    f"{self.block_size} positions cannot hold {len(self.table)} rows of {length} "
                                    "positions (give the Generator a larger num_blocks)")
                self.table[r, self.used[r]] = self.free.pop(0)
                self.used[r] += 1
        return self.table.copy()


class Generator:
    """Prefill + decode over `run(feeds) -> outputs` (an artifact's, or any backend's)."""

    def __init__(self, run: Callable[[dict], dict], spec: CacheSpec, *, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int = 0, num_blocks: int | None = None, vocab_size: int | None = None):
        self.run, self.spec = run, spec
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.vocab_size = vocab_size  # prompts' ids are checked against it (None: not checked)
        self.num_blocks = num_blocks  # paged: the pool's size (None: what each request needs)

    @staticmethod
    def for_artifact(artifact, *, io_binding: bool | None = None, num_blocks: int | None = None) -> "Generator":
        """A Generator over `artifact.decode_run()`: on ORT with a static or paged cache (or on
        a GPU) the cache stays in ORT's buffers between steps; `io_binding` True or False forces
        the choice (`Artifact.decode_run` says why it is made so). `num_blocks`: a paged
        cache's pool size (by default what each request needs)."""
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer))
                                       or num_blocks < 1):
            raise UserError(f"num_blocks={num_blocks!r}: the paged cache's pool size, a whole number of blocks "
                            "(at least 1), or None for what each request needs")
        gen = artifact.manifest.get("generation") or {}
        why_not = artifact.manifest.get("not_generation_ready")
        if not gen and why_not:
            raise UserError(f"{artifact.path}: not a generation-ready artifact: optimize could not add the KV cache "
                            f"({why_not})")
        spec = CacheSpec.from_signature(artifact.manifest["signature"], gen.get("max_positions"),
                                        gen.get("kv_layout", "BNSH"), gen.get("block_size", 0))
        spec.recompute_at = gen.get("recompute_cache_at")
        # a growing cache that GroupQueryAttention computes runs as a shared one (no copy of the
        # whole past a step), unless the caller asked for no IO binding
        spec.shared = artifact.shares_cache_buffer and io_binding is not False
        return Generator(artifact.decode_run(io_binding=io_binding, shared=spec.shared), spec,
                         eos_token_id=gen.get("eos_token_id"), num_blocks=num_blocks, vocab_size=logits_vocab(artifact))

    def empty_cache(self, batch: int, num_blocks: int = 0, positions: int | None = None) -> dict[str, np.ndarray]:
        """The past_key_values feeds of a prefill: every layer's cache with no position yet
        (paged: pools of `num_blocks` blocks). A shared growing cache (`spec.shared`) is fed as
        zeroed buffers of `positions`, every position the request will fill; without
        `positions`, the empty growing cache that `artifact.run` takes."""
        s = self.spec
        seq = positions if s.shared and positions else 0
        feeds = {}
        for i in range(s.num_layers):
            feeds[f"past_key_values.{i}.key"] = np.zeros(s.shape(batch, i, 0, seq, num_blocks), s.dtype)
            feeds[f"past_key_values.{i}.value"] = np.zeros(s.shape(batch, i, 1, seq, num_blocks), s.dtype)
        return feeds

    def prefill_feeds(self, ids: np.ndarray, mask: np.ndarray, positions: int) -> tuple[dict, BlockTable | None]:
        """The feeds of a prefill of `ids` [batch, seq] with `mask` on an empty cache, and a
        paged cache's block table, sized for rows of `positions` positions (None otherwise)."""
        batch, seq = ids.shape
        blocks = None
        if self.spec.layout == "paged":
            width = -(-positions // self.spec.block_size)
            blocks = BlockTable(batch, self.spec.block_size, self.num_blocks or batch * width, width)
        feeds = {"input_ids": ids, "attention_mask": mask,
                 **self.empty_cache(batch, blocks.num_blocks if blocks else 0, positions)}
        if blocks is not None:
            feeds[BLOCK_TABLE] = blocks.cover(seq)
        return feeds, blocks

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[int], max_new_tokens: int = 32, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, allowed_first: np.ndarray | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> GenerationResult:
        """Continue each prompt (token ids; one prompt or a batch, left-padded here).
        `eos_token_id`: the id or ids a row stops at (None: the model's; -1: none).
        `allowed_first` ([batch, vocab] bool) restricts the first new token (token healing).
        `on_tokens(step, ids)` gets every row's id, a finished row's as the EOS id it stopped at
        (which is also what it is fed: an id the model gave, inside its vocabulary)."""
        prompts = token_prompts(prompts, self.vocab_size)
        _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        if on_tokens is not None and not callable(on_tokens):
            raise UserError(f"on_tokens={on_tokens!r}: a function of (step, ids), called with each step's new tokens")
        longest = max(len(p) for p in prompts)
        limit = self.spec.max_positions
        if limit and longest + max_new_tokens - 1 > limit:
            raise UserError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens needs "
                            f"{longest + max_new_tokens - 1} positions; the model has {limit}")
        eos = eos_ids(self.eos_token_id if eos_token_id is None else eos_token_id)  # a row stops at any
        batch = len(prompts)
        ids = np.full((batch, longest), self.pad_token_id, np.int64)
        mask = np.zeros((batch, longest), self.spec.mask_dtype)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = p
            mask[r, longest - len(p):] = 1
        rng = np.random.default_rng(seed)
        feeds, blocks = self.prefill_feeds(ids, mask, longest + max_new_tokens - 1)
        new: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, bool)
        stopped_at = np.zeros(batch, np.int64)  # a finished row's EOS id, fed again while others go on
        every_id = ids  # the whole sequence so far: a recomputed cache's prefill
        short_cache = self.spec.recompute_at is not None and longest <= self.spec.recompute_at
        t0 = time.perf_counter()
        ttft = decode = 0.0
        decode_tokens = steps = 0
        for step in range(max_new_tokens):
            out = self.run(feeds)
            logits = np.asarray(out["logits"])[:, -1].astype(np.float64)
            if step == 0 and allowed_first is not None:
                logits = np.where(allowed_first, logits, -np.inf)
            nxt = np.array([sample(row, temperature, top_k, top_p, rng) for row in logits], np.int64)
            nxt = np.where(done, stopped_at, nxt)
            fresh = []
            for r in range(batch):
                if done[r]:
                    continue
                if int(nxt[r]) in eos:
                    done[r], stopped_at[r] = True, nxt[r]
                    continue
                new[r].append(int(nxt[r]))
                fresh.append(r)
            now = time.perf_counter()
            steps += 1
            if step == 0:
                ttft = now - t0
            else:
                decode_tokens += len(fresh)
            if on_tokens is not None:
                on_tokens(step, [int(t) for t in nxt])
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), mask.dtype)], axis=1)
            every_id = np.concatenate([every_id, nxt[:, None]], axis=1)
            if short_cache and mask.shape[1] > self.spec.recompute_at:
                # the positions rotate otherwise from here on (LongRoPE's long factors): the cached
                # keys, rotated by the short ones, are recomputed once (as transformers does)
                short_cache = False
                feeds = {"input_ids": every_id, "attention_mask": mask,
                         **self.empty_cache(batch, blocks.num_blocks if blocks else 0, longest + max_new_tokens - 1)}
            else:
                feeds = {"input_ids": nxt[:, None], "attention_mask": mask}
                for i in range(self.spec.num_layers):
                    feeds[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
                    feeds[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
            if blocks is not None:
                feeds[BLOCK_TABLE] = blocks.cover(mask.shape[1])
        decode = time.perf_counter() - t0 - ttft
        return GenerationResult(new, ttft, decode, decode_tokens, steps)

    def generate_text(self, tokenizer, prompts: Sequence[Sequence[int]] | Sequence[int], max_new_tokens: int = 32, *,
                      healed: Sequence[str] | None = None, on_text: Callable[[int, str], None] | None = None,
                      **options) -> GenerationResult:
        """`generate` over encoded prompts (`encode_prompts`' ids and healed texts), with each
        row's new text: `result.texts`, and `on_text(row, piece)` after every step with the text
        that step made certain ("" when none). Options: those of `generate`."""
        prompts = token_prompts(prompts, self.vocab_size)
        healed = list(healed) if healed is not None else [""] * len(prompts)
        if len(healed) != len(prompts):
            raise UserError(f"healed: {len(healed)} texts for {len(prompts)} prompts")
        stop = eos_ids(self.eos_token_id if options.get("eos_token_id") is None else options["eos_token_id"])
        user_on_tokens = options.pop("on_tokens", None)
        on_tokens = user_on_tokens
        streams = []
        if on_text is not None:  # streamed: each step's text as it becomes certain
            streams = [TextStream(tokenizer, p, h) for p, h in zip(prompts, healed)]
            finished = [False] * len(streams)

            def on_tokens(step: int, ids: list[int]) -> None:
                for r, (stream, t) in enumerate(zip(streams, ids)):
                    finished[r] = finished[r] or t in stop
                    on_text(r, "" if finished[r] else stream.put([t]))
                if user_on_tokens is not None:
                    user_on_tokens(step, ids)

        result = self.generate(prompts, max_new_tokens, on_tokens=on_tokens, **options)
        for r, stream in enumerate(streams):
            piece = stream.end()
            if piece:
                on_text(r, piece)
        result.texts = [continuation(tokenizer, p, t, h) for p, t, h in zip(prompts, result.tokens, healed)]
        return result


def eos_ids(value) -> tuple[int, ...]:
    """The EOS ids a manifest, a config or a caller gives: one id (older manifests, most
    configs), a list (Llama-3-Instruct, Qwen2-Instruct: end of text and end of turn) or None."""
    if value is None:
        return ()
    if is_int(value):
        return (int(value),)
    if isinstance(value, (list, tuple)) and all(is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise UserError(f"eos_token_id {value!r}: a token id or a list of token ids")


def fit_new_tokens(prompt_tokens: int, context: int | None, requested: int | None, where) -> tuple[int, str | None]:
    """(new tokens, a note to print or None) for `graphopt generate`: a prompt of p tokens and n
    new ones need p + n - 1 positions (the last new token is never fed back). Without
    --max-new-tokens (`requested` None) the default is capped to what the context leaves."""
    room = context - prompt_tokens + 1 if context else None
    if room is not None and room < 1:
        raise UserError(f"{where}: the prompt ({prompt_tokens} tokens) needs more positions than the model has "
                        f"({context}); shorten --prompt")
    if requested is None:
        if room is not None and room < DEFAULT_NEW_TOKENS:
            return room, (f"--max-new-tokens {room}: what the model's {context} positions leave after the "
                          f"prompt's {prompt_tokens} tokens")
        return DEFAULT_NEW_TOKENS, None
    if room is not None and requested > room:
        raise UserError(f"{where}: the prompt ({prompt_tokens} tokens) and --max-new-tokens {requested} need "
                        f"{prompt_tokens + requested - 1} positions; the model has {context} (give "
                        f"--max-new-tokens {room} or less)")
    return requested, None


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from `logits [vocab]`; temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    if 0 < top_p < 1:
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        before = np.cumsum(p) - p  # the probability of the tokens ranked above each one
        drop = np.zeros(z.size, bool)
        drop[order] = before >= top_p  # keep the token that crosses top_p
        z = np.where(drop, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def token_prompts(prompts, vocab_size: int | None) -> list[list[int]]:
    """`prompts` (token ids: one prompt or a batch, lists or arrays) as lists of ints, each id in
    [0, vocab_size): an id past the vocabulary is an out-of-bounds embedding read (an error on
    ORT, a wrapped-around row on TVM), a negative one reads from the table's end, a float one
    would be truncated."""
    if hasattr(prompts, "tolist"):  # a numpy array, a torch tensor
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)):
        raise UserError(f"prompts: token ids (a list of ints, or a list of such lists), not {type(prompts).__name__}")
    if prompts and (is_int(prompts[0]) or not isinstance(prompts[0], (list, tuple)) and not hasattr(prompts[0], "tolist")):
        prompts = [prompts]  # one prompt (a float in it is refused below)
    rows = []
    for p in prompts:
        p = p.tolist() if hasattr(p, "tolist") else p
        if not isinstance(p, (list, tuple)):
            raise UserError(f"prompts: a batch is a list of token-id lists, not a list holding {type(p).__name__}")
        bad = next((t for t in p if not is_int(t)), None)
        if bad is not None:
            raise UserError(f"prompts: token ids are integers, not {bad!r} ({type(bad).__name__})")
        rows.append([int(t) for t in p])
    if not rows:
        raise UserError("no prompts: give one prompt (token ids) or a list of them")
    if any(not p for p in rows):
        raise UserError("every prompt needs at least one token")
    out = next((t for p in rows for t in p if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if out is not None:
        where = f"[0, {vocab_size})" if vocab_size is not None else "non-negative"
        raise UserError(f"prompts: token id {out} is outside the model's vocabulary ({where})")
    return rows


def _check_sampling(max_new_tokens, temperature, top_k, top_p, seed) -> None:
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise UserError(f"max_new_tokens {max_new_tokens!r}: must be a positive integer")
    if not is_int(top_k) or top_k < 0:
        raise UserError(f"top_k {top_k!r}: must be an integer >= 0 (0: no top-k)")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise UserError(f"seed {seed!r}: must be an integer >= 0 (None: fresh randomness)")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) or value != value:
            raise UserError(f"{name} {value!r}: must be a number")
    if not 0 <= temperature < float("inf"):
        raise UserError(f"temperature {temperature!r}: must be >= 0 and finite (0: greedy)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p {top_p!r}: must be in (0, 1]")


def generate_text(artifact, prompts: Sequence[str], max_new_tokens: int = 32, **options) -> GenerationResult:
    """`Artifact.generate` on text: the prompts encoded with the tokenizer beside the model, and
    `result.texts` each row's new text as it reads after its prompt. Options: `Generator.generate`'s
    and `on_text(row, piece)` (streaming)."""
    gen = Generator.for_artifact(artifact)  # first: an artifact that cannot generate says why
    tok = load_tokenizer(artifact.path)
    ids, allowed, healed = encode_prompts(artifact, tok, prompts)
    return gen.generate_text(tok, ids, max_new_tokens, healed=healed,
                                                          allowed_first=allowed, **options)


