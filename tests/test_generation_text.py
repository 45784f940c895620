"""Text out of `graphopt generate`, `Generator.generate_text` and the Generator's stops: every
EOS id of a model stops it, the continuation reads as it does after its prompt (SentencePiece
spaces, characters split over tokens), and the torch and artifact paths print the same.

The models are "chains": a tiny Llama whose attention and MLP add nothing, so that the greedy
next token depends on the current one only, and its output head maps each token of a chosen
chain to the next. Whatever the prompt's last token starts, the continuation is known.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import graphopt
from graphopt.cli import cli
from graphopt.errors import UserError
from graphopt.generation import CacheSpec, Generator, eos_ids
from graphopt.generation_text import TextStream, continuation, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = ROOT / "examples" / "default" / "tokenizer.json"  # byte-level BPE, 4096 tokens


def chain_folder(folder: Path, tokenizer_json: Path, chain: list[int], *, vocab: int, context: int = 128,
                 eos: int | list[int] = 0) -> Path:
    """A Hugging Face Llama folder whose greedy continuation of token chain[i] is chain[i + 1]."""
    import torch
    import transformers as tf

    assert len(set(chain)) == len(chain)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=0, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.randn(vocab, 64) * 0.1
        for a, b in zip(chain, chain[1:]):
            head[b] = model.model.embed_tokens.weight[a] * 10
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


def generate(model: Path, *args: str):
    return CliRunner().invoke(cli, ["generate", str(model), *args])


def after(tok, prompt_ids: list[int], new: list[int]) -> str:
    """The new text as it reads after the prompt."""
    head = tok.decode(prompt_ids)
    return tok.decode(prompt_ids + new)[len(head):]


# --------------------------------------------------------------------------------------
# A byte-level chain: "x", then 🎉 and é byte by byte, letters, then an end-of-turn token


@pytest.fixture(scope="module")
def byte_chain(tmp_path_factory):
    """(HF folder, its artifact, tokenizer, chain). The folder's generation_config.json lists two
    EOS ids, [1, 3857] (as Llama-3-Instruct's and Qwen2-Instruct's do); the chain reaches 3857
    before 1, so generation must stop at 3857 (transformers and onnxruntime-genai do)."""
    tmp = tmp_path_factory.mktemp("byte_chain")
    tok = load_tokenizer(SHIPPED_TOKENIZER.parent)
    alphabet = _byte_alphabet()
    vocab = tok.get_vocab()
    chain = ([tok.token_to_id("x")] + [vocab[alphabet[b]] for b in "🎉é".encode()]
             + [tok.token_to_id(c) for c in "yzwvu"] + [3857, 1, 2])
    folder = chain_folder(tmp / "hf", SHIPPED_TOKENIZER, chain, vocab=4096)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3857], "bos_token_id": 0,
                                                               "pad_token_id": 0}))
    (folder / "tokenizer.model").write_bytes(b"\x0a\x03sp!")  # stands for a SentencePiece model: copied as is
    graphopt.optimize(folder, tmp / "out")
    return folder, tmp / "out", tok, chain


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that stands for it in the vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_every_eos_id_is_kept_and_stops_generation(byte_chain):
    """Only the first of several EOS ids was kept (manifest eos_token_id 1): generation ran past
    the end-of-turn token 3857. Now the manifest and genai_config.json list both, and the
    artifact, the artifact's CLI and the Hugging Face folder's CLI (torch) stop at 3857, where
    transformers stops."""
    import torch
    import transformers as tf

    folder, out, tok, chain = byte_chain
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["eos_token_id"] == [1, 3857]
    assert json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"] == [1, 3857]
    stop = chain.index(3857)
    model = tf.LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([chain[:1]]), max_new_tokens=20, do_sample=False)[0, 1:].tolist()
    assert theirs == chain[1:stop + 1]  # transformers: up to and with the EOS it stopped at
    assert graphopt.load(out).generate([chain[:1]], 20).tokens == [chain[1:stop]]
    want = "x🎉éyzwvu\n"
    for model_path in (out, folder):
        r = generate(model_path, "--prompt", "x", "--max-new-tokens", "20")
        assert r.exit_code == 0, r.output
        assert r.stdout == want, (model_path, r.stdout)


def test_genai_stops_at_every_eos_id(byte_chain):
    og = pytest.importorskip("onnxruntime_genai")
    _, out, _, chain = byte_chain
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([chain[:1]], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][1:] == chain[1:chain.index(3857)]  # (the EOS not kept)


def test_generator_stops_at_any_of_its_eos_ids_and_reads_old_manifests():
    """A scripted model (no cache layers): row r's step s gives SCRIPT[r][s]."""
    script = [[5, 6, 7, 8, 9], [9, 4, 4, 4, 4]]
    calls = []

    def run(feeds):
        step = len(calls)
        calls.append(step)
        assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 16  # only ids of the vocabulary fed
        logits = np.zeros((len(feeds["input_ids"]), feeds["input_ids"].shape[1], 16), np.float32)
        for r, row in enumerate(script[:len(logits)]):
            logits[r, -1, row[step]] = 1
        return {"logits": logits}

    spec = CacheSpec(0, [], [], np.dtype(np.float32), np.dtype(np.int64), None)

    def tokens(eos, batch=1, **kw):
        calls.clear()
        return Generator(run, spec, eos_token_id=eos).generate([[1, 2]] * batch, 5, **kw).tokens

    assert tokens([9, 7]) == [[5, 6]]
    assert tokens(7) == [[5, 6]]  # an old manifest's single id
    assert tokens(None) == tokens(-1) == [[5, 6, 7, 8, 9]]
    assert tokens([7, 9], batch=2) == [[5, 6], []]
    # an EOS id past the vocabulary (a small model keeping GPT-2's 50256) listed first: a finished
    # row is fed the id it stopped at (before: the list's first, an out-of-bounds embedding read)
    assert tokens([50256, 9], batch=2) == [[5, 6, 7, 8], []]
    assert tokens([7, 9], eos_token_id=-1) == [[5, 6, 7, 8, 9]]  # the caller's choice wins
    assert tokens(None, eos_token_id=[8]) == [[5, 6, 7]]
    assert eos_ids([1, 3857]) == (1, 3857) and eos_ids(None) == ()
    with pytest.raises(UserError, match="eos_token_id"):
        eos_ids("</s>")


