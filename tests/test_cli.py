"""The command line: inspect and convert, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.cli import cli
from graphopt.testing import assert_close, run_ort, token_feeds

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_has_examples():
    for cmd in ([], ["inspect"], ["convert"]):
        r = invoke(*cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output


def test_inspect_text_and_json():
    r = invoke("inspect", EXAMPLE)
    assert r.exit_code == 0, r.output
    assert "x: f32[batch, 16]" in r.output and "probs: f32[batch, 8]" in r.output
    assert "824" in r.output  # parameters: 16*32 + 32 + 32*8 + 8 + 8 + 8
    r = invoke("inspect", EXAMPLE, "--json")
    s = json.loads(r.output)
    assert s["parameters"]["count"] == 824 and s["ops"] == {"Add": 2, "MatMul": 2, "Gelu": 1,
                                                          "LayerNormalization": 1, "Softmax": 1}
    assert s["inputs"] == [{"name": "x", "type": "f32[batch, 16]"}]
    r = invoke("inspect", EXAMPLE, "--ir")
    assert r.output.splitlines()[2].startswith("graph @tiny_mlp(%x: f32[batch, 16])")


def test_convert_roundtrip_through_text(exported, tmp_path):
    _, path = exported("gpt2", "dynamo")
    r = invoke("convert", path, "-o", tmp_path / "g.gir")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.weights.safetensors").exists()
    r = invoke("convert", tmp_path / "g.gir", "-o", tmp_path / "back.onnx")
    assert r.exit_code == 0, r.output
    feeds = token_feeds(2, 7)
    assert_close(run_ort(tmp_path / "back.onnx", feeds)["output"], run_ort(path, feeds)["output"], rtol=0, atol=1e-6)


def test_edited_gir_changes_the_model(tmp_path):
    invoke("convert", EXAMPLE, "-o", tmp_path / "m.gir")
    text = (tmp_path / "m.gir").read_text()
    (tmp_path / "m.gir").write_text(text.replace("Gelu(%h1)", "Relu(%h1)"))
    assert invoke("convert", tmp_path / "m.gir", "-o", tmp_path / "relu.onnx").exit_code == 0
    assert [n.op_type for n in onnx.load(tmp_path / "relu.onnx").graph.node][2] == "Relu"


def test_convert_replaces_an_existing_output_only_with_overwrite_and_never_the_input(tmp_path):
    gir, weights = tmp_path / "m.gir", tmp_path / "m.weights.safetensors"
    assert invoke("convert", EXAMPLE, "-o", gir).exit_code == 0
    edited = gir.read_text().replace("Gelu(%h1)", "Relu(%h1)")
    gir.write_text(edited)  # hand edits: not replaced by a second convert
    old = weights.read_bytes()
    r = CliRunner().invoke(cli, ["convert", str(EXAMPLE), "-o", str(gir)])
    assert r.exit_code == 2 and r.stderr.strip() == f"error: -o {gir}: exists; give a new name, or --overwrite to replace it"
    assert gir.read_text() == edited and weights.read_bytes() == old
    # ... nor its weights file alone, beside a .gir that is gone
    gir.unlink()
    r = CliRunner().invoke(cli, ["convert", str(EXAMPLE), "-o", str(gir)])
    assert r.exit_code == 2 and f"would replace {weights} beside it, which exists" in r.stderr
    assert invoke("convert", EXAMPLE, "-o", gir, "--overwrite").exit_code == 0
    assert "Gelu(%h1)" in gir.read_text()
    # the input is never replaced, not even with --overwrite: neither the file nor the weights it names
    r = CliRunner().invoke(cli, ["convert", str(gir), "-o", str(gir), "--overwrite"])
    assert r.exit_code == 2 and "is the input" in r.stderr
    other = tmp_path / "other.gir"
    other.write_text(gir.read_text())  # names m.weights.safetensors
    before = (gir.read_bytes(), weights.read_bytes())
    r = CliRunner().invoke(cli, ["convert", str(other), "-o", str(gir), "--overwrite"])
    assert r.exit_code == 2 and f"which is part of the input {other}" in r.stderr
    assert (gir.read_bytes(), weights.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gir", "m.weights.safetensors", "other.gir"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = EXAMPLE.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.onnx").write_bytes(b"\x00\xffnot a model at all" * 10)
    invoke("convert", EXAMPLE, "-o", tmp_path / "ok.gir")
    text = (tmp_path / "ok.gir").read_text().splitlines()
    first_node = next(i for i, line in enumerate(text) if " = " in line)
    text[first_node] = text[first_node].replace(") :", " :")  # drop a closing parenthesis
    (tmp_path / "syntax.gir").write_text("\n".join(text) + "\n")
    (tmp_path / "syntax.weights.safetensors").write_bytes((tmp_path / "ok.weights.safetensors").read_bytes())
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    e = w.external_data.add()
    e.key, e.value = "location", "../../etc/passwd"
    m = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w]),
        opset_imports=[helper.make_opsetid("", 20)])
    (tmp_path / "escape.onnx").write_bytes(m.SerializeToString())
    return {
        "truncated": (tmp_path / "truncated.onnx", "truncated"),
        "garbage": (tmp_path / "garbage.onnx", "not a valid ONNX model"),
        "missing": (tmp_path / "nope.onnx", "no such file"),
        "syntax": (tmp_path / "syntax.gir", f"syntax.gir:{first_node + 1}:"),
        "escape": (tmp_path / "escape.onnx", "points outside the model's folder"),
    }


@pytest.mark.parametrize("case", ["truncated", "garbage", "missing", "syntax", "escape"])
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_input_is_one_line_exit_2_no_output(case, command, tmp_path):
    path, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "result" / "out.onnx"
    args = [command, path] + (["-o", out] if command == "convert" else [])
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "result").exists() or not any((tmp_path / "result").iterdir())


def test_real_process_exit_code_and_module_entry(tmp_path):
    r = subprocess.run([sys.executable, "-m", "graphopt", "inspect", str(tmp_path / "missing.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "graphopt", "convert", str(EXAMPLE), "-o", str(tmp_path / "t.gir")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.gir").read_text().count("\n") > 5


@pytest.fixture(scope="module")
def small_hf_decoder(tmp_path_factory):
    """A Llama-style Hugging Face folder of 64 positions and a vocabulary of 128, with a word-level
    tokenizer.json of its own that has no <|endoftext|> (as most Hugging Face tokenizers)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, max_position_embeddings=64, vocab_size=128)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    words = "the a of to and in is it that for on with as was at by be this from or an".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    text = " ".join(words[i % len(words)] for i in range(1000))  # 1000 tokens: windows of 256 would pass the context
    (folder.parent / "text.txt").write_text(text)
    return folder


