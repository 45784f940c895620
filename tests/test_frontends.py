"""Frontends: PyTorch modules, Hugging Face folders, state-dict files and graphopt training
checkpoints into the IR -- and the inputs that must be refused (unsafe pickles, unknown
architectures, missing weights) with one line and exit code 2.

Each model is exported once per module (exports take seconds); the refusal tests never
reach an export.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from graphopt.cli import cli  # noqa: E402
from graphopt.errors import UserError  # noqa: E402
from graphopt.frontends import from_torch, load_model_path  # noqa: E402
from graphopt.interpreter import run  # noqa: E402
from graphopt.onnx_io import save_onnx  # noqa: E402
from graphopt.testing import (  # noqa: E402
    ARCHS, VOCAB, assert_close, run_ort, tiny_hf_model, token_feeds, torch_outputs,
)
from graphopt.verify import verify  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(2, 8), (3, 5)]
ATOL = 1e-4  # the frontend contract: PyTorch and the imported graph agree within 1e-4


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def assert_matches_pytorch(graph, module, tmp_path, shapes=SHAPES):
    """The interpreter and ONNX Runtime (on the re-saved graph) against PyTorch."""
    out = graph.outputs[0].name
    onnx_path = tmp_path / f"{graph.name}.onnx"
    save_onnx(graph, onnx_path)
    for batch, seq in shapes:
        feeds = token_feeds(batch, seq)
        names = {v.name for v in graph.inputs}
        feeds = {k: v for k, v in feeds.items() if k in names}
        expected = torch_outputs(module, feeds) if len(feeds) == 2 else _ids_only(module, feeds)
        if "token_type_ids" in names:  # the wrapper feeds none: BertModel's default is all zeros
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        assert_close(run(graph, feeds)[out], expected, rtol=0, atol=ATOL, what=f"interpreter {batch}x{seq}")
        assert_close(run_ort(onnx_path, feeds)[out], expected, rtol=0, atol=ATOL, what=f"ORT {batch}x{seq}")


def _ids_only(module, feeds):
    with torch.no_grad():
        return module(torch.from_numpy(feeds["input_ids"])).numpy()


def input_types(graph):
    return {v.name: str(v.type) for v in graph.inputs}


# --------------------------------------------------------------------------------------
# Hugging Face folders (save_pretrained, safetensors)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """hf(arch) -> (PyTorch wrapper, folder, graph), exported once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            module = tiny_hf_model(arch)
            folder = tmp_path_factory.mktemp(f"hf_{arch}")
            module.model.save_pretrained(folder)
            cache[arch] = (module, folder, load_model_path(folder, progress=False))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_folder_matches_pytorch_at_two_shapes(hf, arch, tmp_path):
    module, folder, graph = hf(arch)
    verify(graph)
    out = "logits" if arch != "bert" else "last_hidden_state"
    hidden = VOCAB if arch != "bert" else 32
    types = {"input_ids": "i64[batch, seq]", "attention_mask": "i64[batch, seq]"}
    if arch == "bert":  # segment embeddings: the tokenizer's token_type_ids are an input too
        types["token_type_ids"] = "i64[batch, seq]"
    assert input_types(graph) == types
    assert [(v.name, str(v.type)) for v in graph.outputs] == [(out, f"f32[batch, seq, {hidden}]")]
    assert graph.metadata.exporter == "torch.onnx dynamo" and graph.metadata.export_seconds > 0
    assert graph.metadata.source == str(folder)
    assert_matches_pytorch(graph, module, tmp_path)


