"""The train/eval/generate commands, and the one-line errors (exit code 2) for user mistakes."""
import json
import shutil

import pytest
from click.testing import CliRunner

from graphopt.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def checkpoint_copy(tiny_run, tmp_path):
    latest = (tiny_run / "checkpoints" / "latest").read_text().strip()
    return shutil.copytree(tiny_run / "checkpoints" / latest, tmp_path / "ckpt")


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_every_command_has_help_with_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert f"graphopt {command} " in result.output and "Examples" in result.output


def test_train_on_a_folder_without_text_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.png").write_bytes(b"\x89PNG")
    _assert_one_line_error(_run("train", "--data", tmp_path / "data", "--out", tmp_path / "out",
                                "--preset", "tiny"), "no text files", str(tmp_path / "data"))


def test_train_with_heads_that_do_not_divide_the_width(tmp_path, corpus):
    _assert_one_line_error(_run("train", "--data", corpus, "--out", tmp_path, "--preset", "tiny",
                                "--dim", "30"), "num_heads=4 does not divide dim=30")


def test_train_config_file_with_an_impossible_shape(tmp_path, corpus):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": str(corpus), "out": str(tmp_path / "o"), "preset": "tiny",
                                  "model": {"num_heads": 4, "num_kv_heads": 3}}))
    _assert_one_line_error(_run("train", "--config", config), "num_kv_heads=3 must divide num_heads=4")


def test_train_config_file_with_an_unknown_option(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"learning_rate": 1.0}))
    _assert_one_line_error(_run("train", "--config", config), str(config), "learning_rate")


def test_eval_checkpoint_with_a_missing_weight(checkpoint_copy):
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint_copy / "model.safetensors")
    del weights["blocks.1.w_up.weight"]
    save_file(weights, checkpoint_copy / "model.safetensors")
    _assert_one_line_error(_run("eval", checkpoint_copy), "missing weight(s) blocks.1.w_up.weight")


def test_eval_checkpoint_whose_config_does_not_match_its_weights(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model"]["mlp_hidden"] = 80
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(_run("generate", checkpoint_copy, "--prompt", "def "),
                           "blocks.0.w_gate.weight has shape (64, 32)", "(80, 32)")


def test_eval_checkpoint_with_an_impossible_config(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["model"]["num_heads"] = 5
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    _assert_one_line_error(_run("eval", checkpoint_copy), "num_heads=5 does not divide dim=32")


def test_eval_of_a_folder_that_is_not_a_checkpoint(tmp_path):
    _assert_one_line_error(_run("eval", tmp_path), "not a checkpoint")


def test_eval_prints_perplexity_and_bits_per_byte(tiny_run):
    result = _run("eval", tiny_run, "--json")
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout)
    assert numbers["source"].endswith("val.txt")
    assert 1 < numbers["perplexity"] < numbers["unigram_perplexity"]
    assert 0 < numbers["bits_per_byte"] < 8
    text = _run("eval", tiny_run).stdout
    assert f"perplexity:         {numbers['perplexity']:.3f}" in text and "bits per byte:" in text


def test_eval_on_a_given_text_folder(tiny_run, corpus):
    result = _run("eval", tiny_run, "--data", corpus, "--max-tokens", "2000", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == 2000


def test_eval_on_a_folder_scores_every_text_file_and_says_what_it_left_out(tiny_run, tmp_path):
    """Not the training cleaner's rules: a prose paragraph (one line over 1000 characters), a
    short note and a tests/ folder are scored; a binary file is left out, and said (before, two
    of three files were dropped without a word)."""
    folder = tmp_path / "texts"
    (folder / "tests").mkdir(parents=True)
    (folder / "a.md").write_text("The quick brown fox jumps over the lazy dog. " * 40 + "\n")
    (folder / "b.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (folder / "c.txt").write_text("a short note\n")
    (folder / "tests" / "d.py").write_text("assert 1 + 1 == 2\n")
    (folder / "e.txt").write_bytes(b"\x00\x01binary")
    (folder / "f.txt").write_text("\n")
    (folder / "site-packages").mkdir()  # a Python tree's installed packages are not its text
    (folder / "site-packages" / "g.py").write_text("import os\n")
    result = _run("eval", tiny_run, "--data", folder, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 4
    assert "left out: 1 binary (a NUL byte), 1 empty" in result.stderr
    first = _run("eval", tiny_run, "--data", folder, "--max-tokens", "20", "--json")  # a.md alone is longer
    assert json.loads(first.stdout)["documents"] == 1 and json.loads(first.stdout)["tokens"] == 20


def test_eval_reads_a_jsonl_as_its_texts_and_a_byte_order_mark_is_not_text(tiny_run, tmp_path):
    """A .jsonl was scored as the JSON text itself (its braces, quotes and keys), and a BOM as
    three more bytes of text; both now score as the plain file of the same documents."""
    from graphopt.train.data import EOS

    docs = ["def f(x):\n    return x + 1\n" * 3, "The quick brown fox jumps over the lazy dog.\u2028\n" * 4]
    (tmp_path / "docs.txt").write_text(EOS.join(docs), encoding="utf-8")
    # (ensure_ascii=False writes U+2028 as it is: a line separator to str.splitlines, not to JSON Lines)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs)
                                         + "\r\n\n", encoding="utf-8")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "docs.txt").read_bytes())
    got = {name: json.loads(_run("eval", tiny_run, "--data", tmp_path / name, "--json").stdout)
           for name in ("docs.txt", "docs.jsonl", "bom.txt")}
    want = got["docs.txt"]
    assert want["documents"] == 2
    for name in ("docs.jsonl", "bom.txt"):
        assert {k: got[name][k] for k in ("documents", "tokens", "bytes", "perplexity")} == \
            {k: want[k] for k in ("documents", "tokens", "bytes", "perplexity")}, name
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": 1}\n')
    _assert_one_line_error(_run("eval", tiny_run, "--data", tmp_path / "bad.jsonl"),
                           "line 2 is neither a string nor an object with \"text\"")


def test_generate_greedy_is_deterministic_and_sampling_follows_the_seed(tiny_run):
    greedy = [_run("generate", tiny_run, "--prompt", "def ", "--max-new-tokens", "40").stdout
              for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("def ") and len(greedy[0]) > 20
    sampled = [_run("generate", tiny_run, "--prompt", "def ", "--max-new-tokens", "40", "--temperature", "1.0",
                    "--top-k", "50", "--top-p", "0.9", "--seed", str(seed)).stdout for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_generate_rejects_a_bad_sampling_option(tiny_run):
    _assert_one_line_error(_run("generate", tiny_run, "--prompt", "x", "--top-p", "0"), "--top-p")


def test_token_healing_lets_the_first_token_extend_the_prompt(tiny_run):
    from graphopt.train import load_model, load_tokenizer
    from graphopt.train.generate import _healing_mask, generate

    model, cfg = load_model(tiny_run)
    tok = load_tokenizer(tiny_run)
    last = tok.encode("def ").ids[-1]  # "def " ends in a lone-space token "Ġ"
    allowed = _healing_mask(tok, last, cfg.vocab_size)
    assert allowed[last] and 1 < int(allowed.sum()) < cfg.vocab_size
    assert all(tok.id_to_token(i).startswith("Ġ") for i in allowed.nonzero().flatten().tolist())
    pieces = []
    text = generate(model, tok, "def ", max_new_tokens=20, on_text=pieces.append)
    assert text and "".join(pieces) == text  # streamed pieces add up to the continuation
