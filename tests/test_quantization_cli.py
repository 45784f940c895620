"""`graphopt optimize --quantize/--quant-method/--calibration`: pipeline, report, artifact, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphopt
from graphopt.cli import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp.onnx"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_quantize_int4_appends_the_pass_and_reports_it(tmp_path):
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "q", "--quantize", "int4:16", "-q")
    assert r.exit_code == 0, r.output
    assert "quantized 2 layers to int4 (block 16, rtn)" in r.output
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["pipeline"].endswith("quantize-weights{bits=4,block-size=16,method=rtn}")
    q = report["quantization"]
    assert (q["bits"], q["block_size"], q["method"], q["scheme"]) == (4, 16, "rtn", "int4:16")
    assert 0 < q["quantized_weight_bytes"] < q["float_weight_bytes"] / 4
    ops = [n.op_type for n in onnx.load(tmp_path / "q" / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops


def test_int8_artifact_errs_a_fraction_of_int4(tmp_path):
    """The error follows the quantization step: int8's step is 1/17 of int4's on the same
    blocks (range / 255 against range / 15), so its output error must be far smaller."""
    x = {"x": np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)}
    probs = {}
    for name, args in (("fp32", []), ("int8", ["--quantize", "int8:32"]), ("int4", ["--quantize", "int4:32"])):
        assert invoke("optimize", EXAMPLE, "-o", tmp_path / name, "-q", *args).exit_code == 0
        probs[name] = graphopt.load(tmp_path / name).run(x)["probs"]
    err8, err4 = (float(np.abs(probs[k] - probs["fp32"]).max()) for k in ("int8", "int4"))
    assert 0 < err8 < 0.15 * err4, (err8, err4)


def test_gptq_with_npz_calibration(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32))
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "q", "--quantize", "int4:16", "--quant-method", "gptq",
               "--calibration", tmp_path / "cal.npz", "-q")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "q" / "report.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["sequences"] == 16


def test_user_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path):
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 16), np.float32))
    cases = [
        (["--quantize", "int3"], "--quantize 'int3'"),
        (["--quantize", "int4:48"], "block size"),
        (["--quant-method", "gptq"], "--quant-method goes with --quantize"),
        (["--quantize", "int4", "--calibration", tmp_path / "wrong.npz"], "--quantize int8-static and pruning with importance=wanda only"),
        (["--quantize", "int8-static"], "no default calibration data"),
        (["--quantize", "int8-static", "--quant-method", "awq"], "not int8-static"),
        (["--quantize", "int4", "--quant-method", "gptq"], "no default calibration data"),
        (["--quantize", "int4", "--quant-method", "gptq", "--calibration", tmp_path / "missing.txt"], "no such file"),
        (["--quantize", "int4", "--quant-method", "gptq", "--calibration", tmp_path / "wrong.npz"], "no array for input 'x'"),
    ]
    for args, message in cases:
        r = invoke("optimize", EXAMPLE, "-o", tmp_path / "out", "-q", *args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "out").exists()


def test_passes_lists_quantize_weights():
    r = invoke("passes")
    assert "quantize-weights{bits=4, block-size=32, symmetric=False, method=rtn" in r.output


def test_quantize_int8_dynamic(tmp_path):
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "d", "--quantize", "int8-dynamic", "-q")
    assert r.exit_code == 0, r.output
    assert "quantized 2 layers to int8 (activations per call)" in r.output
    q = json.loads((tmp_path / "d" / "report.json").read_text())["quantization"]
    assert q["method"] == "dynamic" and q["bits"] == 8
    ops = [n.op_type for n in onnx.load(tmp_path / "d" / "model.onnx").graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2


def test_quantize_int8_static_and_awq_with_npz_calibration(tmp_path):
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32))
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "s", "--quantize", "int8-static", "--calibration",
               tmp_path / "cal.npz", "-q")
    assert r.exit_code == 0, r.output
    assert "quantized 2 layers to int8 (activations static-percentile)" in r.output
    q = json.loads((tmp_path / "s" / "report.json").read_text())["quantization"]
    assert q["method"] == "static-percentile" and q["calibration"]["sequences"] == 16
    ops = [n.op_type for n in onnx.load(tmp_path / "s" / "model.onnx").graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "a", "--quantize", "int4:16", "--quant-method", "awq",
               "--calibration", tmp_path / "cal.npz", "-q")
    assert r.exit_code == 0, r.output
    assert "quantized 2 layers to int4 (block 16, awq)" in r.output


def test_check_numerics_measures_quantization_and_checks_the_passes_after_it(tmp_path):
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "q", "--passes", "quantize-weights{bits=4,block-size=16},cse",
               "--check-numerics", "-q")
    assert r.exit_code == 0, r.output
    passes = json.loads((tmp_path / "q" / "report.json").read_text())["passes"]
    assert passes[0]["name"] == "quantize-weights" and passes[0]["max_abs_diff"] > 1e-4
    assert passes[1]["max_abs_diff"] == 0.0


def test_tvm_artifact_runs_the_quantized_graph(tmp_path):
    import pytest

    pytest.importorskip("tvm")
    from graphopt.driver import default_pipeline
    from graphopt.interpreter import run
    from graphopt.models import load_graph
    from graphopt.pass_manager import PassManager

    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "t", "--backend", "tvm", "--quantize", "int4:16", "-q",
               "--backend-option", "quant_accuracy_level=0")  # fp32 arithmetic: equal to the reference kernels
    assert r.exit_code == 0, r.output
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    quantized = PassManager(default_pipeline() + ",quantize-weights{bits=4,block-size=16}").run(load_graph(str(EXAMPLE)))
    want = run(quantized, x)["probs"]
    assert np.abs(graphopt.load(tmp_path / "t").run(x)["probs"] - want).max() < 1e-6


def test_text_calibration_and_accuracy_data_feed_a_hugging_face_decoder(tmp_path):
    """A Hugging Face decoder takes input_ids and an attention_mask: text calibration (GPTQ) and
    a perplexity budget on text feed it windows of tokens with a mask of ones (refused before:
    "text feeds a model whose one input is token ids")."""
    from graphopt.testing import tiny_llama_folder

    tiny_llama_folder(tmp_path / "hf")
    default = Path(__file__).resolve().parents[1] / "examples" / "default"
    text = (default / "val.txt").read_text()
    (tmp_path / "calib.txt").write_text(text[: len(text) // 2])
    (tmp_path / "held_out.txt").write_text(text[len(text) // 2:])
    r = invoke("optimize", tmp_path / "hf", "-o", tmp_path / "gptq", "-q", "--quantize", "int4",
               "--quant-method", "gptq", "--calibration", tmp_path / "calib.txt")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "gptq" / "report.json").read_text())["quantization"]
    assert q["method"] == "gptq" and q["calibration"]["sequences"] > 0
    r = invoke("optimize", tmp_path / "hf", "-o", tmp_path / "guarded", "-q", "--quantize", "int4",
               "--accuracy-budget", "perplexity=+50%", "--accuracy-data", tmp_path / "held_out.txt")
    assert r.exit_code == 0, r.output
    acc = json.loads((tmp_path / "guarded" / "report.json").read_text())["accuracy"]
    # a random model over 4096 tokens: its perplexity is about the vocabulary's size, int4's close to it
    assert 1000 < acc["fp32_perplexity"] < 20000 and abs(acc["perplexity"] / acc["fp32_perplexity"] - 1) < 0.5


def test_calibration_arrays_the_model_cannot_take_are_one_line_errors(tmp_path):
    """An .npz whose token ids leave the vocabulary, whose sequences pass the context, or whose
    array lacks the samples axis is refused naming the file and the array (these failed inside
    the pass, as internal errors), before any pass runs."""
    default = Path(__file__).resolve().parents[1] / "examples" / "default"  # vocabulary 4096, 256 positions
    ids = np.random.default_rng(0).integers(0, 4096, (4, 32))
    cases = {"oov": (ids + 4096, "holds token id"), "long": (np.zeros((2, 300), np.int64), "sequences of 300 tokens"),
             "flat": (ids[0], "has shape [32]")}
    for name, (array, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", input_ids=array)
        r = invoke("optimize", default, "-o", tmp_path / "out", "-q", "--quantize", "int4", "--quant-method", "gptq",
                   "--calibration", tmp_path / f"{name}.npz")
        assert r.exit_code == 2 and message in r.output and f"{name}.npz" in r.output, (name, r.output)
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_calibration_npz_is_checked_against_the_model_inputs(tmp_path):
    """Empty samples (a [4, 0] array made an internal error in GPTQ), a dtype that is not the
    input's (bool token ids), inputs with different sample counts: one line naming the file.
    int32 token ids for an int64 input are the same ids, taken."""
    from graphopt.calibration import load_calibration
    from graphopt.dtypes import DType
    from graphopt.errors import UserError
    from graphopt.ir import Graph, TensorType

    from graphopt.builder import Builder

    g = Graph("lm")
    ids, _ = (g.add_input(name, TensorType(DType.INT64, ("batch", "seq"))) for name in ("input_ids", "attention_mask"))
    g.outputs = [Builder(g).Gather(g.add_initializer("embedding", np.zeros((16, 4), np.float32)), ids)]
    ones = np.ones((4, 8), np.int64)
    cases = [(dict(input_ids=np.ones((4, 0), np.int64), attention_mask=np.ones((4, 0), np.int64)),
              r"array 'input_ids' has shape \[4, 0\]: give samples along its first axis, each of at least one token"),
             (dict(input_ids=np.ones((0, 8), np.int32), attention_mask=np.ones((0, 8), np.int64)),
              r"array 'input_ids' has shape \[0, 8\]: give samples"),
             (dict(input_ids=np.array(3), attention_mask=np.ones((4, 8), np.int64)), r"array 'input_ids' has shape \[\]"),
             (dict(input_ids=ones.astype(bool), attention_mask=ones), "array 'input_ids' has dtype bool; the model's input is i64"),
             (dict(input_ids=ones, attention_mask=ones[:3]), r"the arrays hold different numbers of samples \(input_ids: 4, attention_mask: 3\)"),
             # a dim two inputs share (it was left to the run, whose error named neither the file nor its batch)
             (dict(input_ids=ones, attention_mask=np.ones((4, 5), np.int64)),
              r"array 'attention_mask' has shape \[4, 5\]: its dimension 1 \(seq\) is 5, but array 'input_ids' has 8")]
    for arrays, message in cases:
        np.savez(tmp_path / "cal.npz", **arrays)
        with pytest.raises(UserError, match=f"--calibration {tmp_path / 'cal.npz'}: {message}"):
            load_calibration(tmp_path / "cal.npz", None, g)
    np.savez(tmp_path / "cal.npz", input_ids=ones.astype(np.int32), attention_mask=ones)
    feeds = load_calibration(tmp_path / "cal.npz", None, g)
    assert feeds[0]["input_ids"].dtype == np.int64 and sum(len(f["input_ids"]) for f in feeds) == 4
    # a cached decoder's prefill sample: an empty past is a valid one
    g.add_input("past_key_values.0.key", TensorType(DType.FLOAT32, ("batch", 2, "past_seq", 8)))
    np.savez(tmp_path / "cal.npz", input_ids=ones, attention_mask=ones,
             **{"past_key_values.0.key": np.zeros((4, 2, 0, 8), np.float32)})
    assert load_calibration(tmp_path / "cal.npz", None, g)[0]["past_key_values.0.key"].shape == (4, 2, 0, 8)


def test_a_pipeline_of_two_quantizing_passes_reports_both(tmp_path):
    """int4 for one layer, int8 dynamic for the other: the summary and report.json told of the
    last pass alone ("quantized 1 layers to int8"), the int4 layer missing."""
    r = invoke("optimize", EXAMPLE, "-o", tmp_path / "q", "--passes",
               "quantize-weights{block-size=16,exclude=fc2/MatMul},quantize-dynamic")
    assert r.exit_code == 0, r.output
    assert "quantized 1 layers to int4 (block 16, rtn)" in r.output
    assert "quantized 1 layers to int8 (activations per call)" in r.output
    q = json.loads((tmp_path / "q" / "report.json").read_text())["quantization"]
    assert [(e["bits"], e["method"], sum(e["layers"].values())) for e in q["passes"]] == [(4, "rtn", 1), (8, "dynamic", 1)]
    assert sum(q["layers"].values()) == 2 and q["kept_float"] == []
    assert q["quantized_weight_bytes"] == sum(e["quantized_weight_bytes"] for e in q["passes"]) > 0
    ops = [n.op_type for n in onnx.load(tmp_path / "q" / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") == 1 and "MatMul" not in ops


def test_calibration_activations_must_be_finite_and_fit_the_fixed_dims(tmp_path):
    """NaN or infinity in a calibration array wrecked GPTQ's weights and int8-static's scales
    without a word (exit 0, the outputs garbage); a fixed dim that does not fit was an error
    naming neither the file nor the file's own shape. Both are now one line naming the file."""
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    np.savez(tmp_path / "narrow.npz", x=x[:, :15])
    x[3, 5] = np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    np.savez(tmp_path / "nan.npz", x=np.full((8, 16), np.nan, np.float32))
    for name, args, message in (("inf", ["--quantize", "int4", "--quant-method", "gptq"], "holds NaN or infinity"),
                                ("nan", ["--quantize", "int8-static"], "holds NaN or infinity"),
                                ("narrow", ["--quantize", "int8-static"],
                                 "has shape [8, 15]: its dimension 1 (16) is 15, but the model's input is ['batch', 16]")):
        r = invoke("optimize", EXAMPLE, "-o", tmp_path / "out", "-q", *args, "--calibration", tmp_path / f"{name}.npz")
        assert r.exit_code == 2 and f"--calibration {tmp_path / name}.npz: array 'x' {message}" in r.output, r.output
        assert not (tmp_path / "out").exists()