def test_bert_folder_takes_the_tokenizers_token_type_ids(hf, tmp_path):
    # A sentence pair: segment 1 on the second half of every row. The artifact must feed
    # the segment embeddings exactly as BertModel does (a zero token_type_ids would differ).
    module, folder, graph = hf("bert")
    feeds = token_feeds(3, 10)
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    feeds["token_type_ids"][:, 5:] = 1
    with torch.no_grad():
        expected = module.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        zeros = module.model(input_ids=torch.from_numpy(feeds["input_ids"]),
                             attention_mask=torch.from_numpy(feeds["attention_mask"])).last_hidden_state.numpy()
    assert np.abs(expected - zeros).max() > 1e-2  # the segments change the output: the check can fail
    assert_close(run(graph, feeds)["last_hidden_state"], expected, rtol=0, atol=ATOL, what="interpreter")
    out = tmp_path / "bert"
    r = invoke("optimize", folder, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    import graphopt

    artifact = graphopt.load(out)
    got = artifact.run(feeds)["last_hidden_state"]
    assert_close(got, expected, rtol=0, atol=ATOL, what="ORT artifact")
    # past the positions it was exported for (its position table): one line, not ORT's broadcast failure
    context = module.model.config.max_position_embeddings
    assert artifact.manifest["max_positions"] == context
    from graphopt.errors import UserError

    longer = {k: np.repeat(v, -(-(context + 1) // v.shape[1]), axis=1)[:, :context + 1] for k, v in feeds.items()}
    with pytest.raises(UserError, match=f"input_ids covers {context + 1} positions; the model has {context}"):
        artifact.run(longer)


def test_default_sdpa_model_agrees_on_every_real_position(hf):
    # The frontend exports transformers' "eager" attention. PyTorch's SDPA (the default when
    # a folder is loaded) differs only on fully masked query rows -- left-padded positions
    # of a causal LM, where SDPA returns zeros -- and agrees everywhere else.
    from graphopt.frontends.huggingface import load_hf_module
    from graphopt.testing import LMWrapper

    _, folder, graph = hf("llama")
    model, output = load_hf_module(folder, json.loads((folder / "config.json").read_text()))
    assert output == "logits" and model.config._attn_implementation == "eager"
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    feeds = token_feeds(3, 6)
    real = feeds["attention_mask"].astype(bool)
    assert_close(run(graph, feeds)["logits"][real], torch_outputs(LMWrapper(sdpa), feeds)[real], rtol=0, atol=ATOL)


def test_inspect_takes_a_hf_folder(hf, monkeypatch):
    _, folder, graph = hf("bert")
    # The export itself is covered above; here only the CLI wiring and stream discipline.
    monkeypatch.setattr("graphopt.frontends.huggingface.load_hf_folder", lambda f, c, progress=True: graph)
    r = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["inputs"][0] == {"name": "input_ids", "type": "i64[batch, seq]"}


# --------------------------------------------------------------------------------------
# from_torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TokenModel(torch.nn.Module):
    """(input_ids, attention_mask) -> masked mean of embeddings, to exercise batch and seq."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1).float()
        return h.cumsum(dim=1)


def test_from_torch_mlp_dynamic_batch(capfd):
    torch.manual_seed(0)
    mlp = MLP().eval()
    graph = from_torch(mlp, torch.randn(2, 4))
    assert input_types(graph) == {"x": "f32[batch, 4]"}
    assert [(v.name, str(v.type)) for v in graph.outputs] == [("output", "f32[batch, 3]")]
    assert graph.name == "MLP" and graph.metadata.exporter == "torch.onnx dynamo"
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        with torch.no_grad():
            expected = mlp(torch.from_numpy(x)).numpy()
        assert_close(run(graph, {"x": x})["output"], expected, rtol=0, atol=ATOL)
    out, err = capfd.readouterr()
    assert out == ""  # nothing on stdout: JSON output may go there
    assert "exporting MLP" in err and "exported MLP in" in err and "Warning" not in err


def test_from_torch_takes_an_exported_program_with_its_dynamic_shapes():
    """The route the README gives for a .pt2 program (before: the path went in as torch.onnx.export's
    `args`, nothing was written, and every call failed with "no such file")."""
    torch.manual_seed(0)
    mlp = MLP().eval()
    program = torch.export.export(mlp, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    graph = from_torch(program, None, progress=False)
    name = graph.inputs[0].name
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        with torch.no_grad():
            expected = mlp(torch.from_numpy(x)).numpy()
        assert_close(next(iter(run(graph, {name: x}).values())), expected, rtol=0, atol=ATOL)


def test_from_torch_token_inputs_are_batch_by_seq(tmp_path):
    torch.manual_seed(0)
    module = TokenModel().eval()
    feeds = token_feeds(2, 8)
    examples = {k: torch.from_numpy(v) for k, v in feeds.items()}
    graph = from_torch(module, examples, output_names=["hidden"], progress=False)
    assert input_types(graph) == {"input_ids": "i64[batch, seq]", "attention_mask": "i64[batch, seq]"}
    assert str(graph.outputs[0].type) == "f32[batch, seq, 8]"
    for batch, seq in SHAPES:
        f = token_feeds(batch, seq)
        assert_close(run(graph, f)["hidden"], torch_outputs(module, f), rtol=0, atol=ATOL)


def test_from_torch_falls_back_to_torchscript_and_says_so(monkeypatch, capsys):
    from graphopt.frontends import torch_export

    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this\nsecond line of detail")

    monkeypatch.setattr(torch_export, "_export_dynamo", broken)
    torch.manual_seed(0)
    mlp = MLP().eval()
    graph = from_torch(mlp, (torch.randn(3, 4),), input_names=["features"], progress=False)
    assert graph.metadata.exporter == "torchscript (dynamo failed: RuntimeError: cannot trace this)"
    warning = [line for line in capsys.readouterr().err.splitlines() if "dynamo exporter failed" in line]
    assert len(warning) == 1 and "falling back to the TorchScript exporter" in warning[0]
    assert input_types(graph) == {"features": "f32[batch, 4]"}
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(x)).numpy()
    assert_close(run(graph, {"features": x})["output"], expected, rtol=0, atol=ATOL)


def test_a_model_neither_exporter_takes_fails_in_one_line_with_nothing_on_stdout(monkeypatch, capfd):
    """The TorchScript exporter's C++ log printed the whole Torch IR graph on stdout when it
    failed (a Mixtral: hundreds of lines, whatever `verbose` said); the user gets one line."""
    from graphopt.frontends import torch_export

    class Histogram(torch.nn.Module):  # aten::histc: no ONNX symbolic (Mixtral's router uses it)
        def forward(self, x):
            return torch.histc(x, bins=4, min=0, max=1) + x.sum()

    def broken(*args, **kwargs):
        raise RuntimeError("dynamo gave up")

    monkeypatch.setattr(torch_export, "_export_dynamo", broken)
    with pytest.raises(UserError, match=r"export to ONNX failed: dynamo: RuntimeError: dynamo gave up; "
                                        r"torchscript: .*histc") as e:
        from_torch(Histogram().eval(), (torch.rand(3, 4),), input_names=["x"], progress=False)
    assert "\n" not in str(e.value)
    out = capfd.readouterr()
    assert "Torch IR graph" not in out.out + out.err and out.out == ""


def test_a_dynamo_conversion_failure_names_its_root_cause():
    """torch.onnx's dynamo error is "Failed to convert ... Next steps:" (in terminal colours),
    the cause at the end of its exception summary; the user's line names the cause (a
    complex-valued rotary here, as Llama 4's and DeepSeek-V2's were before the frontend wrote
    theirs in real numbers)."""
    class ComplexRotary(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.polar(x, x).unsqueeze(1)).sum(-1)

    with pytest.raises(UserError, match=r"dynamo: DispatchError: No ONNX function found for .*aten\.unsqueeze.*"
                                        r"complex-valued input; torchscript: .*polar") as e:
        from_torch(ComplexRotary().eval(), (torch.rand(3, 4),), input_names=["x"], progress=False)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "Next steps" not in str(e.value)


def test_from_torch_refuses_size_one_example_on_dynamic_axis():
    with pytest.raises(UserError, match=r"example input 'x' has size 1 on dynamic axis 0 \('batch'\)"):
        from_torch(MLP(), torch.randn(1, 4), progress=False)
    with pytest.raises(UserError, match="unknown input"):
        from_torch(MLP(), torch.randn(2, 4), dynamic={"y": {0: "batch"}}, progress=False)


# --------------------------------------------------------------------------------------
# State-dict files next to a config.json


def _tiny_gpt2(n_layer=1):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, n_positions=32, vocab_size=VOCAB)
    cfg._attn_implementation = "eager"  # the reference semantics for padded rows (see huggingface.py)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def state_dict_folder(tmp_path_factory):
    """A bare config.json (no `architectures`) and `weights.bin` from torch.save(state_dict)."""
    folder = tmp_path_factory.mktemp("state_dict")
    model = _tiny_gpt2()
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), folder / "weights.bin")
    return model, folder


def test_state_dict_bin_next_to_config(state_dict_folder, tmp_path):
    from graphopt.testing import LMWrapper

    model, folder = state_dict_folder
    graph = load_model_path(folder / "weights.bin", progress=False)
    assert [v.name for v in graph.outputs] == ["logits"]  # a bare GPT-2 config is a causal LM
    assert graph.metadata.source == str(folder / "weights.bin")
    assert_matches_pytorch(graph, LMWrapper(model), tmp_path, shapes=[(3, 5)])


def test_save_pretrained_folder_with_pytorch_model_bin(tmp_path):
    # Only the loading differs from the safetensors folders above, so no export here.
    from graphopt.frontends.huggingface import load_hf_module

    model = _tiny_gpt2()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, output = load_hf_module(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    assert output == "logits"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_missing_weight_is_one_line_error(state_dict_folder, tmp_path, suffix):
    model, folder = state_dict_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "transformer.h.0.attn.c_proj.weight"}
    path = tmp_path / f"partial{suffix}"
    if suffix == ".bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(path))  # tied: stored once
    assert_one_line_error(invoke("inspect", path), str(path), "missing weight(s) transformer.h.0.attn.c_proj.weight")


def test_state_dict_without_config_and_wrong_shapes(state_dict_folder, tmp_path):
    model, folder = state_dict_folder
    torch.save(model.state_dict(), tmp_path / "alone.pt")
    assert_one_line_error(invoke("inspect", tmp_path / "alone.pt"), "needs a Hugging Face config.json beside it")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_embd=32)))
    # transformers' own message pointed at a logged table ("look at the above report!")
    assert_one_line_error(invoke("inspect", tmp_path / "alone.pt"), str(tmp_path / "alone.pt"),
                          "has the wrong shape for GPT2LMHeadModel: (", "in the weights")


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_weights_the_config_has_no_place_for_are_refused(tmp_path, suffix):
    """A 2-layer checkpoint beside a config.json that says 1 layer exported the 1-layer model,
    the second layer silently dropped (transformers only logs it)."""
    big = _tiny_gpt2(n_layer=2)
    _tiny_gpt2(n_layer=1).config.save_pretrained(tmp_path)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".bin":
        torch.save(big.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v for k, v in big.state_dict().items() if k != "lm_head.weight"}, str(path))
    assert_one_line_error(invoke("inspect", path), str(path), "transformer.h.1.",
                          "are of layers GPT2LMHeadModel does not have as config.json describes it")
    # buffers older checkpoints saved (GPT-2's masked_bias) are not weights: still loads
    state = dict(big.state_dict() if suffix == ".bin" else {}, **{"transformer.h.0.attn.masked_bias": torch.tensor(-1e4)})
    if suffix == ".bin":
        state = {k: v for k, v in state.items() if not k.startswith("transformer.h.1.")}
        torch.save(state, path)
        assert invoke("inspect", path).exit_code == 0


# --------------------------------------------------------------------------------------
# Refusals: unsafe pickles, unknown architectures, unsupported inputs


class _RunsCode:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_checkpoint(folder: Path, name: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "PWNED"
    _tiny_gpt2().config.save_pretrained(folder)  # a valid config, so only the pickle can fail
    path = folder / name
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, path)
    return path, marker


@pytest.mark.parametrize("name", ["evil.pt", "pytorch_model.bin"])
def test_pickle_that_runs_code_is_refused_in_process(tmp_path, name):
    path, marker = _malicious_checkpoint(tmp_path / "ckpt", name)
    target = path if name == "evil.pt" else path.parent  # a file, or a HF folder holding it
    assert_one_line_error(invoke("inspect", target), "refused", "posix.system" if os.name == "posix" else "system")
    assert not marker.exists()


def test_pickle_that_runs_code_is_refused_by_the_real_command(tmp_path):
    path, marker = _malicious_checkpoint(tmp_path / "ckpt", "evil.pt")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "graphopt", "inspect", str(path)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "refused" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not marker.exists() and not out.exists()


def test_pickled_module_is_refused(tmp_path):
    _tiny_gpt2().config.save_pretrained(tmp_path)
    torch.save(MLP(), tmp_path / "whole_module.pt")
    assert_one_line_error(invoke("inspect", tmp_path / "whole_module.pt"), "refused", "MLP", "graphopt.from_torch")


@pytest.mark.parametrize("config, named", [
    ({"model_type": "foobar", "architectures": ["FooBarForCausalLM"]}, "'FooBarForCausalLM'"),
    ({"model_type": "foobar", "auto_map": {"AutoModel": "modeling_foobar.FooBar"}}, "does not run"),
    ({"model_type": "gpt2", "architectures": ["GPT2WithMagicHead"]}, "'GPT2WithMagicHead'"),
    ({"architectures": ["Mystery"]}, "'Mystery'"),
])
def test_unknown_architecture_is_one_line_error(tmp_path, config, named):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(invoke("inspect", tmp_path), str(tmp_path), "unknown architecture", named)


def test_other_refusals(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"PK\x03\x04")
    assert_one_line_error(invoke("inspect", tmp_path / "model.pt2"), ".pt2", "evaluates code")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("inspect", tmp_path / "empty"), "not a model folder")
    (tmp_path / "noweights").mkdir()
    _tiny_gpt2().config.save_pretrained(tmp_path / "noweights")
    assert_one_line_error(invoke("inspect", tmp_path / "noweights"), "no weights")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint at all")
    assert_one_line_error(invoke("inspect", tmp_path / "garbage.bin"), "not a readable PyTorch checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"junk\n")  # torch.load raised KeyError: an internal error
    assert_one_line_error(invoke("inspect", tmp_path / "junk.pt"), "junk.pt: not a readable PyTorch checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 16)
    assert_one_line_error(invoke("inspect", tmp_path / "garbage.safetensors"), "not a readable safetensors file")


# --------------------------------------------------------------------------------------
# graphopt training checkpoints


def _train_checkpoint(folder: Path):
    """examples/default when it holds a checkpoint, else a tiny one written through train's API."""
    pytest.importorskip("graphopt.train")
    from graphopt.train import load_model

    default = REPO / "examples" / "default"
    if (default / "config.json").is_file() and (default / "model.safetensors").is_file():
        return load_model(default)[0], default
    from graphopt.train.checkpoint import save_checkpoint
    from graphopt.train.models import LlamaConfig, build_model, config_to_dict

    cfg = LlamaConfig(vocab_size=VOCAB, max_seq_len=32, dim=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      mlp_hidden=32)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokenizer = folder.parent / "tokenizer.json"
    tokenizer.write_text("{}")  # save_checkpoint only copies it; the frontend never reads it
    save_checkpoint(folder, model, {"model": config_to_dict(cfg)}, tokenizer)
    return model, folder


def test_training_checkpoint_folder(tmp_path):
    from graphopt.frontends.training import is_run_folder

    model, folder = _train_checkpoint(tmp_path / "ckpt")
    graph = load_model_path(folder, progress=False)
    assert input_types(graph) == {"input_ids": "i64[batch, seq]"}
    assert [v.name for v in graph.outputs] == ["logits"]
    assert graph.metadata.exporter == "torch.onnx dynamo"
    assert_matches_pytorch(graph, model, tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_0000001\n")
    assert is_run_folder(run_dir) and not is_run_folder(folder)


# --------------------------------------------------------------------------------------
# graphopt optimize on what users have (the checks of the frontends issue, end to end)


@pytest.mark.parametrize("arch", ARCHS)
def test_optimize_hf_folder_then_load_matches_pytorch_at_two_shapes(hf, arch, tmp_path):
    import graphopt

    module, folder, _ = hf(arch)
    # --no-kv-cache: the full-sequence artifact, compared at every position (tests/test_kvcache.py
    # checks the generation-ready one)
    r = invoke("optimize", folder, "-o", tmp_path / "out", "-q", "--json", "--no-kv-cache")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["frontend"]["exporter"] == "torch.onnx dynamo" and report["frontend"]["seconds"] > 0
    artifact = graphopt.load(tmp_path / "out")
    out = artifact.outputs[0]["name"]
    for batch, seq in [(2, 8), (3, 5)]:  # one artifact, two shapes
        feeds = token_feeds(batch, seq)
        expected = torch_outputs(module, feeds)
        if any(i["name"] == "token_type_ids" for i in artifact.inputs):  # BERT: zeros are BertModel's default
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        assert_close(artifact.run(feeds)[out], expected, rtol=0, atol=1e-4,
                     what=f"{arch} artifact at {batch}x{seq}")


@pytest.mark.parametrize("case", ["pickle", "architecture", "missing-weight"])
def test_optimize_refusals_leave_no_output_folder(tmp_path, state_dict_folder, case):
    out = tmp_path / "out"
    if case == "pickle":
        target, marker = _malicious_checkpoint(tmp_path / "ckpt", "evil.pt")
        words = ("refused",)
    elif case == "architecture":
        target, marker = tmp_path / "arch", None
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "foobar", "architectures": ["FooBarLM"]}))
        words = ("unknown architecture", "'FooBarLM'")
    else:
        _, folder = state_dict_folder
        target = tmp_path / "partial"
        target.mkdir()
        (target / "config.json").write_bytes((folder / "config.json").read_bytes())
        sd = {k: v for k, v in torch.load(folder / "weights.bin", weights_only=True).items()
              if not k.endswith("ln_f.weight")}
        torch.save(sd, target / "weights.bin")
        target = target / "weights.bin"
        marker, words = None, ("ln_f.weight",)
    r = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(target), "-o", str(out), "-q"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert marker is None or not marker.exists()


def test_a_task_head_the_export_leaves_out_is_said(tmp_path, capsys):
    """A BertForSequenceClassification folder exports its encoder's last hidden state; the
    classifier is not silently dropped: a note names it."""
    import transformers as tf

    from graphopt.models import load_graph

    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, num_labels=3)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    graph = load_graph(tmp_path / "cls")
    assert [v.name for v in graph.outputs] == ["last_hidden_state"]
    assert "is a BertForSequenceClassification; graphopt exports its encoder (BertModel" in capsys.readouterr().err


