"""`graphopt optimize`, `graphopt passes` and `graphopt.load`: artifacts, reports, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import graphopt
from graphopt.cli import cli
from graphopt.errors import UserError
from graphopt.pass_manager import Pass, PassResult, register_pass

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"


@register_pass("test-swap-add-sub")
class SwapAddSub(Pass):
    """Deliberately wrong: turns every Add into Sub."""

    def run(self, graph, ctx):
        res = PassResult()
        for n in graph.nodes:
            if n.op_type == "Add":
                n.op_type = "Sub"
                res.count("swapped")
        return res


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_optimize_writes_artifact_manifest_and_report(tmp_path):
    out = tmp_path / "out"
    r = invoke("optimize", EXAMPLE, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["target"] == "cpu"
    assert manifest["signature"]["inputs"] == [{"name": "x", "dtype": "f32", "shape": ["batch", 16]}]
    assert {"graphopt", "onnxruntime", "onnx", "python"} <= set(manifest["versions"])
    report = json.loads((out / "report.json").read_text())
    assert report["nodes_before"] == 7
    # the default recipe fuses the two projections (one with its GELU) into Linears
    assert report["ops_after"] == {"graphopt.Linear": 2, "LayerNormalization": 1, "Softmax": 1}
    assert [p["name"] for p in report["passes"]][-1] == "eliminate-dead-code"
    assert all("seconds" in p and "stats" in p for p in report["passes"])
    a = graphopt.load(out)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    from graphopt.testing import run_ort

    np.testing.assert_array_equal(a.run({"x": x})["probs"], run_ort(EXAMPLE, {"x": x}, optimize=True)["probs"])


def test_optimize_with_pipeline_recipe_and_inputs(tmp_path):
    recipe = tmp_path / "r.toml"
    # Passes that change the graph (MatMul+Add -> Linear), so the numerics check compares two
    # different graphs on the given inputs (a pass that breaks results is refused below).
    recipe.write_text('[[passes]]\nname = "fold-constants"\nmax-size = 8\n\n[[passes]]\nname = "fuse-linear"\n'
                      '\n[[passes]]\nname = "dce"\n')
    np.savez(tmp_path / "in.npz", x=np.linspace(-2, 2, 48, dtype=np.float32).reshape(3, 16))
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "a", "--recipe", recipe, "--check-numerics",
               "--inputs", tmp_path / "in.npz", "--json", "-q")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["pipeline"] == "fold-constants{max-size=8},fuse-linear,dce" and report["check_numerics"]
    assert report["ops_after"].get("graphopt.Linear") == 2 and report["nodes_after"] < report["nodes_before"]
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "b", "--passes", "cse,dce", "--no-verify", "-q")
    assert r.exit_code == 0 and json.loads((tmp_path / "b" / "report.json").read_text())["verify"] is False


@pytest.mark.parametrize("args, message", [
    (["--passes", "dce,nonsense"], "unknown pass 'nonsense'"),
    (["--passes", "dce{"], "malformed pipeline"),
    (["--passes", ""], "--passes: empty pipeline"),  # not the default recipe less its generation-ready end
    (["--passes", "\n"], "--passes: empty pipeline"),
    (["--recipe", "RECIPE"], "has no option 'max-sise'"),
    (["--passes", "test-swap-add-sub", "--check-numerics"], "pass 'test-swap-add-sub' changed the results: value 'h1'"),
    (["--passes", "dce", "--recipe", "RECIPE"], "either --passes or --recipe"),
    (["--inputs", "MISSING.npz", "--check-numerics"], "no such inputs file"),
    (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
])
def test_optimize_errors_are_one_line_exit_2_and_leave_no_output(tmp_path, args, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\nname = "fold-constants"\nmax-sise = 8\n')
    args = [str(recipe) if a == "RECIPE" else str(tmp_path / a) if a == "MISSING.npz" else a for a in args]
    out = tmp_path / "out"
    r = invoke("optimize", EXAMPLE, "-o", out, "-q", *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no scratch folder left


def test_interrupted_write_leaves_no_folder(tmp_path):
    from graphopt.fileutil import atomic_dir

    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.onnx").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_foreign_or_broken_artifacts(tmp_path):
    out = tmp_path / "out"
    assert invoke("optimize", EXAMPLE, "-o", out, "-q").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    with pytest.raises(UserError, match="not a graphopt artifact"):
        graphopt.load(tmp_path)
    (out / "manifest.json").write_text(json.dumps({**m, "backend": "tensorrt"}))
    with pytest.raises(UserError, match="backend 'tensorrt' is not available"):
        graphopt.load(out)
    (out / "manifest.json").write_text(json.dumps({**m, "target": "cuda"}))
    with pytest.raises(UserError, match="needs CUDAExecutionProvider"):
        graphopt.load(out)
    (out / "manifest.json").write_text(json.dumps(m))
    a = graphopt.load(out)
    with pytest.raises(UserError, match="input 'x' has dtype float64"):
        a.run({"x": np.ones((2, 16))})
    with pytest.raises(UserError, match="missing input 'x'"):
        a.run({})
    with pytest.raises(UserError, match="nope: no such folder"):
        graphopt.load(tmp_path / "nope")
    for bad in (-2, 0, 1.5, True):
        with pytest.raises(UserError, match=f"threads={bad!r}: a whole number from 1 to"):
            graphopt.load(out, threads=bad)
    assert graphopt.load(out, threads=np.int64(1)).run({"x": np.ones((2, 16), np.float32)})


def test_passes_command_lists_the_catalogue():
    r = invoke("passes")
    assert r.exit_code == 0
    assert "eliminate-dead-code (dce)" in r.output and "fold-constants{max-size=1024} (fold)" in r.output
    rows = json.loads(invoke("passes", "--json").output)
    assert any(p["name"] == "test-swap-add-sub" and p["source"] != "graphopt" for p in rows)


def test_backend_options_reach_the_lowering_and_bad_ones_are_refused(tmp_path):
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "a", "-q", "--backend-option", "skip_norm=split", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["backend_options"] == {"skip_norm": "split"}
    for bad, message in (("nope=1", "unknown onnxruntime backend option 'nope'"),
                         ("attention_kernel=fast", "attention_kernel must be one of"),
                         ("novalue", "expected KEY=VALUE")):
        r = invoke("optimize", EXAMPLE, "-o", tmp_path / "b", "-q", "--backend-option", bad)
        assert r.exit_code == 2 and message in r.output and not (tmp_path / "b").exists()



def test_backend_options_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """A typo in --backend-option was found after the export and every pass (minutes on a
    real model); now before anything is loaded, naming the flag."""
    import graphopt.driver as driver

    monkeypatch.setattr(driver, "load_graph", lambda *a, **k: pytest.fail("the model was loaded first"))
    for backend, options, message in (("onnxruntime", {"attention_kernel": "bogus"}, "attention_kernel must be one of"),
                                      ("tvm", {"nope": "1"}, "unknown tvm backend option 'nope'"),
                                      ("tvm", {"num_cores": "0"}, "num_cores='0'")):
        with pytest.raises(UserError, match=f"--backend-option: .*{message}"):
            graphopt.optimize(EXAMPLE, tmp_path / "out", backend=backend, backend_options=options)


def test_inspect_an_artifact_folder_lists_its_kernels(tmp_path):
    assert invoke("optimize", EXAMPLE, "-o", tmp_path / "a", "-q").exit_code == 0
    r = invoke("inspect", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "backend    onnxruntime (cpu)" in r.output and "x: f32[batch, 16]" in r.output
    s = json.loads(invoke("inspect", tmp_path / "a", "--json").output)
    assert s["ops"].get("LayerNormalization") == 1 and sum(s["ops"].values()) == s["nodes"]


def test_explain_fusions_groups_near_misses_by_reason():
    from graphopt.driver import format_fusions

    def miss(node, reason, rule="matmul-add"):
        return {"node": node, "op": "Add", "reason": reason, "rule": rule}

    misses = [miss(f"add_{i}", f"b 'add_{i}' is not a constant") for i in range(5)]
    misses += [miss("norm_1", "expected Reshape, found RMSNorm", "flatten-unflatten")] * 3  # one site, seen 3 times
    report = {"fusions": {"fuse-linear": {"matched": {"matmul": 4}, "near_misses": misses},
                          "fuse-rotary": {"matched": {}, "near_misses": []}}}
    text = format_fusions(report)
    assert text.splitlines()[1:4] == [
        "  fuse-linear: matmul x4",
        "      5 near misses [matmul-add] b 'add_0' is not a constant  (e.g. add_0, Add)",
        "      1 near miss [flatten-unflatten] expected Reshape, found RMSNorm  (e.g. norm_1, Add)",
    ]
    assert "  fuse-rotary: nothing" in text and "--explain-fusions=all" in text
    full = format_fusions(report, full=True)
    assert sum("near miss" in line for line in full.splitlines()) == len(misses)


def test_explain_fusions_all_on_the_cli(tmp_path):
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "a", "--explain-fusions=all")
    assert r.exit_code == 0, r.output
    assert "fusions" in r.stdout and "fuse-linear:" in r.stdout
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "b", "--explain-fusions=some")
    assert r.exit_code == 2 and "--explain-fusions" in r.output


def test_inspect_puts_per_layer_cache_values_on_one_line():
    from graphopt.summary import format_artifact

    cache = [{"name": f"past_key_values.{i}.{kv}", "type": "f32[batch, 2, past_seq, 8]"}
             for i in range(4) for kv in ("key", "value")]
    s = {"artifact": "out", "backend": "onnxruntime", "target": "cpu",
         "inputs": [{"name": "input_ids", "type": "i64[batch, seq]"}, *cache,
                    {"name": "layer.7.odd", "type": "f32[2]"}],
         "outputs": [{"name": "logits", "type": "f32[batch, 1, 16]"}]}
    text = format_artifact(s).splitlines()
    assert "  past_key_values.{0..3}.key: f32[batch, 2, past_seq, 8]  (4 layers)" in text
    assert "  past_key_values.{0..3}.value: f32[batch, 2, past_seq, 8]  (4 layers)" in text
    assert "  layer.7.odd: f32[2]" in text and "  input_ids: i64[batch, seq]" in text
    assert len(text) == 9


@pytest.mark.parametrize("kwargs, message", [
    ({"quantize": 4}, r"optimize\(quantize=4\): expected a string, as --quantize takes it"),
    ({"prune": 0.5}, r"optimize\(prune=0.5\): expected a string, as --prune takes it"),
    ({"passes": ["dce"]}, r"optimize\(passes=\['dce'\]\): expected a string"),
    ({"calibration": 123}, r"optimize\(calibration=123\): expected a path"),
    ({"tune_minutes": "2"}, r"optimize\(tune_minutes='2'\): expected a number of minutes"),
    ({"backend_options": ["a=b"]}, r"optimize\(backend_options=\['a=b'\]\): expected a dict"),
    ({"inputs": "x.npz"}, r"optimize\(inputs='x.npz'\): expected a dict of input names to arrays"),
    ({"kv_layout": "bnsh"}, r"rewrite-kv-cache: unknown layout 'bnsh' \(choose from BNSH, BSNH, static, paged\)"),
    # the whole repr was the message: 35 M characters for a model's 12 MB of bytes
    ({"model": b"\x08" * 10_000_000}, r"^optimize\(model=<bytes of 10,000,000> b'(\\x08){40}'\.\.\.\): expected a path"),
    ({"model": np.zeros((3, 4))}, r"^optimize\(model=<ndarray of shape \(3, 4\)>\): expected a path"),
    ({"model": "x" * 5000}, r"^'x{77}'\.\.\.: File name too long$"),
    ({"model": "a\0b"}, r"^'a\\x00b': embedded null byte$"),  # os.stat's ValueError, bare before
])
def test_the_python_api_names_an_argument_of_the_wrong_type(kwargs, message, tmp_path, monkeypatch):
    """Before: AttributeError / TypeError / ValueError from inside a parser, some after the export."""
    import graphopt.driver as driver

    monkeypatch.setattr(driver, "load_graph", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(UserError, match=message):
        graphopt.optimize(**{"model": EXAMPLE, **kwargs}, output_dir=tmp_path / "out")


def test_the_report_gives_the_weight_bytes_and_the_artifact_size_on_disk(tmp_path):
    """Issue 13's report: per variant, bytes of weights and artifact size (only the weight bytes
    of the quantized layers were there)."""
    r = CliRunner().invoke(cli, ["optimize", str(EXAMPLE), "-o", str(tmp_path / "out") + "/"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    files = [f for f in (tmp_path / "out").iterdir() if f.name not in ("manifest.json", "report.json")]
    assert files and report["artifact_bytes"] == sum(f.stat().st_size for f in files)
    import onnx

    weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(tmp_path / "out" / "model.onnx").graph.initializer)
    assert report["weight_bytes_after"] == weights > 0
    assert (f"size      weights {report['weight_bytes_before'] / 1e3:.1f} kB -> {weights / 1e3:.1f} kB; artifact "
            f"{report['artifact_bytes'] / 1e3:.1f} kB on disk") in r.output
    assert r.output.rstrip().endswith(f"wrote {tmp_path / 'out'}/")  # as given, not out//


def test_check_numerics_runs_a_float16_layer_norm_with_its_statistics_outputs(tmp_path):
    """ONNX types LayerNormalization's Mean and InvStdDev float32 (stash_type=1), while the ONNX
    reference kernel returns them in X's float16: the interpreter's dtype check called this valid
    model a bug in graphopt (exit 1). The reference's outputs are taken in their declared types."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["ln", "mean", "inv_std"], axis=-1),
             helper.make_node("MatMul", ["ln", "w"], ["y"])]
    graph = helper.make_graph(nodes, "ln16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
                              [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float16), "w"),
                               numpy_helper.from_array(np.ones(8, np.float16), "s")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ln16.onnx")
    r = invoke("optimize", tmp_path / "ln16.onnx", "-o", tmp_path / "out", "-q", "--check-numerics")
    assert r.exit_code == 0, r.output
    from graphopt.interpreter import run
    from graphopt.models import load_graph

    g = load_graph(str(tmp_path / "ln16.onnx"))
    out = run(g, {"x": rng.standard_normal((2, 8)).astype(np.float16)}, keep_all=True)
    assert out["mean"].dtype == np.float32 and out["y"].dtype == np.float16