def test_torch_path_prints_characters_split_over_tokens_whole(byte_chain):
    """`graphopt generate HF_FOLDER` printed U+FFFD for the parts of 🎉 and then sliced by string
    length ("x��yzwv"); every prefix it prints is now a prefix of the whole text, as on the
    artifact, and a character the last token only began is not printed."""
    folder, out, tok, chain = byte_chain
    for n, want in ((3, "x"), (5, "x🎉"), (6, "x🎉é"), (8, "x🎉éyz")):
        for model_path in (folder, out):
            r = generate(model_path, "--prompt", "x", "--max-new-tokens", str(n))
            assert r.exit_code == 0 and r.stdout == want + "\n", (model_path, n, r.output)
    # a batch strips the unfinished character too (it printed U+FFFD where one prompt did not)
    r = generate(out, "--prompt", "x", "--prompt", "x", "--max-new-tokens", "3")
    assert r.exit_code == 0 and r.stdout == "x\nx\n", r.stdout


def test_tokenizer_model_and_other_tokenizer_files_are_copied(byte_chain):
    _, out, _, _ = byte_chain
    assert (out / "tokenizer.model").read_bytes() == b"\x0a\x03sp!"
    assert "tokenizer.model" in json.loads((out / "manifest.json").read_text())["files"]


def test_one_new_token_reports_no_decode_rate(byte_chain):
    """--max-new-tokens 1 printed "decode 0.0 tokens/s": no decode step ran."""
    folder, out, _, _ = byte_chain
    for model_path, backend in ((out, "onnxruntime"), (folder, "torch")):
        r = generate(model_path, "--prompt", "x", "--max-new-tokens", "1")
        assert r.exit_code == 0, r.output
        assert "time to first token" in r.stderr and "decode" not in r.stderr and backend in r.stderr, r.stderr
        r = generate(model_path, "--prompt", "x", "--max-new-tokens", "4")
        assert "decode" in r.stderr and "tokens/s" in r.stderr, r.stderr


def test_refusals_name_what_to_do(byte_chain):
    folder, out, _, _ = byte_chain
    r = generate(out, "--prompt", "x", "--backend", "torch")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "built for onnxruntime, not torch" in r.output and "graphopt generate MODEL" in r.output
    assert "--backend for that" not in r.output  # optimize has no torch backend
    r = generate(folder, "--prompt", "x", "--prompt", "y")
    assert r.exit_code == 2 and "a Hugging Face folder takes one --prompt" in r.output, r.output
    assert "graphopt optimize" in r.output and "checkpoint" not in r.output


