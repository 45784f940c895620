"""A generation-ready ORT artifact runs in onnxruntime-genai: the folder `graphopt optimize`
writes loads with `og.Model`, its tokenizer with `og.Tokenizer`, and greedy generation gives
the tokens of PyTorch and of graphopt's own Generator."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import graphopt

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "examples" / "default"
PROMPT = [0, 5, 17, 3, 99, 42, 7]  # <|endoftext|> starts a document, as graphopt.train's prompts do


def genai_batch(folder: Path, prompts: list[list[int]], max_new_tokens: int, pad: int) -> list[list[int]]:
    """onnxruntime-genai's loop over a batch, left-padded with `pad`; every row's new tokens
    (no EOS stop: max_new_tokens of them)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    longest = max(map(len, prompts))
    params.set_search_options(max_length=longest + max_new_tokens, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    ids = np.full((len(prompts), longest), pad, np.int32)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = p
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [[int(t) for t in gen.get_sequence(r)[longest:]] for r in range(len(prompts))]


def genai_greedy(folder: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """onnxruntime-genai's own loop; its new tokens up to (not with) the EOS it stops at."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    new = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
    eos = json.loads((folder / "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]  # one id or several
    return next((new[:i] for i, t in enumerate(new) if t in eos), new)


@pytest.fixture(scope="module")
def default_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / "default"
    graphopt.optimize(str(DEFAULT_MODEL), out)
    return out


def test_default_artifact_has_a_genai_config_that_describes_it(default_artifact):
    config = json.loads((default_artifact / "genai_config.json").read_text())
    manifest = json.loads((default_artifact / "manifest.json").read_text())
    model, decoder = config["model"], config["model"]["decoder"]
    assert {k: decoder[k] for k in ("filename", "head_size", "hidden_size", "num_attention_heads",
                                    "num_hidden_layers", "num_key_value_heads")} == {
        "filename": "model.onnx", "head_size": 32, "hidden_size": 192, "num_attention_heads": 6,
        "num_hidden_layers": 6, "num_key_value_heads": 2}
    assert (model["type"], model["context_length"], model["vocab_size"]) == ("llama", 256, 4096)
    # a graphopt.train checkpoint's config.json is not a Hugging Face config: not copied
    assert not (default_artifact / "config.json").exists() and "config.json" not in manifest["files"]
    assert model["eos_token_id"] == model["bos_token_id"] == model["pad_token_id"] == 0  # <|endoftext|>
    # its presents are GroupQueryAttention's: genai binds each to its past, written in place
    assert manifest["generation"]["past_present_share_buffer"] is True
    assert config["search"]["past_present_share_buffer"] is True and config["search"]["max_length"] == 256
    assert {"genai_config.json", "tokenizer_config.json"} <= set(manifest["files"])  # part of the artifact


def test_default_artifact_tokenizer_loads_in_genai_and_encodes_like_tokenizers(default_artifact):
    from tokenizers import Tokenizer

    text = (DEFAULT_MODEL / "val.txt").read_text()[:3000]
    tok = og.Tokenizer(og.Model(str(default_artifact)))
    want = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json")).encode(text).ids
    assert list(tok.encode(text)) == want
    assert tok.decode(want) == text


def test_default_artifact_greedy_64_tokens_in_genai_match_torch_and_the_generator(default_artifact):
    import torch

    from graphopt.train import load_model

    model = load_model(DEFAULT_MODEL)[0]
    want = []
    with torch.no_grad():
        logits, cache = model.forward_cached(torch.tensor([PROMPT]), None)
        for _ in range(64):
            want.append(int(logits[0, -1].argmax()))
            logits, cache = model.forward_cached(torch.tensor([[want[-1]]]), cache)
    assert 0 not in want  # the prompt is chosen so that no EOS cuts the comparison short
    assert genai_greedy(default_artifact, PROMPT, 64) == want
    assert graphopt.load(default_artifact).generate([PROMPT], 64).tokens[0] == want


@pytest.mark.slow
def test_hugging_face_llama_gqa_artifact_runs_in_genai_like_transformers(tmp_path):
    import torch

    from graphopt.testing import tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model  # 4 query heads over 2 key/value heads
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    graphopt.optimize(tmp_path / "hf", out)
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (4, 2, 8)
    prompt = [5, 17, 3, 99, 42, 7]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    assert len(want) >= 20  # enough tokens to compare
    assert genai_greedy(out, prompt, 40) == want
    assert graphopt.load(out).generate([prompt], 40).tokens[0] == want


@pytest.mark.slow
def test_gpt2_artifact_runs_in_genai_like_transformers(tmp_path):
    """genai_config.json said "type": "gpt2", which onnxruntime-genai 0.18 runs through its
    legacy GPT-2 class: that one feeds a combined `past_%d` cache per layer, not the
    past_key_values.%d.key|value inputs graphopt writes ("Model input was not found"). The type
    now follows the artifact's inputs, and genai's greedy tokens are transformers'."""
    import torch

    from graphopt.testing import tiny_hf_model

    model = tiny_hf_model("gpt2", seed=1).model
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    graphopt.optimize(tmp_path / "hf", out)
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] != "gpt2"
    for prompt in ([5, 17, 3, 99, 42, 7], [11, 2], [64, 1, 30, 8]):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert model.config.eos_token_id not in want  # (outside the 128-token vocabulary)
        assert genai_greedy(out, prompt, 16) == want, prompt


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_gpt2_artifact_shares_its_cache_in_genai(tmp_path, bits):
    """GPT-2-style sites keep GroupQueryAttention when the weights are 4- or 8-bit, so the
    growing artifact is marked shared: genai then binds one buffer a layer as past and
    present, and its greedy tokens are graphopt's Generator's (which shares it too)."""
    from graphopt.testing import tiny_hf_model

    tiny_hf_model("gpt2", seed=1).model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    graphopt.optimize(tmp_path / "hf", out, quantize=f"int{bits}:16")
    config = json.loads((out / "genai_config.json").read_text())
    artifact = graphopt.load(out)
    assert artifact.shares_cache_buffer and config["search"]["past_present_share_buffer"] is True
    for prompt in ([5, 17, 3, 99, 42, 7], [11, 2]):
        want = artifact.generate([prompt], 16, eos_token_id=-1).tokens[0]
        assert len(want) == 16  # (the config's EOS lies outside the 128-token vocabulary)
        assert genai_greedy(out, prompt, 16) == want, prompt


def test_layer_norms_without_a_bias_load_in_genai(tmp_path):
    """DBRX's LayerNorms have no bias: ORT's SkipLayerNormFusion, which genai's sessions run (graphopt's
    own disable it), crashed the process on them (a segmentation fault at og.Model); the lowering
    gives them a zero bias. Loaded in a child process, so that a crash fails this test alone; then
    genai's greedy tokens equal graphopt's Generator's."""
    import subprocess
    import sys

    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DbrxConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=128, eos_token_id=1,
                        bos_token_id=0, pad_token_id=0, attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2))
    tf.DbrxForCausalLM(cfg).eval().save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    graphopt.optimize(tmp_path / "hf", out)
    load = subprocess.run([sys.executable, "-c", f"import onnxruntime_genai as og; og.Model({str(out)!r})"],
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, (load.returncode, load.stderr[-2000:])
    prompt = [5, 17, 3, 99, 42, 7]
    want = graphopt.load(out).generate([prompt], 20, eos_token_id=-1).tokens[0]
    want = want[:want.index(1)] if 1 in want else want  # genai stops at the EOS
    assert len(want) >= 5 and genai_greedy(out, prompt, 20) == want


@pytest.mark.slow
def test_static_cache_artifact_shares_its_buffer_in_genai(tmp_path):
    """layout=static: genai binds each present to its past (past_present_share_buffer) and
    gives the tokens of the growing-cache artifact."""
    out = tmp_path / "static"
    graphopt.optimize(str(DEFAULT_MODEL), out, kv_layout="static")
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    want = graphopt.load(out).generate([PROMPT], 64).tokens[0]
    assert len(want) == 64 and genai_greedy(out, PROMPT, 64) == want


@pytest.mark.slow
def test_batches_in_genai_match_the_generator_where_genai_takes_them(tmp_path):
    """Batch 3 on a GQA Llama. Without padding, genai's batch gives the Generator's tokens.
    With left padding it cannot: onnxruntime-genai 0.18 feeds an attention_mask of all ones
    for the padded prompt (og.set_log_options(model_input_values=True) shows it), so its
    padded rows attend the pad tokens; the Generator's rows (each equal to PyTorch on the
    unpadded row, tests/test_kvcache.py) are what genai gives each prompt on its own, and
    genai's unpadded row is the Generator's."""
    from graphopt.testing import tiny_hf_model

    model = tiny_hf_model("llama", seed=3).model
    model.save_pretrained(tmp_path / "hf")
    graphopt.optimize(tmp_path / "hf", tmp_path / "out")
    artifact = graphopt.load(tmp_path / "out")
    pad = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["pad_token_id"]
    same_length = [[5, 17, 3, 99], [64, 1, 30, 8], [11, 40, 9, 12]]
    assert genai_batch(tmp_path / "out", same_length, 16, pad) == artifact.generate(same_length, 16,
                                                                                     eos_token_id=-1).tokens
    padded = [[5, 17, 3, 99, 42, 7], [11, 9], [64, 1, 30, 8]]
    ours = artifact.generate(padded, 16, eos_token_id=-1).tokens
    assert ours == [genai_batch(tmp_path / "out", [p], 16, pad)[0] for p in padded]
    theirs = genai_batch(tmp_path / "out", padded, 16, pad)
    assert theirs[0] == ours[0]
    assert theirs[1:] != ours[1:]  # genai attends the pads (if this fails, genai now masks them: test it as equal)


def test_the_default_artifact_takes_a_second_turn_in_genai(default_artifact):
    """A chat's next turn (`append_tokens` after generating) failed inside genai's
    GroupQueryAttention while the default artifact's cache grew (past_present_share_buffer
    false). Shared now, the second turn runs and continues what genai's cache holds: the prompt,
    the first turn's tokens but the last (which genai 0.18 does not feed before an append),
    and the appended ones, as graphopt's Generator continues that sequence."""
    model = og.Model(str(default_artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([PROMPT], np.int32))
    for _ in range(8):
        gen.generate_next_token()
    turn = [42, 7, 8]
    gen.append_tokens(np.array([turn], np.int32))
    for _ in range(8):
        gen.generate_next_token()
    sequence = [int(t) for t in gen.get_sequence(0)]
    assert len(sequence) == len(PROMPT) + 8 + len(turn) + 8
    held = sequence[:len(PROMPT) + 7] + turn  # the first turn's last token never reached the cache
    want = graphopt.load(default_artifact).generate([held], 8, eos_token_id=-1).tokens[0]
    assert sequence[-8:] == want