def test_text_from_another_models_tokenizer_and_a_tokenizer_beside_an_onnx_file(tmp_path):
    """Text tokenized by a tokenizer.json that is not the model's gives ids past its embedding:
    a one-line error naming the option (the accuracy guard failed inside ORT's Gather, exit 1).
    A tokenizer.json beside an .onnx file is the model's (it was never read: "text needs the
    model's tokenizer.json beside it", for a file that had one)."""
    import shutil

    from graphopt.testing import tiny_llama_folder

    default = Path(__file__).resolve().parents[1] / "examples" / "default"  # its tokenizer: 4096 tokens
    tiny_llama_folder(tmp_path / "hf", vocab=1000)
    shutil.copy(default / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    (tmp_path / "text.txt").write_text((default / "val.txt").read_text()[:6000])
    for args in (["--accuracy-budget", "perplexity=+5%", "--accuracy-data"], ["--quant-method", "gptq", "--calibration"]):
        r = invoke("optimize", tmp_path / "hf", "-o", tmp_path / "out", "-q", "--quantize", "int4", *args,
                   tmp_path / "text.txt")
        assert r.exit_code == 2, r.output
        assert f"{args[-1]} {tmp_path / 'text.txt'}: the tokenizer gives token id" in r.output
        assert "outside the model's vocabulary of 1000" in r.output and not (tmp_path / "out").exists()
    # a decoder as an .onnx file (input_ids, attention_mask) with its tokenizer beside it: a budget on text runs
    import transformers as tf

    from graphopt.testing import LMWrapper, export_onnx

    tiny_llama_folder(tmp_path / "hf4096")
    (tmp_path / "onnx").mkdir()
    export_onnx(LMWrapper(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf4096")), tmp_path / "onnx" / "model.onnx",
                dynamo=False)
    shutil.copy(default / "tokenizer.json", tmp_path / "onnx" / "tokenizer.json")
    r = invoke("optimize", tmp_path / "onnx" / "model.onnx", "-o", tmp_path / "q", "-q", "--quantize", "int8",
               "--accuracy-budget", "top1=0.5", "--accuracy-data", tmp_path / "text.txt")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q" / "report.json").read_text())["accuracy"]["score"] >= 0.5


def test_no_default_calibration_is_said_before_the_model_loads(tmp_path, monkeypatch):
    """Known from the options and the model's folder: said before a (slow) export."""
    import graphopt.driver as driver
    from graphopt.errors import UserError

    monkeypatch.setattr(driver, "load_graph", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(UserError, match="has no default calibration data .* give --calibration FILE"):
        graphopt.optimize(EXAMPLE, tmp_path / "out", quantize="int8-static")


def test_the_report_names_the_default_calibration_data(tmp_path):
    """Calibrated on the shipped model's training split by default, the report's calibration
    file was null (the source was said on stderr only)."""
    from graphopt.calibration import default_calibration_source

    default = Path(__file__).resolve().parents[1] / "examples" / "default"
    source = default_calibration_source(default)
    assert source.startswith("the training split of ") and default_calibration_source(tmp_path) is None
    r = invoke("optimize", default, "-o", tmp_path / "q", "-q", "--quantize", "int8-static", "--no-kv-cache")
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "q" / "report.json").read_text())["quantization"]
    assert q["calibration"]["file"] == source and q["calibration"]["sequences"] > 0
