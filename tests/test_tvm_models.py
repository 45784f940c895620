"""The TVM backend end to end: `transformers` GPT-2 and Llama and a graphopt.train Llama
(grouped-query attention, like the shipped default) compiled once each, run at several
batch and sequence sizes against PyTorch, saved, loaded in a fresh process; the artifact's
refusals (another CPU, no GPU, an op without a rule); CUDA builds without a GPU."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.testing import require_installed  # noqa: E402

require_installed("tvm", "apache-tvm")  # installed but broken: fail, not skip

import graphopt  # noqa: E402
from graphopt.errors import UserError  # noqa: E402
from graphopt.testing import token_feeds, torch_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.onnx"
DEFAULT_MODEL = ROOT / "examples" / "default"
SIZES = [(1, 5), (3, 17), (2, 2)]  # (batch, seq) from one compiled artifact
ATOL = 1e-4  # fp32, the bound against PyTorch


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, exported):
    """name -> (artifact folder, reference(feeds) -> logits, feeds(batch, seq))."""
    import torch

    from graphopt.frontends import from_torch
    from graphopt.train.models import LlamaConfig, build_model

    root = tmp_path_factory.mktemp("tvm_artifacts")
    out = {}
    for arch in ("gpt2", "llama"):
        module, path = exported(arch, "dynamo")
        graphopt.optimize(path, root / arch, backend="tvm")
        out[arch] = (root / arch, lambda feeds, m=module: torch_outputs(m, feeds), token_feeds)

    cfg = LlamaConfig(vocab_size=96, max_seq_len=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=48)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    graph = from_torch(model, (torch.randint(0, cfg.vocab_size, (2, 8)),), progress=False)
    graphopt.optimize(graph, root / "train-llama", backend="tvm")

    def train_reference(feeds, m=model):
        with torch.no_grad():
            return m(torch.from_numpy(feeds["input_ids"])).numpy()

    def train_feeds(batch, seq):
        return {"input_ids": np.random.default_rng(seq).integers(0, cfg.vocab_size, (batch, seq))}

    out["train-llama"] = (root / "train-llama", train_reference, train_feeds)
    return out


def _run(artifact, feeds):
    first_input = artifact.inputs[0]["name"]
    feeds = {first_input if k == "input_ids" else k: v for k, v in feeds.items()}
    (logits,) = artifact.run(feeds).values()
    return logits


@pytest.mark.parametrize("name", ["gpt2", "llama", "train-llama"])
def test_matches_pytorch_at_several_sizes_from_one_artifact(artifacts, name):
    folder, reference, make_feeds = artifacts[name]
    artifact = graphopt.load(folder)
    for batch, seq in SIZES:
        feeds = make_feeds(batch, seq)
        got, want = _run(artifact, feeds), reference(feeds)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"{name} batch={batch} seq={seq}")


def test_manifest_records_target_signature_and_versions(artifacts):
    folder = artifacts["llama"][0]
    manifest = json.loads((folder / "manifest.json").read_text())
    from graphopt.backends.tvm.build import system_cpu

    assert manifest["backend"] == "tvm" and manifest["target"] == "cpu"
    assert manifest["tvm_target"]["kind"] == "llvm" and manifest["tvm_target"]["mcpu"] == system_cpu()
    assert [i["shape"] for i in manifest["signature"]["inputs"]] == [["batch", "seq"], ["batch", "seq"]]
    assert manifest["signature"]["outputs"][0]["shape"][:2] == ["batch", "seq"]
    assert {"apache-tvm", "apache-tvm-ffi"} <= set(manifest["versions"])
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.so", "report.json", "weights.safetensors"]
    # the weights live beside the library, not in it
    assert (folder / "weights.safetensors").stat().st_size > 0.9 * sum(
        np.asarray(a).nbytes for a in _weights(folder).values())


def _weights(folder):
    from graphopt.weights_file import read_tensors

    return read_tensors(folder / "weights.safetensors")


_FRESH_PROCESS = """
import sys, numpy as np, graphopt
outs = []
for folder, feeds_file in zip(sys.argv[1::2], sys.argv[2::2]):
    outs.append(next(iter(graphopt.load(folder).run(dict(np.load(feeds_file))).values())))
