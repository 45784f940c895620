"""The embedded default checkpoint (examples/default): it loads, its validation perplexity is
what examples/default/eval.json (and docs/training.md) states, it beats a unigram model of
the same tokens by at least 5x, and it writes Python for "def "."""
import json
from pathlib import Path

import pytest
import torch

from graphopt.train import load_model, load_tokenizer

DEFAULT = Path(__file__).resolve().parents[2] / "examples" / "default"


@pytest.fixture(scope="module")
def measured():
    from graphopt.train.evaluate import evaluate_checkpoint

    result, source = evaluate_checkpoint(DEFAULT, batch_size=32)
    return result


def test_shipped_files_are_weights_config_tokenizer_and_val_text_under_25_mb():
    names = sorted(p.name for p in DEFAULT.iterdir())
    assert names == ["config.json", "eval.json", "model.safetensors", "tokenizer.json", "val.txt"]
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) <= 25 * 2**20


def test_load_model_returns_a_llama_with_grouped_query_attention():
    model, cfg = load_model(DEFAULT)
    assert cfg.arch == "llama" and cfg.num_kv_heads < cfg.num_heads
    assert isinstance(model, torch.nn.Module) and not model.training
    assert load_tokenizer(DEFAULT).get_vocab_size() == cfg.vocab_size


def test_validation_perplexity_is_the_documented_one_and_beats_unigram(measured):
    stated = json.loads((DEFAULT / "eval.json").read_text())
    assert measured.tokens == stated["tokens"] and measured.bytes == stated["bytes"]
    assert measured.perplexity == pytest.approx(stated["perplexity"], rel=1e-4)
    assert measured.bits_per_byte == pytest.approx(stated["bits_per_byte"], rel=1e-4)
    assert measured.unigram_perplexity == pytest.approx(stated["unigram_perplexity"], rel=1e-9)
    assert measured.perplexity <= 0.2 * measured.unigram_perplexity


def test_generate_def_writes_several_lines():
    from click.testing import CliRunner

    from graphopt.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(DEFAULT), "--prompt", "def ", "--max-new-tokens", "80"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.stdout.startswith("def ") and len(lines) >= 3