def test_filters_at_temperature_zero_are_noted_and_api_arguments_checked_up_front(byte_chain):
    """--top-k/--top-p at the default --temperature 0 changed nothing without a word; the API took
    a non-callable on_tokens until after prefill, a negative num_blocks to numpy, an unknown
    option as a TypeError naming another function, and said of no prompts at all that a prompt
    needs a token."""
    import graphopt
    from graphopt.errors import UserError
    from graphopt.generation import Generator

    folder, out, _, _ = byte_chain
    r = generate(out, "--prompt", "x", "--max-new-tokens", "2", "--top-k", "5")
    assert r.exit_code == 0 and "at --temperature 0 (the default) decoding is greedy" in r.stderr, r.output
    r = generate(out, "--prompt", "x", "--max-new-tokens", "2", "--top-k", "5", "--temperature", "0.8")
    assert r.exit_code == 0 and "greedy" not in r.stderr, r.output
    artifact = graphopt.load(out)
    calls = []
    artifact.run = lambda feeds: calls.append(1)  # nothing may run before the arguments are checked
    for kwargs, message in (({"on_tokens": 5}, "on_tokens=5: a function of"),
                            ({"foo": 1}, "generate\(\) has no option 'foo'")):
        with pytest.raises(UserError, match=message):
            artifact.generate([[1, 2]], 2, **kwargs)
    with pytest.raises(UserError, match="no prompts: give one prompt"):
        artifact.generate([], 2)
    for bad in (-1, 0, "x", True):
        with pytest.raises(UserError, match="num_blocks=.*the paged cache's pool size"):
            Generator.for_artifact(artifact, num_blocks=bad)
    assert not calls


# --------------------------------------------------------------------------------------
# A SentencePiece-style tokenizer (Metaspace: "▁" for a space, none before the first word)