def test_from_torch_output_names_must_name_every_output():
    """One name for two outputs came back as ['a', 'sum_1']: the exporter named what it could."""
    import torch

    from graphopt.errors import UserError
    from graphopt.frontends.torch_export import from_torch

    class Two(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.sum()

    with pytest.raises(UserError, match=r"Two: 1 output_names \(a\) for 2 outputs"):
        from_torch(Two(), (torch.randn(2, 3),), output_names=["a"], progress=False)
    graph = from_torch(Two(), (torch.randn(2, 3),), output_names=["a", "b"], progress=False)
    assert [v.name for v in graph.outputs] == ["a", "b"]


def test_a_model_without_a_position_table_is_not_bounded_by_its_config(tmp_path):
    """BLOOM (ALiBi) has no position table: a full-sequence artifact records no max_positions, so
    a sequence past the 2,048 tokens it was trained at is the model's to answer, not refused."""
    import transformers as tf

    import graphopt

    torch.manual_seed(0)
    tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=100)).eval() \
        .save_pretrained(tmp_path / "bloom")
    result = graphopt.optimize(tmp_path / "bloom", tmp_path / "out", kv_cache=False)
    assert "max_positions" not in result.manifest
    ids = np.ones((1, 2100), np.int64)
    assert graphopt.load(tmp_path / "out").run({"input_ids": ids, "attention_mask": ids})["logits"].shape[1] == 2100


