"""Byte-level BPE tokenizer trained with the `tokenizers` library.

Byte-level means every string round-trips (no unknown token). One special token,
`<|endoftext|>`, separates documents; it has id 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: Path):
    """Trains a BPE tokenizer on `texts` and writes it to `path` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    from graphopt.errors import UserError

    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def check_fits(tok, vocab_size: int, where) -> None:
    """A tokenizer whose ids reach past the model's embedding table is a one-line error."""
    from graphopt.errors import UserError

    n = tok.get_vocab_size()
    if n > vocab_size:
        raise UserError(f"{where}: the tokenizer has {n} tokens, more than the model's vocab_size={vocab_size}; "
                        "use the tokenizer.json the model was trained with")
