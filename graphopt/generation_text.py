"""Text around generation: a prompt's tokens (`encode_prompts`, with token healing for models
graphopt.train made), the text new ids make where they stand (`continuation`, and `TextStream`
as they come), and the tokenizer beside an artifact (`load_tokenizer`).

Decoding new ids alone reads them wrong: a SentencePiece token loses its leading space at the
start of a sequence, and a character split over tokens decodes to U+FFFD until its last byte
comes. So new text is always read after some of the tokens before it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from graphopt.errors import UserError

TRAINING_EOS = "<|endoftext|>"  # graphopt.train's one special token (documents start after it)


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def load_tokenizer(folder: Path, hint: str | None = None):
    """The folder's tokenizer.json; missing: a one-line error ending with `hint` (what to do instead)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        hint = hint or ("generate from token ids with graphopt.load(ARTIFACT).generate([[ids...]]) or copy the "
                        "model's tokenizer.json there")
        raise UserError(f"{folder}: no tokenizer.json beside the model; {hint}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def logits_vocab(artifact) -> int | None:
    """The last dim of the artifact's logits (None where it is not static)."""
    logits = next((o for o in artifact.outputs if o["name"] == "logits"), None) or (artifact.outputs or [{}])[0]
    last = (logits.get("shape") or [None])[-1]
    return last if isinstance(last, int) else None


def check_text(prompts: Sequence[str], option: str = "--prompt") -> None:
    """Prompts the tokenizer can take: text that is valid Unicode (a shell hands bytes that are
    not UTF-8 on as lone surrogates, which tokenizers refuses with a TypeError)."""
    for text in prompts:
        if not isinstance(text, str):
            raise UserError(f"{option}: a prompt is text, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{option} {text!r}: not valid UTF-8 text (character {e.start + 1})") from None


def continuation(tokenizer, context: Sequence[int], new: Sequence[int], skip: str = "") -> str:
    """The text `new` ids make after `context`, as they read there: decode(context + new) past
    decode(context) (decoded alone, a SentencePiece token loses its leading space), or the new
    ids alone where the context's own text changes with what follows; `skip`, text the prompt
    already shows (token healing), taken off its start; a character the last id only began, left out."""
    head, whole = tokenizer.decode(list(context)), tokenizer.decode(list(context) + list(new))
    if not whole.startswith(head) and whole.startswith(head.rstrip("\ufffd")):
        head = head.rstrip("\ufffd")  # a character the context only began (token healing took its last byte back)
    text = whole[len(head):] if whole.startswith(head) else tokenizer.decode(list(new))
    text = text[len(skip):] if skip and text.startswith(skip) else text
    return text.rstrip("\ufffd")


class TextStream:
    """One row's new text as its ids come, each step's piece read where it stands: decoded
    within a window that starts a few tokens back (a SentencePiece decoder, Metaspace, drops
    the leading space of a sequence's first token: decoded alone, "▁imp" after "the value of"
    loses its space), so a step costs the same however long the text (decoding the whole
    sequence every step grows with it; the same scheme as vLLM's incremental detokenizer).
    `skip` is text the printed prompt already shows (what token healing took back), taken off
    the start. `put` returns only text that later ids cannot change: a character split over
    tokens (a trailing U+FFFD) waits for its last byte; `end` gives the rest, without a
    character the last token only began."""

    CONTEXT = 6  # tokens of context decoded before the new ones: enough to read them in place

    def __init__(self, tokenizer, context: Sequence[int], skip: str = ""):
        self.tokenizer, self.skip = tokenizer, skip
        self.tokens = [int(t) for t in context][-self.CONTEXT:]
        self.start, self.read = 0, len(self.tokens)  # the window [start, read) is text already read
        self.shown = ""  # the text handed out so far

    def _take(self, allow_partial: bool) -> str:
        done = self.tokenizer.decode(self.tokens[self.start:self.read])
        text = self.tokenizer.decode(self.tokens[self.start:])
        if not allow_partial and text.endswith("\ufffd"):
            return ""
        piece = text[len(done):].rstrip("\ufffd") if allow_partial else text[len(done):]
        self.start, self.read = self.read, len(self.tokens)
        piece = self._unskip(piece)
        self.shown += piece
        return piece

    def _unskip(self, piece: str) -> str:
        """`piece` less what is left of `skip` at its start (the healed text the prompt shows)."""
        if not self.skip:
            return piece
        if piece.startswith(self.skip):
            piece, self.skip = piece[len(self.skip):], ""
        elif self.skip.startswith(piece):
            piece, self.skip = "", self.skip[len(piece):]
        else:
            self.skip = ""  # the text went another way: nothing of it is shown twice
        return piece

    def put(self, ids: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in ids)
        return self._take(allow_partial=False)

    def end(self) -> str:
        return self._take(allow_partial=True) if self.read < len(self.tokens) else ""


def healing_mask(tokenizer, token_id: int, vocab_size: int) -> np.ndarray:
    """Tokens whose text starts with the text of `token_id` (token healing, as graphopt.train does)."""
    prefix = tokenizer.id_to_token(token_id)
    return np.array([(tokenizer.id_to_token(i) or "").startswith(prefix) for i in range(vocab_size)])


def encode_prompts(artifact, tokenizer, prompts: Sequence[str], *, heal: bool | None = None):
    """(token ids per prompt, allowed_first or None, healed text per prompt). A model trained
    by graphopt.train starts documents after <|endoftext|> and gets token healing (its last
    prompt token is taken back and the first new token must start with its text)."""
    gen = artifact.manifest.get("generation") or {}
    heal = gen.get("token_healing", False) if heal is None else heal
    prefix = gen.get("prompt_prefix_ids") or []
    ids, healed, masks = [], [], []
    vocab = logits_vocab(artifact)
    if heal and vocab is None:
        raise UserError(f"{artifact.path}: the logits' vocabulary is not static; token healing needs it")
    check_text(prompts, "prompts")
    for text in prompts:
        p = tokenizer.encode(text).ids
        h = ""
        if heal and p:
            masks.append(healing_mask(tokenizer, p[-1], vocab))
            h = continuation(tokenizer, list(prefix) + p[:-1], p[-1:])  # as it reads after the rest
            p = p[:-1]
        elif heal:
            masks.append(np.ones(vocab, bool))
        ids.append(list(prefix) + p)
        healed.append(h)
    if not all(ids):
        raise UserError("an empty prompt: give some text (or a model with a start token)")
    check_ids_fit([t for row in ids for t in row], vocab, artifact.path)
    return ids, (np.stack(masks) if heal else None), healed


def check_ids_fit(ids, vocab, where) -> None:
    """A prompt token past the model's vocabulary (a tokenizer that is not the model's) is a
    one-line error, not an out-of-bounds read (TVM's embedding lookup does not check)."""
    if isinstance(vocab, int) and ids and max(ids) >= vocab:
        raise UserError(f"{where}: the prompt has token id {max(ids)}, past the model's vocabulary of {vocab}: "
                        "its tokenizer.json is not the one the model was trained with")