np.savez("fresh_outputs.npz", *outs)
"""


def test_artifacts_load_and_run_in_a_fresh_process(artifacts, tmp_path):
    args, expected = [], []
    for name, (folder, reference, make_feeds) in artifacts.items():
        feeds = make_feeds(2, 9)
        art = graphopt.load(folder)
        named = {art.inputs[0]["name"] if k == "input_ids" else k: v for k, v in feeds.items()}
        np.savez(tmp_path / f"{name}.npz", **named)
        args += [str(folder), str(tmp_path / f"{name}.npz")]
        expected.append(reference(feeds))
    subprocess.run([sys.executable, "-c", _FRESH_PROCESS, *args], cwd=tmp_path, check=True, timeout=300)
    got = np.load(tmp_path / "fresh_outputs.npz")
    for i, want in enumerate(expected):
        np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=0, atol=ATOL)


@pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").is_file(), reason="the default checkpoint is not shipped yet")
def test_shipped_default_model_matches_pytorch(tmp_path):
    import torch

    from graphopt.train import load_model

    model, cfg = load_model(DEFAULT_MODEL)
    graphopt.optimize(str(DEFAULT_MODEL), tmp_path / "default", backend="tvm", kv_cache=False)  # full sequence
    artifact = graphopt.load(tmp_path / "default")
    for batch, seq in [(1, 7), (2, 33)]:
        ids = np.random.default_rng(seq).integers(0, cfg.vocab_size, (batch, seq))
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).numpy()
        np.testing.assert_allclose(_run(artifact, {"input_ids": ids}), want, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------
# Refusals and errors


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "tvm"
    graphopt.optimize(EXAMPLE, out, backend="tvm")
    return out


def _copy_with_manifest(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_artifact_for_another_cpu_is_refused(mlp_artifact, tmp_path):
    def other_cpu(m):
        m["tvm_target"]["mcpu"] = "some-other-cpu"
    folder = _copy_with_manifest(mlp_artifact, tmp_path / "other", other_cpu)
    with pytest.raises(UserError, match=r"built for CPU 'some-other-cpu', but this machine's is") as e:
        graphopt.load(folder)
    assert "\n" not in str(e.value)


def test_cuda_artifact_without_gpu_is_refused(mlp_artifact, tmp_path):
    import tvm

    if tvm.cuda(0).exist:
        pytest.skip("this machine has a GPU")

    def cuda(m):
        m["tvm_target"] = {"kind": "cuda", "arch": "sm_80"}
    folder = _copy_with_manifest(mlp_artifact, tmp_path / "cuda", cuda)
    with pytest.raises(UserError, match="built for cuda .*no CUDA GPU"):
        graphopt.load(folder)


def test_op_without_a_rule_is_a_one_line_error_naming_op_and_node(tmp_path):
    from click.testing import CliRunner

    from graphopt.builder import Builder
    from graphopt.cli import cli
    from graphopt.dtypes import DType
    from graphopt.ir import Graph, TensorType
    from graphopt.models import save_graph

    g = Graph("needs_det")
    x = g.add_input("x", TensorType(DType.FLOAT32, ("batch", 3, 3)))
    det = Builder(g).Det(x)
    det.producer().name = "the_det"
    g.outputs = [det]
    with pytest.raises(UserError, match=r"no lowering rule for Det \(node 'the_det'\)"):
        graphopt.optimize(g, tmp_path / "api", backend="tvm")
    assert not (tmp_path / "api").exists()

    save_graph(g, tmp_path / "det.onnx")
    r = CliRunner().invoke(cli, ["optimize", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "cli"),
                                 "--backend", "tvm", "-q"])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Det" in errors[0] and "the_det" in errors[0], r.output
    assert "Traceback" not in r.output


def test_backend_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="unknown tvm backend option 'tile'"):
        graphopt.optimize(EXAMPLE, tmp_path / "a", backend="tvm", backend_options={"tile": "8"})
    with pytest.raises(UserError, match="cuda_arch='ampere'"):
        graphopt.optimize(EXAMPLE, tmp_path / "b", backend="tvm", backend_options={"cuda_arch": "ampere"})
    result = graphopt.optimize(EXAMPLE, tmp_path / "c", backend="tvm", backend_options={"num_cores": "1"})
    assert result.manifest["tvm_target"]["num-cores"] == 1


def test_missing_tvm_is_a_one_line_error_with_the_install_command(monkeypatch):
    from graphopt.backends.tvm import runtime

    monkeypatch.setitem(sys.modules, "tvm", None)
    with pytest.raises(UserError, match=r"pip install 'graphopt\[tvm\]'"):
        runtime.check_target("cpu")


def test_every_backend_module_imports_without_tvm():
    # The wheel check imports every module in an environment without the [tvm] extra.
    code = ("import sys, importlib, pkgutil; sys.modules['tvm'] = None\n"
            "import graphopt.backends.tvm as pkg\n"
            "for m in pkgutil.iter_modules(pkg.__path__): importlib.import_module('graphopt.backends.tvm.' + m.name)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli_builds_a_tvm_artifact(tmp_path):
    from click.testing import CliRunner

    from graphopt.cli import cli

    r = CliRunner().invoke(cli, ["optimize", str(EXAMPLE), "-o", str(tmp_path / "out"), "--backend", "tvm", "-q"])
    assert r.exit_code == 0, r.output
    art = graphopt.load(tmp_path / "out")
    assert art.backend == "tvm"
    x = np.random.default_rng(0).standard_normal((3, art.inputs[0]["shape"][1])).astype(np.float32)
    ort = graphopt.optimize(EXAMPLE, tmp_path / "ort")
    np.testing.assert_allclose(art.run({art.inputs[0]["name"]: x})["probs"],
                               graphopt.load(tmp_path / "ort").run({art.inputs[0]["name"]: x})["probs"], atol=1e-6)
    assert ort.manifest["backend"] == "onnxruntime"


# --------------------------------------------------------------------------------------
# Random graphs (every cleanup bait: symbolic shape chains, casts, splits...)


@pytest.mark.parametrize("seed", range(4))
def test_random_graphs_match_the_reference(seed):
    import graphopt.backends.tvm as tvm_backend
    from graphopt.interpreter import run
    from graphopt.sample_inputs import sample_inputs
    from graphopt.testing import assert_close, random_graph

    g = random_graph(seed, n_nodes=14, cleanup_bait=True)
    compiled = tvm_backend.compile_graph(g)
    for batch in (1, 5):
        feeds = sample_inputs(g, dims={"batch": batch}, seed=seed)
        want = run(g, feeds)
        got = compiled.run(feeds)
        for name in want:
            assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, what=f"seed {seed} {name}")


def test_a_feed_repeated_at_one_shape_is_copied_into_the_same_buffer():
    """Compiled.run on a CPU: an input fed the same shape twice in a row gets an aligned buffer
    that later calls copy into again (no allocation a call); every call's outputs are its own
    and stay as they were after later calls."""
    import graphopt.backends.tvm as tvm_backend
    from graphopt.builder import Builder
    from graphopt.dtypes import DType
    from graphopt.ir import Graph, TensorType

    g = Graph("add")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.from_numpy(np.dtype(np.float32)), ("batch", 8)))
    g.outputs = [b.Add(x, b.const(np.ones(8, np.float32), "one"))]
    compiled = tvm_backend.compile_graph(g)
    out = g.outputs[0].name
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(4)] + [np.zeros((3, 8), np.float32)]
    results, staged = [], []
    for feed in feeds:
        results.append(compiled.run({"x": feed})[out])
        staged.append(compiled._staging.buffers["x"][3])
    assert staged[0] is None and staged[1] is not None and staged[2] is staged[1] is staged[3]  # bought on the repeat
    assert staged[4] is None  # a new shape: no buffer until it repeats
    for feed, got in zip(feeds, results):  # each call's output intact after the later calls
        np.testing.assert_array_equal(got, feed + 1)
    assert not compiled._written_in_place


# --------------------------------------------------------------------------------------
# CUDA: built (not run) where there is no GPU


def _cuda_build_possible() -> str | None:
    import tvm

    from graphopt.backends.tvm.build import cuda_compiler

    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        return "this apache-tvm has no CUDA code generation"
    if cuda_compiler() is None:
        return "no nvcc or NVRTC here"
    return None


@pytest.mark.skipif(_cuda_build_possible() is not None, reason=str(_cuda_build_possible()))
def test_cuda_build_with_dlight_schedules(exported, tmp_path):
    import tvm

    _, path = exported("llama", "dynamo")
    result = graphopt.optimize(path, tmp_path / "cuda", backend="tvm", target="cuda")
    spec = result.manifest["tvm_target"]
    assert spec["kind"] == "cuda" and spec["arch"].startswith("sm_") and spec["host"]["kind"] == "llvm"
    # CUDA kernels in the library: TVM refuses to build a GPU kernel that no schedule bound
    # to threads and blocks, so getting here means dlight scheduled every one.
    assert b"_kernel" in (tmp_path / "cuda" / "model.so").read_bytes()
    if not tvm.cuda(0).exist:
        with pytest.raises(UserError, match="no CUDA GPU"):
            graphopt.load(tmp_path / "cuda")


def test_feeds_are_copied_into_aligned_tensors_and_outputs_come_back_without_a_copy():
    """Compiled.run's conversions (runtime.to_tensor / to_numpy): a feed is copied (a static
    cache is written in place, never into the caller's array) into 64-byte-aligned memory,
    as TVM's kernels assume, whatever the feed's own alignment, layout, dtype or size; an
    output comes back as numpy over the tensor's own memory."""
    import tvm

    from graphopt.backends.tvm.runtime import to_numpy, to_tensor

    feeds = [np.arange(65, dtype=np.float32)[1:].reshape(2, 4, 8),  # 4 bytes past an allocation's start
             np.arange(12, dtype=np.int64).reshape(3, 4).T,  # not contiguous
             np.array([True, False, True]), np.float32(2.5), np.zeros((1, 2, 0, 8), np.float32)]
    for feed in feeds:
        before = np.array(feed, copy=True)
        tensor = to_tensor(feed, tvm.cpu())
        back = to_numpy(tensor)
        assert back.dtype == before.dtype and back.shape == before.shape and np.array_equal(back, before)
        if back.size:
            assert tensor.data_ptr() % 64 == 0
            assert back.ctypes.data == tensor.data_ptr()  # the tensor's memory, not a copy
            back[...] = 0
            assert np.array_equal(feed, before)  # the caller's feed untouched


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_an_index_past_its_table_is_refused_on_every_backend(tmp_path, backend):
    """ids that index a constant table (an embedding) are checked against its rows before any
    backend runs: TVM's take clamps an index ONNX calls an error, ORT raised its own message.
    The manifest says the limit; an id inside it picks its row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    g = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)], "embed",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                          [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", "seq", 4])],
                          [numpy_helper.from_array(table, "table")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "embed.onnx")
    graphopt.optimize(tmp_path / "embed.onnx", tmp_path / "out", backend=backend)
    art = graphopt.load(tmp_path / "out")
    assert art.inputs[0]["index_limit"] == 10
    ok = art.run({"ids": np.array([[9, 0, 3, -1, -10]], np.int64)})["rows"]  # ONNX: negatives count from the end
    np.testing.assert_array_equal(ok, table[[[9, 0, 3, -1, -10]]])
    for bad in (10, -11):
        with pytest.raises(UserError, match=rf"input 'ids': index {bad} is outside \[-10, 10\)"):
            art.run({"ids": np.array([[1, bad]], np.int64)})