@pytest.fixture(scope="module")
def metaspace_chain(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tmp = tmp_path_factory.mktemp("metaspace")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    text = (ROOT / "examples" / "default" / "val.txt").read_text()[:20000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(tmp / "tokenizer.json"))
    prompt_ids = tok.encode("the value of").ids
    words = [i for t, i in sorted(tok.get_vocab().items()) if t.startswith("▁") and len(t) > 2 and t[1:].isalpha()]
    chain = [prompt_ids[-1]] + [i for i in words if i not in prompt_ids][:4]
    folder = chain_folder(tmp / "hf", tmp / "tokenizer.json", chain, vocab=512, eos=2)
    graphopt.optimize(folder, tmp / "out")
    return folder, tmp / "out", tok, prompt_ids, chain


def test_sentencepiece_continuation_keeps_its_leading_space(metaspace_chain):
    """The new ids were decoded alone, and a Metaspace decoder drops the first token's leading
    space: "the value ofimp". The continuation is now decode(prompt + new) past decode(prompt),
    streamed (CLI, artifact and torch) and returned (Generator.generate_text)."""
    folder, out, tok, prompt_ids, chain = metaspace_chain
    want = after(tok, prompt_ids, chain[1:])
    assert want.startswith(" ") and tok.decode(chain[1:2])[:1] != " "  # the case: decoded alone, no space
    for model_path in (out, folder):
        r = generate(model_path, "--prompt", "the value of", "--max-new-tokens", "4")
        assert r.exit_code == 0 and r.stdout == "the value of" + want + "\n", (model_path, r.output)
    artifact = graphopt.load(out)
    gen = Generator.for_artifact(artifact)
    pieces = []
    result = gen.generate_text(tok, [prompt_ids], 4, on_text=lambda row, piece: pieces.append(piece))
    assert result.texts == [want] and "".join(pieces) == want and pieces[0].startswith(" ")
    from graphopt.generation import generate_text
    assert generate_text(artifact, ["the value of"], 4).texts == [want]
    assert artifact.generate("the value of", 4).texts == [want]  # the Python API's text path too


def test_text_stream_waits_for_split_characters_and_falls_back_to_the_new_ids():
    tok = load_tokenizer(SHIPPED_TOKENIZER.parent)
    alphabet, vocab = _byte_alphabet(), tok.get_vocab()
    bytes_ = [vocab[alphabet[b]] for b in "é!".encode()]
    stream = TextStream(tok, tok.encode("a").ids)
    assert [stream.put([t]) for t in bytes_] == ["", "é", "!"] and stream.end() == ""
    stream = TextStream(tok, tok.encode("a").ids)
    assert stream.put(bytes_[:1]) == "" and stream.end() == ""  # only begun: not printed as U+FFFD

    class Rewrites:  # a decoder whose text of the context changes with what follows it
        def decode(self, ids):
            return "".join("AB"[i] for i in ids).replace("AB", "C")

    assert continuation(Rewrites(), [0], [1, 0]) == "BA"  # the new ids alone
    stream = TextStream(Rewrites(), [0])
    assert [stream.put([t]) for t in (1, 0, 0)] == ["", "A", "A"]  # it goes on after the rewrite


def test_text_stream_decodes_a_bounded_window_however_long_the_text():
    """Before, every step decoded the prompt and every new id (2,000 new tokens after a 4,000-token
    prompt: about 10M tokens decoded); now a few tokens a step, and the text is the same."""
    tok = load_tokenizer(SHIPPED_TOKENIZER.parent)
    longest = []

    class Counting:
        def decode(self, ids):
            longest.append(len(ids))
            return tok.decode(ids)

    prompt = tok.encode("def f(x):\n    return x\n" * 200).ids
    new = tok.encode("class Büro:\n    🎉 = 'é' * 3\n" * 20).ids
    stream = TextStream(Counting(), prompt)
    text = "".join(stream.put([t]) for t in new) + stream.end()
    assert text == continuation(tok, prompt, new) and max(longest) <= TextStream.CONTEXT + 8


# --------------------------------------------------------------------------------------
# A model of 16 positions: the default --max-new-tokens (200) fits itself to it


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("short")
    tok = load_tokenizer(SHIPPED_TOKENIZER.parent)
    chain = [tok.token_to_id(c) for c in "abcdefghijklmnopqrstu"]
    folder = chain_folder(tmp / "hf", SHIPPED_TOKENIZER, chain, vocab=4096, context=16, eos=1)
    graphopt.optimize(folder, tmp / "out")
    return folder, tmp / "out", tok


def test_default_max_new_tokens_fits_the_context_and_both_paths_agree(short_context):
    """The default 200 failed on a 16-position model with a message that did not name
    --max-new-tokens, and the torch path refused prompt + new = context + 1 where the artifact
    (rightly: the last new token needs no position) took it. Now the default is capped, once
    said, and both paths take and refuse the same counts."""
    folder, out, tok = short_context
    prompt = "c"  # 1 token: 16 - 1 + 1 = 16 new tokens fit
    assert len(tok.encode(prompt).ids) == 1
    want = "cdefghijklmnopqrs\n"  # 16 letters after "c"
    for model_path in (out, folder):
        r = generate(model_path, "--prompt", prompt)
        assert r.exit_code == 0, (model_path, r.output)
        assert r.stdout == want, (model_path, r.stdout)
        assert r.stderr.count("--max-new-tokens 16") == 1, r.stderr
        r = generate(model_path, "--prompt", prompt, "--max-new-tokens", "16")
        assert r.exit_code == 0 and r.stdout == want and "--max-new-tokens" not in r.stderr, r.output
        r = generate(model_path, "--prompt", prompt, "--max-new-tokens", "17")
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "--max-new-tokens 17 need 17 positions; the model has 16" in r.output, r.output
        assert r.stdout == ""


def test_a_prompt_ending_in_a_character_of_several_tokens_heals_without_a_stray_replacement():
    """Token healing takes back the prompt's last token: for "x 世界" in a byte-level tokenizer
    that is the last byte of 界, and the rest of the prompt then decodes to "x 世\\ufffd". The
    new text fell back to the new ids decoded alone: "\\ufffd////" in `result.texts` and a batch."""
    from graphopt.generation_text import check_text

    tok = load_tokenizer(Path(__file__).resolve().parents[1] / "examples" / "default")
    for prompt in ("x 世界", "a：", "日本語のテキスト："):
        ids = tok.encode(prompt).ids
        healed = continuation(tok, ids[:-1], ids[-1:])
        assert prompt.endswith(healed) and healed and "\ufffd" not in healed, (prompt, healed)
        new = ids[-1:] + tok.encode("////").ids
        assert continuation(tok, ids[:-1], new, skip=healed) == "////", prompt
    with pytest.raises(UserError, match=r"--prompt 'caf\\udce9': not valid UTF-8 text \(character 4\)"):
        check_text(["caf\udce9"])  # what a shell hands on for the bytes caf\xe9
    r = generate(Path(__file__).resolve().parents[1] / "examples" / "default", "--prompt", "caf\udce9")
    assert r.exit_code == 2 and "not valid UTF-8 text" in r.output, r.output  # an internal error (TypeError)