def test_eval_of_an_artifact_fits_its_windows_to_the_context(small_hf_decoder, tmp_path):
    """`graphopt eval` scored 256-token windows whatever the model's context (64 here): TVM printed
    a NaN perplexity, ORT failed; and a tokenizer without <|endoftext|> crashed it. Now the windows
    fit and the perplexity is finite and the same on both backends."""
    ppl = {}
    for backend in ("ort", "tvm"):
        if backend == "tvm":
            pytest.importorskip("tvm")
        out = tmp_path / backend
        r = CliRunner().invoke(cli, ["optimize", str(small_hf_decoder), "-o", str(out), "-q", "--backend", backend,
                                     "--logits", "all"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["eval", str(out), "--data", str(small_hf_decoder.parent / "text.txt"), "--json"])
        assert r.exit_code == 0, r.output
        ppl[backend] = json.loads(r.output[r.output.index("{"):])["perplexity"]
    assert all(np.isfinite(p) and 1 < p < 1000 for p in ppl.values()), ppl
    if "tvm" in ppl:
        assert abs(ppl["tvm"] / ppl["ort"] - 1) < 1e-3, ppl


def test_generate_refuses_a_foreign_tokenizer_and_a_run_past_the_context(small_hf_decoder, tmp_path):
    """A prompt token past the model's vocabulary (the shipped model's tokenizer, 4096 tokens, on a
    128-token model) is a one-line error on the Hugging Face folder and on its artifact (TVM read
    out of bounds and printed garbage); so is a Hugging Face generation past its 64 positions."""
    import shutil

    from graphopt.errors import UserError
    from graphopt.generation_text import encode_prompts, load_tokenizer

    r = CliRunner().invoke(cli, ["generate", str(small_hf_decoder), "--prompt", "the a of to", "--max-new-tokens", "100"])
    assert r.exit_code == 2 and "need 103 positions; the model has 64" in r.output, r.output
    foreign = tmp_path / "foreign"
    shutil.copytree(small_hf_decoder, foreign)
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "default" / "tokenizer.json", foreign)
    r = CliRunner().invoke(cli, ["generate", str(foreign), "--prompt", "def hello_world():", "--max-new-tokens", "4"])
    assert r.exit_code == 2 and "past the model's vocabulary of 128" in r.output, r.output
    assert CliRunner().invoke(cli, ["optimize", str(foreign), "-o", str(tmp_path / "art"), "-q"]).exit_code == 0
    art = graphopt.load(tmp_path / "art")
    with pytest.raises(UserError, match="past the model's vocabulary of 128"):
        encode_prompts(art, load_tokenizer(tmp_path / "art"), ["def hello_world():"])
    # Token healing masks the first new token over the vocabulary: logits with a symbolic
    # vocabulary cannot say its size, so healing is refused rather than guessed.
    logits = next(o for o in art.manifest["signature"]["outputs"] if o["name"] == "logits")
    logits["shape"][-1] = "vocab"
    with pytest.raises(UserError, match="the logits' vocabulary is not static; token healing needs it"):
        encode_prompts(art, load_tokenizer(tmp_path / "art"), ["def "], heal=True)
    # (and the artifact's lowered model.onnx, ORT's own ops, is named as such by inspect)
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "art" / "model.onnx")])
    assert r.exit_code == 2 and "model.onnx is the lowered graph of the artifact" in r.output, r.output


