"""`graphopt prune`: structured pruning of a training checkpoint into a smaller config.

Checked three ways: the pruned model equals the original with the removed units' output
weights zeroed (what removing a head or a channel means); on the shipped model it equals the
IR passes prune-heads / prune-mlp run by `graphopt optimize` (same units, same logits); and the
smaller checkpoint loads, optimizes and runs on ONNX Runtime like the torch model.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.train import load_model
from graphopt.train.checkpoint import save_checkpoint
from graphopt.train.models import build_model, config_from_dict, config_to_dict
from graphopt.train.prune import block_flops, plan, prune_checkpoint, prune_model

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "default"
TINY = {
    "llama": dict(arch="llama", vocab_size=300, max_seq_len=32, dim=48, num_layers=2, num_heads=6,
                  num_kv_heads=3, mlp_hidden=40),
    "gpt": dict(arch="gpt", vocab_size=300, max_seq_len=32, dim=48, num_layers=2, num_heads=4, mlp_hidden=40),
}


def _random_model(arch: str):
    torch.manual_seed(3)
    model = build_model(config_from_dict(TINY[arch])).eval()
    with torch.no_grad():  # biases too (GPT), so slicing them is checked
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _zeroed(model, plans):
    """The original model with the outputs of the removed heads and channels zeroed."""
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        for block, p in zip(masked.blocks, plans):
            arch = masked.config.arch
            out = block.wo if arch == "llama" else block.attn_proj
            down = block.w_down if arch == "llama" else block.mlp_proj
            nq = block.num_heads
            nkv = block.num_kv_heads if arch == "llama" else nq
            d = out.weight.shape[1] // nq
            group = nq // nkv
            kept_heads = {int(j) * group + h for j in p.kv_groups for h in range(group)}
            for head in set(range(nq)) - kept_heads:
                out.weight[:, head * d:(head + 1) * d] = 0
            for c in set(range(down.weight.shape[1])) - set(p.channels.tolist()):
                down.weight[:, c] = 0
    return masked


@pytest.mark.parametrize("importance", ["magnitude", "wanda"])
@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_pruned_model_equals_the_original_with_removed_units_zeroed(arch, importance):
    model = _random_model(arch)
    windows = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(4)) if importance == "wanda" else None
    plans = plan(model, heads_ratio=0.5, mlp_ratio=0.3, calibration=windows)
    if windows is not None:  # the activations decide: not the units magnitude keeps
        assert [p.channels.tolist() for p in plans] != [p.channels.tolist() for p in plan(model, 0.5, 0.3)]
    small = prune_model(model, plans)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = _zeroed(model, plans)(ids), small(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cfg = small.config
    assert cfg.mlp_hidden == 40 - 12  # floor(0.3 * 40)
    # GPT: 2 of 4 heads go; Llama: 1 of 3 KV groups, with its 2 query heads. Heads keep their width.
    assert (cfg.num_heads, cfg.head_dim) == ((2, 12) if arch == "gpt" else (4, 8))
    assert small.num_parameters() < model.num_parameters()
    assert block_flops(cfg, 16) < block_flops(model.config, 16)


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_global_scope_gives_layers_different_sizes_and_still_equals_the_zeroed_model(arch, tmp_path):
    model = _random_model(arch)
    with torch.no_grad():  # the second block's weights are larger, so the first loses more
        for p in model.blocks[1].parameters():
            p.mul_(3.0)
    plans = plan(model, heads_ratio=0.5, mlp_ratio=0.4, scope="global")
    assert sum(len(p.channels) for p in plans) == 80 - 32  # floor(0.4 * 80) of the model's channels
    assert len(plans[0].channels) < len(plans[1].channels)
    small = prune_model(model, plans)
    assert small.config.per_layer is not None
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), _zeroed(model, plans)(ids), rtol=1e-5, atol=1e-5)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    save_checkpoint(tmp_path / "ck", small, {"model": config_to_dict(small.config)}, tok)
    loaded, cfg = load_model(tmp_path / "ck")
    assert cfg.per_layer == small.config.per_layer
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), small(ids), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt"])
def test_ratio_zero_keeps_every_weight(arch):
    model = _random_model(arch)
    small = prune_model(model, plan(model, 0.0, 0.0))
    for (name, a), (_, b) in zip(model.state_dict().items(), small.state_dict().items()):
        assert torch.equal(a, b), name


def test_per_layer_sizes_round_trip_and_old_configs_read_as_before(tmp_path):
    d = dict(TINY["llama"], head_dim=8, per_layer=[{"num_heads": 4, "num_kv_heads": 2, "mlp_hidden": 24},
                                                   {"num_heads": 2, "num_kv_heads": 1, "mlp_hidden": 40}])
    model = build_model(config_from_dict(d))
    assert model.blocks[0].wq.weight.shape == (32, 48) and model.blocks[1].wq.weight.shape == (16, 48)
    assert model.blocks[0].w_down.weight.shape == (48, 24)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    save_checkpoint(tmp_path / "ck", model, {"model": config_to_dict(model.config)}, tok)
    loaded, cfg = load_model(tmp_path / "ck")
    defaults = {"rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": True}
    assert config_to_dict(cfg) == d | defaults
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert config_to_dict(config_from_dict(TINY["llama"])) == TINY["llama"] | defaults  # no head_dim, per_layer


@pytest.mark.parametrize("bad, fragment", [
    ({"per_layer": [{"num_heads": 4}]}, "per_layer must be a list of num_layers=2"),
    ({"per_layer": [{"num_heads": 4, "num_kv_heads": 3}, {}]}, "per_layer[0] num_kv_heads=3 must divide num_heads=4"),
    ({"per_layer": [{"dim": 4}, {}]}, "per_layer[0] must be an object with only"),
    ({"head_dim": 0}, "head_dim=0 must be a positive integer"),
])
def test_bad_per_layer_config_is_one_user_error(bad, fragment):
    from graphopt.errors import UserError

    with pytest.raises(UserError, match="model config: ") as e:
        config_from_dict(dict(TINY["llama"], **bad))
    assert fragment in str(e.value)


def test_shipped_model_pruned_in_torch_equals_the_ir_passes_and_optimizes(tmp_path):
    """The acceptance test: the same heads and channels go on both paths, and the pruned
    checkpoint is a model `graphopt optimize` takes."""
    import graphopt
    from graphopt.driver import default_pipeline

    summary = prune_checkpoint(DEFAULT, tmp_path / "pruned", heads_ratio=0.5, mlp_ratio=0.25, val_tokens=256)
    small, cfg = load_model(tmp_path / "pruned")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden, cfg.head_dim) == (3, 1, 384, 32)
    (f0, f1) = summary["block_flops_per_token_seq128"]
    assert 1 - f1 / f0 >= 0.30
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int64)
    with torch.no_grad():
        want = small(torch.from_numpy(ids)).numpy()

    passes = default_pipeline() + ",prune-heads{ratio=0.5},prune-mlp{ratio=0.25}"
    graphopt.optimize(DEFAULT, tmp_path / "ir", passes=passes)
    report = json.loads((tmp_path / "ir" / "report.json").read_text())
    mlp_keep = [d["keep"] for r in report["passes"] if r["name"] == "prune-mlp" for d in r["details"] if "keep" in d]
    assert mlp_keep == [k["mlp_channels"] for k in summary["kept"]]
    got = graphopt.load(tmp_path / "ir").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)

    graphopt.optimize(tmp_path / "pruned", tmp_path / "opt", kv_cache=False)
    got = graphopt.load(tmp_path / "opt").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_shipped_model_pruned_globally_has_per_layer_sizes_and_optimizes(tmp_path):
    """scope=global: the MLP widths differ per layer (a `per_layer` config) and the checkpoint
    still exports, fuses and runs like the torch model; where the IR passes take `scope`,
    they remove the same channels."""
    import graphopt
    from graphopt.driver import default_pipeline
    from graphopt.errors import UserError

    summary = prune_checkpoint(DEFAULT, tmp_path / "pruned", heads_ratio=0.5, mlp_ratio=0.25, scope="global",
                               val_tokens=256)
    small, cfg = load_model(tmp_path / "pruned")
    widths = [entry["mlp_hidden"] for entry in cfg.per_layer]
    assert sum(widths) == 6 * 512 - 768 and len(set(widths)) > 1
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)).astype(np.int64)
    with torch.no_grad():
        want = small(torch.from_numpy(ids)).numpy()
    graphopt.optimize(tmp_path / "pruned", tmp_path / "opt", kv_cache=False)
    got = graphopt.load(tmp_path / "opt").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)

    passes = default_pipeline() + ",prune-heads{ratio=0.5,scope=global},prune-mlp{ratio=0.25,scope=global}"
    try:
        graphopt.optimize(DEFAULT, tmp_path / "ir", passes=passes)
    except UserError as e:
        if "scope" in str(e):
            pytest.skip(f"the IR passes here take no scope option ({e})")
        raise
    report = json.loads((tmp_path / "ir" / "report.json").read_text())
    mlp_keep = [d["keep"] for r in report["passes"] if r["name"] == "prune-mlp" for d in r["details"] if "keep" in d]
    assert mlp_keep == [k["mlp_channels"] for k in summary["kept"]]
    got = graphopt.load(tmp_path / "ir").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_shipped_model_pruned_by_wanda_in_torch_equals_the_ir_passes(tmp_path, corpus_writer):
    """--importance wanda: the torch path scores |W| * ||x|| on the same calibration windows as
    the IR passes prune-heads / prune-mlp{importance=wanda}, so the same KV groups and
    channels go and the two pruned models give the same logits; and the choice differs from
    magnitude's (the activations matter)."""
    import graphopt
    from graphopt.driver import default_pipeline

    corpus = corpus_writer(tmp_path / "corpus", n_docs=16, seed=5)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(p.read_text() for p in sorted(corpus.rglob("mod_*.py"))))
    summary = prune_checkpoint(DEFAULT, tmp_path / "pruned", heads_ratio=0.5, mlp_ratio=0.25, importance="wanda",
                               calibration=calib, val_tokens=256)
    assert summary["calibration"]["text"] == str(calib) and summary["calibration"]["windows"][1] == 256
    magnitude = [k["mlp_channels"] for k in prune_checkpoint(DEFAULT, tmp_path / "mag", 0.0, 0.25, val_tokens=1)["kept"]]
    assert magnitude != [k["mlp_channels"] for k in summary["kept"]]

    passes = default_pipeline() + ",prune-heads{ratio=0.5,importance=wanda},prune-mlp{ratio=0.25,importance=wanda}"
    graphopt.optimize(DEFAULT, tmp_path / "ir", passes=passes, calibration=calib)
    report = json.loads((tmp_path / "ir" / "report.json").read_text())
    keep = {name: [d["keep"] for r in report["passes"] if r["name"] == name for d in r["details"] if "keep" in d]
            for name in ("prune-heads", "prune-mlp")}
    assert keep["prune-mlp"] == [k["mlp_channels"] for k in summary["kept"]]
    assert keep["prune-heads"] == [k["kv_groups"] for k in summary["kept"]]
    small, cfg = load_model(tmp_path / "pruned")
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16)).astype(np.int64)
    with torch.no_grad():
        want = small(torch.from_numpy(ids)).numpy()
    got = graphopt.load(tmp_path / "ir").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_wanda_calibrates_on_the_training_corpus_by_default_and_refuses_without_one(tmp_path):
    """The shipped model was trained on the default corpus: Wanda reads windows of its training
    split, none of them from val.txt. A pruned checkpoint has no such corpus: one error, nothing
    written."""
    from graphopt.errors import UserError
    from graphopt.train.data import encode_documents, read_val_text
    from graphopt.train.prune import calibration_windows
    from graphopt.train.tokenizer import load_tokenizer

    windows, source = calibration_windows(DEFAULT, load_model(DEFAULT)[1])
    assert source.startswith("the training split of ") and tuple(windows.shape) == (32, 256)
    val = encode_documents(load_tokenizer(DEFAULT / "tokenizer.json"), read_val_text(DEFAULT / "val.txt"))
    val_bytes = val.astype(np.int32).tobytes()
    assert not any(w.astype(np.int32).tobytes() in val_bytes for w in windows.numpy())
    prune_checkpoint(DEFAULT, tmp_path / "pruned", 0.0, 0.25, val_tokens=1)
    with pytest.raises(UserError, match="was not trained on the default corpus, so it has no default calibration"):
        prune_checkpoint(tmp_path / "pruned", tmp_path / "again", 0.0, 0.25, importance="wanda")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--heads-ratio", "1.0"], "--heads-ratio"),
    ([], "nothing to prune: give --heads-ratio and/or --mlp-ratio"),
    (["--heads-ratio", "0.05"], "nothing to prune: --heads-ratio 0.05 of a layer's 2 KV groups rounds down to none"),
    (["--heads-ratio", "0.5", "--min-keep", "2"], "nothing to prune: --min-keep 2 keeps all 2 KV groups of a layer"),
    (["--mlp-ratio", "0.001"], "rounds down to none; --scope global counts it over the whole model"),
    (["--mlp-ratio", "0.25", "--out", "{SRC}"], "is the source checkpoint"),
    (["--mlp-ratio", "0.25", "--out", "{FILE}"], "exists and is not a folder"),
])
def test_prune_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{SRC}", str(DEFAULT)).replace("{FILE}", str(tmp_path / "file")) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    r = subprocess.run([sys.executable, "-m", "graphopt", "prune", str(DEFAULT), *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr
    assert not (tmp_path / "new").exists()
    if "{FILE}" not in str(args):
        assert len(r.stderr.strip().splitlines()) <= 3  # click's usage lines for a flag out of range


