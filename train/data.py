"""Data preparation: text files -> cleaned, de-duplicated documents -> BPE tokenizer ->
uint16 token streams in memory-mapped files, with a validation split held out by document.

Layout of a prepared folder:

    docs.jsonl          cleaned, de-duplicated documents, each tagged train or val
    sources.sha256      what they were read from (paths, sizes, times): a later change is named
    tokenizer.json      the BPE tokenizer trained on the train documents
    shards/{split}_{i:05d}.npy   token ids of one chunk of documents (resume unit)
    train.bin, val.bin  all shards of a split concatenated (np.memmap, uint16)
    val.txt             the validation documents, separated by <|endoftext|>
    meta.json           written last: its presence means the folder is complete

Each stage writes its outputs atomically and is skipped when they already exist, so an
interrupted preparation resumes where it stopped. A document stream looks like
`<eos> doc1 <eos> doc2 <eos> ...`, so every token of every document is predicted.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graphopt import progress as notes
from graphopt.errors import UserError

from .tokenizer import EOS, load_tokenizer, train_tokenizer

DOCS_PER_SHARD = 64
DOC_CHARS = 2000  # the size of a document cut from a single --data file


@dataclass
class DataConfig:
    vocab_size: int = 4096
    val_fraction: float = 0.05
    min_chars: int = 200
    max_line_chars: int = 1000  # longer lines mean generated or minified data
    suffixes: tuple = (".py",)
    exclude_dirs: tuple = ("test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__")


# --data given as a folder: the text files read from it (the default, the stdlib, reads .py
# only, so its validation split is the one the shipped model was trained beside).
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def default_data_dir() -> Path:
    """The running interpreter's standard library sources: present on every machine."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_text_files(root: Path, cfg: DataConfig) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise UserError(f"--data {root}: not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in cfg.exclude_dirs and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(cfg.suffixes)]
    if not files:
        raise UserError(f"--data {root}: no text files ({', '.join(cfg.suffixes)}) found")
    return files


def clean_text(text: str) -> str:
    """Normalizes line endings, strips trailing whitespace and tabs-vs-spaces noise."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    text = "\n".join(line.rstrip().expandtabs(4) for line in lines).strip("\n")
    return text + "\n"


def split_paragraphs(text: str, size: int) -> list[str]:
    """`text` cut at blank lines into pieces of about `size` characters (a paragraph longer
    than that stays whole)."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) > size:
            pieces.append(current.strip("\n") + "\n")
            current = ""
        current += para + "\n\n"
    if current.strip():
        pieces.append(current.strip("\n") + "\n")
    return pieces