def test_eval_of_an_artifact_without_logits_says_perplexity_needs_a_decoder(tmp_path):
    """An artifact without logits (an encoder's, here an MLP's): before, eval failed on a feed
    it made (a BERT artifact: "missing input 'token_type_ids'"); now it says what it measures
    and what measures an encoder."""
    import shutil

    graphopt.optimize(EXAMPLE, tmp_path / "mlp")
    shutil.copy(EXAMPLE.parent / "default" / "tokenizer.json", tmp_path / "mlp")
    r = invoke("eval", tmp_path / "mlp", "--data", EXAMPLE.parent / "default" / "val.txt")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no logits: perplexity measures a decoder" in r.output


def test_eval_of_an_artifact_scores_windows_of_its_checkpoints_context(tmp_path):
    """A graphopt.train checkpoint with a 512-token context: eval of its artifact cut the text
    into windows of 256 (perplexity 37.4 against the checkpoint's 60.0); the same measurement
    gives the same number."""
    import shutil

    ckpt = tmp_path / "ckpt512"
    shutil.copytree(EXAMPLE.parent / "default", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["max_seq_len"] = 512
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert invoke("optimize", ckpt, "-o", tmp_path / "art", "-q", "--logits", "all").exit_code == 0
    got = {}
    for name, folder in (("checkpoint", ckpt), ("artifact", tmp_path / "art")):
        r = invoke("eval", folder, "--max-tokens", "1100", "--json")
        assert r.exit_code == 0, r.output
        got[name] = json.loads(r.output[r.output.index("{"):])
    assert got["artifact"]["tokens"] == got["checkpoint"]["tokens"] == 1100
    assert abs(got["artifact"]["perplexity"] / got["checkpoint"]["perplexity"] - 1) < 1e-4, got


def test_inspect_refuses_a_graph_that_convert_refuses(tmp_path):
    """A .gir with an op nobody registered: inspect summarized it (exit 0) while convert and
    optimize refuse it; --ir still prints it as it is."""
    assert invoke("convert", EXAMPLE, "-o", tmp_path / "t.gir").exit_code == 0
    text = (tmp_path / "t.gir").read_text()
    assert "= Gelu(" in text
    (tmp_path / "u.gir").write_text(text.replace("= Gelu(", "= graphopt.NoSuchOp("))
    r = invoke("inspect", tmp_path / "u.gir")
    assert r.exit_code == 2 and "the graph does not verify" in r.output and "unknown op graphopt.NoSuchOp" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    r = invoke("inspect", tmp_path / "u.gir", "--ir")
    assert r.exit_code == 0 and "graphopt.NoSuchOp(" in r.output
    assert invoke("inspect", tmp_path / "t.gir").exit_code == 0