def test_a_branch_on_input_values_frozen_by_the_torchscript_fallback_is_said(capsys):
    """dynamo refuses `if x.sum() > 0`; the TorchScript tracer keeps the example's branch and
    gave wrong results on other inputs without a word (its TracerWarning was silenced)."""
    class Branch(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x - 100

    graph = from_torch(Branch().eval(), (torch.ones(2, 4),), input_names=["x"], progress=False)
    err = capsys.readouterr().err
    assert "branches on its input values (1 place(s), first at test_frontends.py:" in err, err
    assert "data-dependent branch(es) frozen" in graph.metadata.exporter


def test_examples_that_disagree_on_a_shared_dynamic_dimension_are_refused_up_front():
    """Every input's axis 0 is "batch" by default: examples of batch 2 and 3 made dynamo fail
    (with 40 lines of log), and the TorchScript fallback a model that could not run its own
    example inputs."""
    class Two(torch.nn.Module):
        def forward(self, x, idx):
            return x.sum() + idx.sum()

    with pytest.raises(UserError, match=r"dimension 'batch' is 2 in example input 'x' but 3 in 'idx' \(axis 0\)"):
        from_torch(Two(), (torch.ones(2, 4), torch.ones(3)), input_names=["x", "idx"], progress=False)
    graph = from_torch(Two(), (torch.ones(2, 4), torch.ones(3)), input_names=["x", "idx"],
                       dynamic={"x": {0: "batch"}, "idx": {0: "n"}}, progress=False)
    assert [str(v.type) for v in graph.inputs] == ["f32[batch, 4]", "f32[n]"]


def test_a_head_or_a_missing_pooler_is_not_a_refusal(tmp_path, capsys):
    """What the base model's export does not use: a pretraining head's weights beside a config
    without `architectures` (left out, with a note), and a checkpoint saved without its pooler
    (a fine-tuned classifier's encoder) -- refused as "missing weight(s) pooler.dense..." before."""
    import transformers as tf

    from graphopt.frontends.huggingface import load_hf_module

    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    tf.BertForPreTraining(cfg).save_pretrained(tmp_path / "pre")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    config.pop("architectures")
    (tmp_path / "pre" / "config.json").write_text(json.dumps(config))
    model, output = load_hf_module(tmp_path / "pre", config)
    assert output == "last_hidden_state" and "cls.predictions" in capsys.readouterr().err
    tf.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "nopool")
    config = json.loads((tmp_path / "nopool" / "config.json").read_text())
    assert load_hf_module(tmp_path / "nopool", config)[1] == "last_hidden_state"