def _is_val(text: str, val_fraction: float) -> bool:
    # By content hash, not file order: the split does not move when files are added.
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def sources_digest(root: Path, cfg: DataConfig) -> str:
    """A digest of the text files `root` gives: their paths under it, sizes and modification
    times (not their bytes: a run reads every file of a large corpus once, when it prepares it,
    not at every restart). What a prepared folder was made from, so that a later run can tell
    when those files changed."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in find_text_files(root, cfg):
        try:
            st = path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "unreadable"
        digest.update(f"{path.relative_to(root) if path != root else path.name}\0{stamp}\0".encode())
    return digest.hexdigest()


def collect_documents(root: Path, cfg: DataConfig, progress=None, say_left_out: bool = False) -> list[dict]:
    """Reads, cleans and exactly de-duplicates documents; tags each one train or val. What
    is left out is said when there is progress to show, or `say_left_out`."""
    seen, docs = set(), []
    dropped: dict[str, int] = {}  # why a document was left out -> how many
    files = find_text_files(root, cfg)
    for i, path in enumerate(files):
        if progress:
            progress("read", i + 1, len(files))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            dropped["not UTF-8 text"] = dropped.get("not UTF-8 text", 0) + 1
            continue
        except OSError:
            dropped["unreadable"] = dropped.get("unreadable", 0) + 1
            continue
        text = clean_text(text)
        # One file given as the corpus is cut into documents, so it has a validation split.
        for text in split_paragraphs(text, DOC_CHARS) if Path(root).is_file() else [text]:
            key = hashlib.sha256(text.encode()).hexdigest()
            why = ("empty" if not text.strip() else
                   f"shorter than {cfg.min_chars} characters" if len(text) < cfg.min_chars else
                   "binary (a NUL byte)" if "\x00" in text else
                   f"holds the document separator {EOS}" if EOS in text else
                   f"a line over {cfg.max_line_chars} characters"
                   if max(len(line) for line in text.split("\n")) > cfg.max_line_chars else
                   "a duplicate" if key in seen else None)
            if why is not None:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            seen.add(key)
            split = "val" if _is_val(text, cfg.val_fraction) else "train"
            docs.append({"path": path.name if path == Path(root) else str(path.relative_to(root)),
                         "split": split, "text": text})
    left_out = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items()))
    if not docs:
        raise UserError(f"--data {root}: no usable text after cleaning ({left_out or 'nothing read'})")
    if cfg.val_fraction > 0 and (len(docs) < 2 or not any(d["split"] == "train" for d in docs)):
        raise UserError(f"--data {root}: too few documents ({len(docs)}) to hold out a validation split"
                        + (f"; left out: {left_out}" if left_out else ""))
    if dropped and (progress or say_left_out):
        notes.note(f"--data {root}: {len(docs)} document{'' if len(docs) == 1 else 's'}; left out: {left_out}")
    if cfg.val_fraction > 0 and not any(d["split"] == "val" for d in docs):
        # Tiny corpora: move one document so that validation is never empty.
        docs[-1]["split"] = "val"
    return docs


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def prepare(data_dir: Path, out: Path, cfg: DataConfig | None = None, progress=None,
            tokenizer: Path | None = None) -> Path:
    """Prepares `data_dir` into `out` (resumable); returns `out`. With `tokenizer` (a
    tokenizer.json), the text is tokenized with it instead of a newly trained one."""
    cfg = cfg or DataConfig()
    out = Path(out)
    meta_path = out / "meta.json"
    wanted = {"data_dir": str(Path(data_dir).resolve()), "config": asdict(cfg)}
    if tokenizer is not None:  # recorded only when given, so older prepared folders still match
        wanted["tokenizer"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    wanted["config"]["suffixes"] = list(cfg.suffixes)
    wanted["config"]["exclude_dirs"] = list(cfg.exclude_dirs)
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{meta_path}: not valid JSON; delete {out} to prepare the data again") from None
        if not isinstance(meta, dict):
            raise UserError(f"{meta_path}: not a JSON object; delete {out} to prepare the data again")
        recorded = (meta.get("config") or {}).get("suffixes") if isinstance(meta.get("config"), dict) else None
        if recorded == list(DataConfig.suffixes) and list(cfg.suffixes) == list(TEXT_SUFFIXES):
            # a --data run prepared before .txt/.md/.rst were read: resumed on the data it prepared
            wanted["config"]["suffixes"] = recorded
        if {k: meta.get(k) for k in wanted} != wanted:
            raise UserError(f"{out}: prepared from different data or settings; use another --out")
        # Recorded since 2026-12-07: an older folder has no digest and is taken as it is.
        if meta.get("sources") is not None:
            try:
                changed = meta["sources"] != sources_digest(Path(data_dir), cfg)
            except UserError:  # the files are gone (or were all renamed): the prepared data still serves
                changed = True
            if changed:
                notes.note(f"--data {data_dir}: its files changed since {out} was prepared from them; this run "
                           f"goes on with the data prepared then (train on the new files with another --out)")
        return out
    docs_path, sources_path = out / "docs.jsonl", out / "sources.sha256"
    if not docs_path.exists():
        sources = sources_digest(Path(data_dir), cfg)  # before reading them: a change meanwhile shows later
        docs = collect_documents(Path(data_dir), cfg, progress)  # a bad --data fails before out/ exists
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(sources_path, sources.encode())
        _write_atomic(docs_path, "".join(json.dumps(d) + "\n" for d in docs).encode())
    # the files the documents were read from (an interrupted preparation resumes on its documents)
    sources = sources_path.read_text().strip() if sources_path.is_file() else None
    docs = [json.loads(line) for line in docs_path.read_text().splitlines()]
    by_split = {s: [d["text"] for d in docs if d["split"] == s] for s in ("train", "val")}

    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        if progress:
            progress("tokenizer", 0, 1)
        if tokenizer is not None:
            _write_atomic(tok_path, Path(tokenizer).read_bytes())
        else:
            train_tokenizer(by_split["train"], cfg.vocab_size, tok_path)
    tok = load_tokenizer(tok_path)
    eos_id = tok.token_to_id(EOS)

    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    counts = {}
    for split, texts in by_split.items():
        n_shards = (len(texts) + DOCS_PER_SHARD - 1) // DOCS_PER_SHARD
        shard_paths = []
        for s in range(n_shards):
            path = shard_dir / f"{split}_{s:05d}.npy"
            shard_paths.append(path)
            if progress:
                progress(f"tokenize {split}", s + 1, n_shards)
            if path.exists():
                continue
            chunk = texts[s * DOCS_PER_SHARD:(s + 1) * DOCS_PER_SHARD]
            ids = []
            for enc in tok.encode_batch(chunk):
                ids += enc.ids + [eos_id]
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, np.asarray(ids, dtype=np.uint16))
            tmp.replace(path)
        stream = np.concatenate([[eos_id]] + [np.load(p) for p in shard_paths]).astype(np.uint16)
        _write_atomic(out / f"{split}.bin", stream.tobytes())
        counts[split] = {"documents": len(texts), "tokens": int(stream.size),
                         "bytes": sum(len(t.encode()) for t in texts)}
    _write_atomic(out / "val.txt", EOS.join(by_split["val"]).encode())
    meta = dict(wanted, vocab_size=tok.get_vocab_size(), eos_id=eos_id, splits=counts, sources=sources)
    _write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return out


def load_split(prepared: Path, split: str) -> np.ndarray:
    path = Path(prepared) / f"{split}.bin"
    if not path.exists():
        raise UserError(f"{path}: prepared token file missing")
    return np.memmap(path, dtype=np.uint16, mode="r")


def read_val_text(path: Path, option: str = "") -> list[str]:
    """Splits a val.txt (documents separated by <|endoftext|>) back into documents; a .jsonl
    holds one document a line (see read_jsonl). A byte-order mark is not text."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [d for d in read_jsonl(path, "--data") if d]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{option + ' ' if option else ''}{path}: not UTF-8 text (byte {e.start})") from None
    return [d for d in text.split(EOS) if d]


def read_jsonl(path: Path, option: str) -> list[str]:
    """The texts of a .jsonl: a JSON string or {"text": ...} a line (blank lines skipped); a
    bad file is a UserError naming `option`."""
    try:
        raw = Path(path).read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{option} {path}: not a UTF-8 text file ({e})") from None
    texts = []
    for i, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 may stand in a JSON string
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{option} {path}: line {i} is not JSON ({e.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise UserError(f"{option} {path}: line {i} is neither a string nor an object with \"text\"")
        texts.append(text)
    return texts


def encode_documents(tok, docs: list[str]) -> np.ndarray:
    """The token stream `<eos> doc1 <eos> doc2 <eos> ...` of `docs` (matches val.bin); with a
    tokenizer that has no `<|endoftext|>` (most Hugging Face ones), the documents one after another."""
    eos_id = tok.token_to_id(EOS)
    sep = [] if eos_id is None else [eos_id]
    ids = list(sep)
    for enc in tok.encode_batch(docs):
        ids += enc.ids + sep
    return np.asarray(ids, dtype=np.int64)
