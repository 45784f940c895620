import json

import numpy as np
import pytest

from graphopt.errors import UserError
from graphopt.train.data import DataConfig, clean_text, collect_documents, encode_documents, prepare, read_val_text
from graphopt.train.tokenizer import EOS, load_tokenizer

CFG = DataConfig(vocab_size=384, val_fraction=0.1)


def test_clean_text_normalizes_line_endings_and_trailing_space():
    assert clean_text("a = 1  \r\n\tb = 2\r\n\n\n") == "a = 1\n    b = 2\n"


def test_collect_drops_duplicates_short_and_binary_files(corpus):
    docs = collect_documents(corpus, CFG)
    paths = {d["path"] for d in docs}
    assert len(docs) == 160  # 160 generated; the copy, the short file and README.bin dropped
    assert len(paths & {"pkg0/copy_of_000.py", "pkg0/mod_000.py"}) == 1  # first in walk order kept
    assert "pkg1/short.py" not in paths
    val = [d for d in docs if d["split"] == "val"]
    assert 5 <= len(val) <= 35  # ~10 % by content hash


def test_prepare_packs_streams_that_match_val_text(corpus, tmp_path):
    out = prepare(corpus, tmp_path / "prep", CFG)
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out / "tokenizer.json")
    eos_id = tok.token_to_id(EOS)
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    assert val[0] == eos_id and val[-1] == eos_id
    assert len(val) == meta["splits"]["val"]["tokens"]
    # The shipped val.txt re-tokenizes to exactly the packed validation stream.
    docs = read_val_text(out / "val.txt")
    assert len(docs) == meta["splits"]["val"]["documents"]
    np.testing.assert_array_equal(encode_documents(tok, docs), np.asarray(val, dtype=np.int64))
    # Byte-level BPE round-trips text exactly.
    assert tok.decode(tok.encode(docs[0]).ids) == docs[0]


def test_prepare_resumes_after_an_interruption(corpus, tmp_path):
    first = prepare(corpus, tmp_path / "a", CFG)
    train_bin = (first / "train.bin").read_bytes()
    # Simulate a crash during tokenization: no meta, no packed files, one shard missing.
    for name in ("meta.json", "train.bin", "val.bin"):
        (first / name).unlink()
    shards = sorted((first / "shards").glob("train_*.npy"))
    shards[-1].unlink()
    mtime = shards[0].stat().st_mtime_ns
    prepare(corpus, first, CFG)
    assert (first / "train.bin").read_bytes() == train_bin
    assert shards[0].stat().st_mtime_ns == mtime  # finished shards were not redone


def test_prepare_refuses_a_folder_prepared_differently(corpus, tmp_path):
    prepare(corpus, tmp_path / "p", CFG)
    with pytest.raises(UserError, match="prepared from different data or settings"):
        prepare(corpus, tmp_path / "p", DataConfig(vocab_size=300, val_fraction=0.1))


def test_no_text_files_is_a_user_error(tmp_path):
    (tmp_path / "notes.bin").write_bytes(b"\x00")
    with pytest.raises(UserError, match="no text files"):
        collect_documents(tmp_path, CFG)


def test_a_data_folder_reads_text_files_and_an_earlier_py_only_preparation_resumes(corpus, tmp_path):
    """--data DIR reads .txt/.md/.rst as well as .py (TEXT_SUFFIXES); a folder prepared before
    that (its meta records .py only) is resumed as it was prepared, not refused."""
    from graphopt.train.data import TEXT_SUFFIXES

    notes = tmp_path / "notes"
    for i, src in enumerate(sorted(corpus.rglob("mod_*.py"))[:40]):
        (notes / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (notes / f"d{i % 3}" / f"n{i}{('.txt', '.md', '.rst')[i % 3]}").write_text(src.read_text())
    docs = collect_documents(notes, DataConfig(vocab_size=384, suffixes=TEXT_SUFFIXES))
    assert {d["path"].rsplit(".", 1)[1] for d in docs} == {"txt", "md", "rst"}
    with pytest.raises(UserError, match="no text files"):
        collect_documents(notes, CFG)  # the stdlib default reads .py only
    prepare(corpus, tmp_path / "old", CFG)
    assert prepare(corpus, tmp_path / "old", DataConfig(vocab_size=384, val_fraction=0.1, suffixes=TEXT_SUFFIXES))


def test_a_folder_that_leaves_one_document_says_what_it_left_out(tmp_path):
    """Documents holding the separator are left out; one document left cannot give both a
    training and a validation split: an error that says so and why the rest went."""
    body = "\n".join(f"line {i} of some text that is long enough to count" for i in range(10)) + "\n"
    (tmp_path / "a.txt").write_text(body)
    (tmp_path / "b.txt").write_text(body.replace("line 3", f"line 3 {EOS}"))
    (tmp_path / "c.txt").write_text(body.replace("line 4", f"line 4 {EOS}"))
    cfg = DataConfig(vocab_size=384, suffixes=(".txt",))
    with pytest.raises(UserError, match=r"too few documents \(1\) to hold out a validation split; left out: "
                                        r"2 holds the document separator <\|endoftext\|>"):
        collect_documents(tmp_path, cfg)
    # eval scores what is there (nothing held out): one document is enough
    assert [d["path"] for d in collect_documents(tmp_path, DataConfig(val_fraction=0.0, suffixes=(".txt",)))] == ["a.txt"]
    (tmp_path / "d.txt").write_text(body.replace("line 5", "line five"))
    assert len(collect_documents(tmp_path, cfg)) == 2


def test_a_prepared_folder_whose_files_changed_says_so_and_keeps_its_data(corpus_writer, tmp_path, capsys):
    """The files of --data changed after their folder was prepared: the run goes on with the data
    it was prepared from (a resumed run keeps its stream) and says so; unchanged, nothing is said."""
    corpus = corpus_writer(tmp_path / "corpus", 40)
    out = prepare(corpus, tmp_path / "p", CFG)
    train_bin = (out / "train.bin").read_bytes()
    prepare(corpus, out, CFG)
    assert "changed since" not in capsys.readouterr().err
    victim = sorted(corpus.rglob("*.py"))[0]
    victim.write_text(victim.read_text() + "\n# one more line\n")
    prepare(corpus, out, CFG)
    assert f"--data {corpus}: its files changed since {out} was prepared" in capsys.readouterr().err
    assert (out / "train.bin").read_bytes() == train_bin
    for path in corpus.rglob("*.py"):  # all gone: the prepared data still serves, with the note
        path.unlink()
    prepare(corpus, out, CFG)
    assert "its files changed since" in capsys.readouterr().err


def test_a_folder_prepared_before_digests_were_recorded_is_taken_as_it_is(corpus_writer, tmp_path, capsys):
    corpus = corpus_writer(tmp_path / "corpus", 40)
    out = prepare(corpus, tmp_path / "p", CFG)
    meta = json.loads((out / "meta.json").read_text())
    del meta["sources"]
    (out / "meta.json").write_text(json.dumps(meta))
    sorted(corpus.rglob("*.py"))[0].write_text("x = 1\n" * 100)
    prepare(corpus, out, CFG)
    assert "changed since" not in capsys.readouterr().err