def test_out_replaces_only_an_earlier_pruned_checkpoint_unless_overwrite(tmp_path):
    """--out replaced any folder holding a config.json: a trained checkpoint (its optimizer
    state, the user's notes beside it) was deleted without a word."""
    import shutil

    from graphopt.errors import UserError
    from graphopt.train.prune import prune_checkpoint

    mine = tmp_path / "mine"
    shutil.copytree(DEFAULT, mine, ignore=shutil.ignore_patterns("*.tmp"))
    (mine / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in mine.iterdir())
    with pytest.raises(UserError, match=r"--out .*mine: the folder exists and is not an earlier output of graphopt "
                                        r"prune .*or --overwrite to replace it"):
        prune_checkpoint(DEFAULT, mine, 0.0, 0.25, val_tokens=1)
    assert sorted(p.name for p in mine.iterdir()) == before and (mine / "notes.txt").read_text() == "keep me"

    pruned = tmp_path / "pruned"
    prune_checkpoint(DEFAULT, pruned, 0.0, 0.25, val_tokens=1)
    prune_checkpoint(DEFAULT, pruned, 0.0, 0.5, val_tokens=1)  # an earlier output of prune: replaced
    assert json.loads((pruned / "config.json").read_text())["pruned"]["mlp_ratio"] == 0.5
    (pruned / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is an earlier pruned checkpoint but also holds notes.txt"):
        prune_checkpoint(DEFAULT, pruned, 0.0, 0.25, val_tokens=1)
    prune_checkpoint(DEFAULT, mine, 0.0, 0.25, val_tokens=1, overwrite=True)
    assert not (mine / "notes.txt").exists() and "pruned" in json.loads((mine / "config.json").read_text())
